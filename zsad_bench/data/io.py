"""Reading images and masks, with one-line errors that name the file.

Decoding policy (:data:`DECODING`, recorded in results files and part of every fit key):

* **EXIF orientation is applied to images and masks alike** (``ImageOps.exif_transpose``), so a mask
  drawn on the image as a viewer shows it lines up with the pixels the backbone sees. The official
  loaders of the papers ignore EXIF; MVTec AD and VisA carry no orientation tags, so their numbers
  do not change.
* **16-bit and float images are scaled by their own range** (per image, min..max -> 0..255).
  16-bit files usually hold 10-, 12- or 14-bit sensor data: scaling by the type's range (0..65535)
  would squeeze a 12-bit image into 16 grey levels, and ``convert("RGB")`` clips everything above
  255 to white. Float images have no type range at all. The price of a per-image range is that a
  uniform brightness change between two images is normalised away; ``data check`` reports how many
  images are decoded this way.
* **Masks are foreground where any channel is > 0** (MVTec AD stores 0/255, VisA 0/1), read from the
  raw values (a 16-bit mask is thresholded before any scaling).
* Only regular files are opened (a FIFO or device file would block the read), and images above
  :func:`max_pixels` pixels are refused before decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from zsad_bench.data.records import Sample
from zsad_bench.errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False

DECODING: dict[str, str] = {
    "exif_orientation": "applied to images and masks (PIL ImageOps.exif_transpose)",
    "high_bit_depth": "16-bit and float images scaled per image, min..max -> 0..255",
    "mask": "foreground where any channel > 0 (raw values)",
    "mask_resize": "0/255 image, PIL bilinear, > 127.5",
}
"""How zsad-bench turns files into pixels; the runner records it and the fit key includes it."""

MAX_PIXELS_ENV = "ZSAD_BENCH_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS), about 13400 x 13400
HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # orientations that swap width and height

# PIL's decompression-bomb check runs inside Image.open against a module global; zsad-bench applies
# its own limit (configurable) instead, so the global is switched off around the header parse only.
_OPEN_LOCK = threading.Lock()


def max_pixels() -> int:
    """Largest image (width x height) zsad-bench decodes: ``$ZSAD_BENCH_MAX_PIXELS`` or 178,956,970."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"{MAX_PIXELS_ENV}={raw}: must be a positive number of pixels, e.g. {DEFAULT_MAX_PIXELS}")
    return value


def check_regular_file(path: Path, what: str = "image") -> None:
    """Refuse what is not a readable regular file (missing, a FIFO/device/socket, a symlink loop)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found; check the dataset root") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} file ({exc.strerror}); fix or remove it") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(
            f"{path}: not a regular file (a folder, FIFO, socket or device); remove it from the dataset folder"
        )


def _open_lazy(path: Path, what: str) -> Image.Image:
    """``Image.open`` of a regular file: parses the header only; PIL's own pixel limit is not applied."""
    check_regular_file(path, what)
    with _OPEN_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(path: Path, what: str) -> Image.Image:
    """Open ``path``, apply the size limit, decode it and apply EXIF orientation."""
    try:
        with _open_lazy(path, what) as img:
            limit = max_pixels()
            w, h = img.size
            if w * h > limit:
                raise DataError(
                    f"{path}: {what} is {w}x{h} = {w * h:,} pixels, above the limit of {limit:,}; "
                    f"if it is genuine, raise the limit with {MAX_PIXELS_ENV}={w * h}"
                )
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable or truncated {what} ({exc}); re-copy the file") from None


def _to_uint8(img: Image.Image) -> Image.Image:
    """A 16-bit or float image scaled by its own min..max to 8 bits (see the module docstring)."""
    arr = np.asarray(img, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return Image.fromarray(np.zeros(arr.shape, np.uint8))
    lo, hi = float(finite.min()), float(finite.max())
    scaled = np.zeros(arr.shape) if hi <= lo else (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo)
    return Image.fromarray(np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8))


def load_image(path: Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, fully decoded, EXIF orientation applied.

    Grayscale is replicated to 3 channels; 16-bit and float images are scaled by their own range.
    """
    img = _open(path, "image")
    if img.mode in HIGH_BIT_DEPTH_MODES:
        img = _to_uint8(img)
    return img.convert("RGB")


class Header(NamedTuple):
    """What the file header says: ``size`` (width, height) as decoded, i.e. after EXIF orientation."""

    size: tuple[int, int]
    mode: str
    orientation: int


def image_header(path: Path, what: str = "image") -> Header:
    """The :class:`Header` of the image at ``path``, without decoding its pixels."""
    try:
        with _open_lazy(path, what) as img:
            w, h = img.size
            orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
            if orientation in TRANSPOSING_ORIENTATIONS:
                w, h = h, w
            return Header((w, h), img.mode, orientation)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable {what} ({exc}); re-copy the file") from None


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of the image as decoded (EXIF orientation applied), from the header only."""
    return image_header(path).size


def mask_values(path: Path) -> np.ndarray:
    """Raw values of the mask file at ``path`` as an (H, W) array (max over colour channels), EXIF applied."""
    m = _open(path, "mask")
    if m.mode in HIGH_BIT_DEPTH_MODES:
        return np.asarray(m)
    if m.mode not in ("L", "RGB"):
        m = m.convert("RGB")  # palette, 1-bit, with alpha: the colours a viewer shows
    arr = np.asarray(m)
    return arr.max(axis=-1) if arr.ndim == 3 else arr


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean mask resized to ``size x size`` as the SPG release does.

    Binary 0/255 image, PIL bilinear resize, then ``> 0.5`` on the [0, 1] scale. The one mask resize
    of zsad-bench (used by :func:`load_mask` and by the metric accumulator).
    """
    if mask.shape == (size, size):
        return mask.astype(bool, copy=False)
    img = Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img) > 127.5


def load_mask(sample: Sample, size: int | None = None) -> np.ndarray:
    """Boolean ground-truth mask of ``sample``; all-False for normal images.

    Any non-zero pixel is foreground (MVTec stores 0/255, VisA 0/1). With ``size`` the mask is
    resized by :func:`resize_mask`. Sizes are validated beforehand by :func:`zsad_bench.data.validate`.
    """
    if sample.mask_path is None:
        if sample.label:
            raise DataError(f"{sample.image_path}: anomalous image has no mask; add its mask or drop the image")
        if size is not None:
            return np.zeros((size, size), dtype=bool)
        w, h = image_size(sample.image_path)
        return np.zeros((h, w), dtype=bool)
    arr = mask_values(sample.mask_path) > 0
    return arr if size is None else resize_mask(arr, size)


def _stamp(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def samples_fingerprint(samples: Sequence[Sample], decoding: Mapping[str, str] | None = None) -> str:
    """SHA-1 of everything about ``samples`` that can change a fit.

    Per sample, in order: image path, size and mtime; mask path, size and mtime; label, defect type,
    category and split. ``decoding`` (default: :data:`DECODING`) is hashed too, so a
    change in how files become pixels invalidates fits.
    """
    if decoding is None:
        decoding = DECODING
    h = hashlib.sha1(json.dumps(dict(decoding), sort_keys=True).encode())
    for s in samples:
        h.update(
            f"{s.image_path}|{_stamp(s.image_path)}|{s.mask_path}|{_stamp(s.mask_path)}|"
            f"{s.label}|{s.defect_type}|{s.category}|{s.split}\n".encode()
        )
    return h.hexdigest()
