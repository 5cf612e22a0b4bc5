"""Reading images and masks, with one-line errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from zsad_bench.data.records import Sample
from zsad_bench.errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(path: Path) -> Image.Image:
    """The image at ``path`` as RGB (grayscale is replicated to 3 channels); fully decoded."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check the dataset root") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc}); re-copy the file") from None


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check the dataset root") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: unreadable image ({exc}); re-copy the file") from None


def load_mask(sample: Sample, size: int | None = None) -> np.ndarray:
    """Boolean ground-truth mask of ``sample``; all-False for normal images.

    Any non-zero pixel is foreground (MVTec stores 0/255, VisA 0/1). With ``size`` the mask is
    resized as the SPG release does: binary 0/255 image, PIL bilinear resize to ``size x size``,
    then ``> 0.5`` on the [0, 1] scale.
    """
    if sample.mask_path is None:
        if sample.label:
            raise DataError(f"{sample.image_path}: anomalous image has no mask; add its mask or drop the image")
        if size is not None:
            return np.zeros((size, size), dtype=bool)
        w, h = image_size(sample.image_path)
        return np.zeros((h, w), dtype=bool)
    try:
        with Image.open(sample.mask_path) as m:
            m.load()
            arr = np.asarray(m.convert("L")) > 0
    except FileNotFoundError:
        raise DataError(f"{sample.mask_path}: mask file not found (for {sample.image_path})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{sample.mask_path}: unreadable or truncated mask ({exc}); re-copy the file") from None
    if size is None:
        return arr
    img = Image.fromarray((arr * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img) > 127.5
