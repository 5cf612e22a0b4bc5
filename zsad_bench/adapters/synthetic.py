"""``synthetic``, ``synthetic:textures``, ``synthetic:objects``: two small generated datasets with exact masks.

Both sets use the MVTec AD layout and have disjoint categories, so one can be the auxiliary set
and the other the target (the default, offline ``synthetic`` protocol):

* textures: ``weave`` (woven fabric), ``marble`` (veined stone), ``mesh`` (wire grid on a plate);
* objects: ``cap`` (bottle cap seen from above), ``capsule`` (two-colour pill), ``nut`` (hex nut).

Normal images vary in colour, lighting, pose/offset, texture phase and sensor noise. Defects
(scratch, crack, hole, stain, contamination, missing part) vary in size and contrast; stains and
some scratches are faint. Every mask pixel differs from the defect-free rendering and no other
pixel does, so masks are exact. Per category: train/good 10, test/good 10, test defects 3 x 5.
Images are 160x160 RGB PNG; generation is deterministic in ``seed``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from zsad_bench.adapters._layout import scan_category
from zsad_bench.data import Dataset, register_dataset
from zsad_bench.errors import DataError
from zsad_bench.paths import cache_dir, fresh_folder

VERSION = "v1"
SIZE = 160
N_TRAIN = 10
N_TEST_GOOD = 10
N_PER_DEFECT = 5
SETS = ("textures", "objects")

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_XY = np.stack([_XX, _YY], axis=-1)


@dataclass
class Scene:
    """A defect-free rendering: ``image`` (H,W,3 float, 0..255, noisy), where defects may go
    (``support``), the removable foreground (``fg``), what lies beneath it (``background``),
    the illumination field (``light``) and the noise level."""

    image: np.ndarray
    support: np.ndarray
    fg: np.ndarray
    background: np.ndarray
    light: np.ndarray
    noise: float


Renderer = Callable[[np.random.Generator], Scene]
Defect = Callable[[Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a random ``(cells+1)^2`` grid upsampled bicubically to the image size."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def _fractal(rng: np.random.Generator, octaves: tuple[int, ...] = (3, 6, 12, 24)) -> np.ndarray:
    total = sum(_smooth_noise(rng, c) * 0.55**i for i, c in enumerate(octaves))
    return total / np.abs(total).max()


def _lighting(rng: np.random.Generator) -> np.ndarray:
    """Multiplicative illumination: a random linear gradient and a vignette."""
    gx, gy = rng.uniform(-0.12, 0.12, 2)
    cx, cy = rng.uniform(40, 120, 2)
    vig = rng.uniform(0.0, 0.25)
    r2 = ((_XX - cx) ** 2 + (_YY - cy) ** 2) / (SIZE**2)
    return (1 + gx * (_XX - 80) / 80 + gy * (_YY - 80) / 80 - vig * r2).astype(np.float32)


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _rotated(theta: float, cx: float = 80.0, cy: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    x, y = _XX - cx, _YY - cy
    return x * c + y * s, -x * s + y * c


def _finish(rng: np.random.Generator, base: np.ndarray, light: np.ndarray) -> tuple[np.ndarray, float]:
    noise = float(rng.uniform(1.5, 3.5))
    img = base * light[..., None] + noise * rng.standard_normal(base.shape, np.float32)
    return img, noise


def _polyline_mask(points: np.ndarray, width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of the polyline through ``points`` ((n, 2) as x, y)."""
    mask = np.zeros((SIZE, SIZE), bool)
    pad = width / 2 + 1
    x0, y0 = (max(int(np.floor(points[:, i].min() - pad)), 0) for i in (0, 1))
    x1, y1 = (min(int(np.ceil(points[:, i].max() + pad)) + 1, SIZE) for i in (0, 1))
    if x0 >= x1 or y0 >= y1:
        return mask
    xy = _XY[y0:y1, x0:x1]
    dist = np.full(xy.shape[:2], np.inf, np.float32)
    for a, b in itertools.pairwise(points):
        ab = b - a
        t = np.clip(((xy - a) @ ab) / max(float(ab @ ab), 1e-6), 0, 1)
        dist = np.minimum(dist, np.linalg.norm(xy - (a + t[..., None] * ab), axis=-1))
    mask[y0:y1, x0:x1] = dist <= width / 2
    return mask


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float, wobble: float = 0.35) -> np.ndarray:
    """An irregular filled blob: an ellipse whose boundary is perturbed by smooth noise."""
    ax = rng.uniform(0.6, 1.0)
    x, y = _rotated(rng.uniform(0, np.pi), cx, cy)
    r = np.sqrt((x / ax) ** 2 + y**2) / radius
    return r + wobble * _smooth_noise(rng, 6) < 1.0


def _pick(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    """A random pixel (x, y) of ``region``."""
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def _inner(region: np.ndarray, margin: int) -> np.ndarray:
    """Pixels of ``region`` at least ``margin`` pixels from its outside (the image border counts as outside)."""
    depth = ndimage.distance_transform_cdt(np.pad(region, 1), metric="chessboard")[1:-1, 1:-1]
    inner = depth > margin
    return inner if inner.any() else region


def _boundary(region: np.ndarray) -> np.ndarray:
    return region & ~ndimage.binary_erosion(region, iterations=2)


# ----------------------------------------------------------------------------- normal scenes


def _weave(rng: np.random.Generator) -> Scene:
    colour = _jitter(rng, tuple(rng.choice([(150, 120, 90), (90, 110, 150), (140, 140, 130)])), 18)
    period = rng.uniform(8.5, 11.5)
    u, v = _rotated(rng.uniform(-0.15, 0.15), rng.uniform(0, 20), rng.uniform(0, 20))
    across_u = 0.5 + 0.5 * np.cos(2 * np.pi * u / period)
    across_v = 0.5 + 0.5 * np.cos(2 * np.pi * v / period)
    warp_on_top = (np.floor(u / period + 0.5) + np.floor(v / period + 0.5)) % 2 == 0
    shade = np.where(warp_on_top, across_v, across_u) * (0.8 + 0.2 * np.where(warp_on_top, across_u, across_v))
    fibres = 0.06 * _smooth_noise(rng, 40)
    base = colour * (0.5 + 0.45 * shade + fibres)[..., None]
    light = _lighting(rng)
    img, noise = _finish(rng, base, light)
    full = np.ones((SIZE, SIZE), bool)
    return Scene(img, full, full, img, light, noise)


def _marble(rng: np.random.Generator) -> Scene:
    light_col = _jitter(rng, (215, 210, 200), 15)
    vein_col = _jitter(rng, tuple(rng.choice([(90, 90, 95), (120, 95, 80), (70, 95, 85)])), 15)
    u, _ = _rotated(rng.uniform(0, np.pi), rng.uniform(60, 100), rng.uniform(60, 100))
    turb = _fractal(rng)
    veins = np.abs(np.sin(u * rng.uniform(0.05, 0.09) + rng.uniform(3, 5) * turb + rng.uniform(0, 2 * np.pi)))
    vein = (1 - veins) ** rng.uniform(3, 6)
    cloud = 0.06 * _fractal(rng, (4, 8, 16))
    base = light_col * (1 + cloud)[..., None] * (1 - 0.65 * vein[..., None]) + vein_col * 0.65 * vein[..., None]
    light = _lighting(rng)
    img, noise = _finish(rng, base, light)
    full = np.ones((SIZE, SIZE), bool)
    return Scene(img, full, full, img, light, noise)


def _mesh(rng: np.random.Generator) -> Scene:
    grey = rng.uniform(150, 190)
    plate = np.full((SIZE, SIZE, 3), grey, np.float32) * (1 + 0.05 * _fractal(rng))[..., None]
    period = rng.uniform(13, 17)
    width = rng.uniform(3.0, 4.2)
    u, v = _rotated(rng.uniform(-0.2, 0.2), rng.uniform(0, 20), rng.uniform(0, 20))
    u = u + 1.5 * _smooth_noise(rng, 4)
    du = np.abs((u + period / 2) % period - period / 2)
    dv = np.abs((v + period / 2) % period - period / 2)
    wire = (du <= width / 2) | (dv <= width / 2)
    profile = np.minimum(du, dv) / (width / 2)
    wire_grey = rng.uniform(50, 85) * (1.25 - 0.5 * np.clip(profile, 0, 1))
    base = np.where(wire[..., None], wire_grey[..., None], plate)
    light = _lighting(rng)
    img, noise = _finish(rng, base, light)
    bg, _ = _finish(rng, plate, light)
    return Scene(img, np.ones((SIZE, SIZE), bool), wire, bg, light, noise)


def _table(rng: np.random.Generator) -> np.ndarray:
    colour = _jitter(rng, tuple(rng.choice([(60, 62, 70), (35, 80, 60), (110, 100, 90)])), 12)
    return colour * (1 + 0.08 * _fractal(rng, (2, 4, 8)))[..., None]


def _cap(rng: np.random.Generator) -> Scene:
    bg = _table(rng)
    cx, cy = rng.uniform(68, 92, 2)
    radius = rng.uniform(44, 56)
    colour = _jitter(rng, tuple(rng.choice([(200, 40, 40), (230, 200, 60), (60, 120, 200), (220, 220, 215)])), 20)
    r = np.hypot(_XX - cx, _YY - cy) / radius
    obj = r <= 1.0
    angle = np.arctan2(_YY - cy, _XX - cx)
    knurl = 0.06 * np.cos(angle * rng.integers(40, 60)) * (r > 0.85)
    rim = np.where(r > 0.85, 0.75 + 0.25 * np.cos((r - 0.925) / 0.075 * np.pi / 2), 1.0)
    grooves = 1 + 0.03 * np.sin(r * rng.uniform(25, 40))
    hl_a = rng.uniform(0, 2 * np.pi)
    hl = 0.35 * np.exp(
        -((_XX - cx - 0.45 * radius * np.cos(hl_a)) ** 2 + (_YY - cy - 0.45 * radius * np.sin(hl_a)) ** 2)
        / (2 * (0.18 * radius) ** 2)
    )
    shade = (rim + knurl) * grooves * (1 - 0.15 * r**2) + hl
    base = np.where(obj[..., None], colour * shade[..., None], bg)
    light = _lighting(rng)
    img, noise = _finish(rng, base, light)
    bg_img, _ = _finish(rng, bg, light)
    return Scene(img, obj, obj, bg_img, light, noise)


def _capsule(rng: np.random.Generator) -> Scene:
    bg = _table(rng)
    palette = [((210, 50, 50), (235, 235, 225)), ((40, 90, 190), (230, 200, 60)), ((240, 150, 40), (240, 240, 235))]
    col_a, col_b = (_jitter(rng, c, 15) for c in palette[rng.integers(len(palette))])
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(70, 90, 2)
    half = rng.uniform(30, 38)
    rad = rng.uniform(17, 21)
    u, v = _rotated(theta, cx, cy)
    along = np.clip(u, -half, half)
    dist = np.hypot(u - along, v)
    obj = dist <= rad
    cyl = np.sqrt(np.clip(1 - (dist / rad) ** 2, 0, 1))
    shade = 0.55 + 0.45 * cyl + 0.35 * np.exp(-((v + 0.4 * rad) ** 2) / (2 * (0.15 * rad) ** 2)) * (np.abs(u) < half)
    split_at = rng.uniform(-4, 4)
    colour = np.where((u < split_at)[..., None], col_a, col_b)
    seam = 1 - 0.25 * (np.abs(u - split_at) < 1.2)
    base = np.where(obj[..., None], colour * (shade * seam)[..., None], bg)
    light = _lighting(rng)
    img, noise = _finish(rng, base, light)
    bg_img, _ = _finish(rng, bg, light)
    return Scene(img, obj, obj, bg_img, light, noise)


def _nut(rng: np.random.Generator) -> Scene:
    bg = _table(rng)
    cx, cy = rng.uniform(68, 92, 2)
    radius = rng.uniform(44, 52)
    rot = rng.uniform(0, np.pi / 3)
    metal = _jitter(rng, (175, 175, 180), 20)
    angle = np.arctan2(_YY - cy, _XX - cx) - rot
    r = np.hypot(_XX - cx, _YY - cy)
    sector = np.mod(angle, np.pi / 3) - np.pi / 6
    hex_r = r * np.cos(sector) / (radius * np.cos(np.pi / 6))
    hole = r < radius * rng.uniform(0.38, 0.46)
    obj = (hex_r <= 1.0) & ~hole
    facet = np.floor(np.mod(angle, 2 * np.pi) / (np.pi / 3))
    facet_shade = 0.8 + 0.2 * np.cos(facet * np.pi / 3 + rng.uniform(0, 2 * np.pi))
    chamfer = np.where(r > 0.9 * radius * np.cos(np.pi / 6), 0.85, 1.0)
    thread = 1 + 0.08 * np.sin(r * 2.2) * (r < radius * 0.55)
    brushed = 1 + 0.04 * _smooth_noise(rng, 30)
    shade = facet_shade * chamfer * thread * brushed
    base = np.where(obj[..., None], metal * shade[..., None], bg)
    light = _lighting(rng)
    img, noise = _finish(rng, base, light)
    bg_img, _ = _finish(rng, bg, light)
    return Scene(img, obj, obj, bg_img, light, noise)


# ----------------------------------------------------------------------------- defects
# Each returns (target image, mask): the caller writes the target inside the mask only.


def _scratch(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x0, y0 = _pick(rng, _inner(scene.support, 6))
    length = rng.uniform(18, 55)
    angle = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(-0.6, 0.6)
    t = np.linspace(0, 1, 12)
    ang = angle + bend * t
    pts = np.stack([x0 + np.cumsum(np.cos(ang)) * length / 12, y0 + np.cumsum(np.sin(ang)) * length / 12], -1)
    mask = _polyline_mask(pts, rng.choice([1.2, 1.6, 2.2])) & scene.support
    contrast = rng.uniform(18, 70) * rng.choice([-1, 1], p=[0.3, 0.7])
    return scene.image + contrast, mask


def _crack(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x, y = _pick(rng, _inner(scene.support, 8))
    angle = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(rng.integers(6, 12)):
        angle += rng.uniform(-0.7, 0.7)
        step = rng.uniform(3, 6)
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        pts.append((x, y))
    mask = _polyline_mask(np.asarray(pts, np.float32), rng.uniform(1.2, 2.2))
    if rng.random() < 0.5:
        bx, by = pts[len(pts) // 2]
        b_ang = angle + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2) + np.cumsum(rng.uniform(-0.3, 0.3, 4))
        branch = np.stack([bx + np.cumsum(4 * np.cos(b_ang)), by + np.cumsum(4 * np.sin(b_ang))], -1)
        mask |= _polyline_mask(np.vstack([[bx, by], branch]).astype(np.float32), 1.2)
    darkness = rng.uniform(0.25, 0.6)
    return scene.image * darkness, mask & scene.support


def _hole(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _pick(rng, _inner(scene.support, 10))
    mask = _blob(rng, cx, cy, rng.uniform(3.5, 9), wobble=0.2) & scene.support
    depth = np.clip(np.hypot(_XX - cx, _YY - cy) / 9, 0, 1)
    inside = rng.uniform(15, 40) * (0.6 + 0.4 * depth) * scene.light
    return np.repeat(inside[..., None], 3, -1) + scene.noise * rng.standard_normal(scene.image.shape, np.float32), mask


def _stain(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _pick(rng, _inner(scene.support, 12))
    mask = _blob(rng, cx, cy, rng.uniform(7, 18)) & scene.support
    direction = rng.choice([(-1.0, -1.0, -1.0), (-0.4, -0.8, -1.0), (0.6, 0.2, -0.8), (-1.0, -0.2, 0.3)])
    strength = rng.uniform(9, 20)
    return scene.image + np.asarray(direction, np.float32) * strength, mask


def _contamination(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((SIZE, SIZE), bool)
    area = _inner(scene.support, 6)
    for _ in range(rng.integers(1, 4)):
        cx, cy = _pick(rng, area)
        if rng.random() < 0.35:
            ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(-0.5, 0.5, 8))
            step = rng.uniform(2, 4)
            pts = np.stack([cx + np.cumsum(np.cos(ang)) * step, cy + np.cumsum(np.sin(ang)) * step], -1)
            mask |= _polyline_mask(pts, 1.3)
        else:
            mask |= _blob(rng, cx, cy, rng.uniform(2, 5.5), wobble=0.3)
    mask &= scene.support
    colour = _jitter(rng, tuple(rng.choice([(40, 30, 25), (120, 80, 40), (30, 140, 60), (200, 200, 60)])), 20)
    target = colour * scene.light[..., None] * (1 + 0.1 * _smooth_noise(rng, 20))[..., None]
    return target + scene.noise * rng.standard_normal(scene.image.shape, np.float32), mask


def _missing(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A chunk of the foreground (object edge, or wires of a mesh) is gone, showing what lies beneath."""
    if scene.support.all():
        cx, cy = _pick(rng, _inner(scene.support, 20))
    else:
        cx, cy = _pick(rng, _boundary(scene.fg))
    mask = _blob(rng, cx, cy, rng.uniform(9, 18), wobble=0.25) & scene.fg
    return scene.background, mask


CATEGORIES: dict[str, dict[str, tuple[Renderer, dict[str, Defect]]]] = {
    "textures": {
        "weave": (_weave, {"hole": _hole, "stain": _stain, "contamination": _contamination}),
        "marble": (_marble, {"crack": _crack, "scratch": _scratch, "stain": _stain}),
        "mesh": (_mesh, {"missing": _missing, "contamination": _contamination, "scratch": _scratch}),
    },
    "objects": {
        "cap": (_cap, {"scratch": _scratch, "missing": _missing, "stain": _stain}),
        "capsule": (_capsule, {"crack": _crack, "contamination": _contamination, "missing": _missing}),
        "nut": (_nut, {"scratch": _scratch, "hole": _hole, "contamination": _contamination}),
    },
}


# ----------------------------------------------------------------------------- images


@dataclass
class SynthImage:
    """One generated image: the written ``image`` (uint8 H,W,3), its defect-free ``clean`` version and ``mask``."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray


def _rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    words = [seed, *(sum(ord(ch) * 31**i for i, ch in enumerate(w)) % 2**32 for w in (category, split, defect)), index]
    return np.random.default_rng(words)


def synthesize(category: str, split: str, defect: str, index: int, seed: int = 0) -> SynthImage:
    """Render image ``index`` of ``category/split/defect`` (``defect="good"`` for normal images)."""
    spec = next((c[category] for c in CATEGORIES.values() if category in c), None)
    if spec is None:
        known = ", ".join(c for cats in CATEGORIES.values() for c in cats)
        raise DataError(f"unknown synthetic category '{category}'; known: {known}")
    render, defects = spec
    if defect != "good" and defect not in defects:
        raise DataError(f"synthetic category '{category}' has no defect '{defect}'; known: {', '.join(defects)}")
    rng = _rng(seed, category, split, defect, index)
    scene = render(rng)
    clean = np.clip(np.rint(scene.image), 0, 255).astype(np.uint8)
    if defect == "good":
        return SynthImage(clean, clean, np.zeros((SIZE, SIZE), bool))
    mask = np.zeros((SIZE, SIZE), bool)
    while mask.sum() < 6:
        target, mask = defects[defect](scene, rng)
    out = clean.copy()
    out[mask] = np.clip(np.rint(target[mask]), 0, 255).astype(np.uint8)
    # Guarantee that every mask pixel really changed: push unchanged ones by 3 levels away from the clip bound.
    same = mask & (out == clean).all(-1)
    nudged = clean[same].astype(np.int16)
    out[same] = np.where(nudged < 128, nudged + 3, nudged - 3).astype(np.uint8)
    return SynthImage(out, clean, mask)


def _jobs() -> list[tuple[str, str, str, str, int]]:
    """(set, category, split, defect, index) of every image, in writing order."""
    jobs = []
    for set_name, cats in CATEGORIES.items():
        for cat, (_, defects) in cats.items():
            jobs += [(set_name, cat, "train", "good", i) for i in range(N_TRAIN)]
            jobs += [(set_name, cat, "test", "good", i) for i in range(N_TEST_GOOD)]
            jobs += [(set_name, cat, "test", d, i) for d in defects for i in range(N_PER_DEFECT)]
    return jobs


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def generate_synthetic(out: Path, seed: int = 0, progress: bool = False) -> dict[str, Path]:
    """Write ``<out>/textures`` and ``<out>/objects`` (MVTec layout); returns set name -> root.

    Fails if either folder already exists. Each set appears complete or not at all (written to a
    temporary folder, then renamed). Deterministic: the same ``seed`` gives identical files.
    """
    out = Path(out)
    roots = {s: out / s for s in SETS}
    existing = [str(p) for p in roots.values() if p.exists()]
    if existing:
        raise DataError(f"{existing[0]}: already exists; remove it or choose another output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = fresh_folder(out, ".synthetic-")
    except OSError as exc:
        raise DataError(f"{out}: cannot create the output folder ({exc}); choose a writable folder") from None
    try:
        for set_name, cat, split, defect, i in tqdm(_jobs(), desc="synthetic", unit="img", disable=not progress):
            img = synthesize(cat, split, defect, i, seed)
            _write_png(tmp / set_name / cat / split / defect / f"{i:03d}.png", img.image)
            if defect != "good":
                _write_png(
                    tmp / set_name / cat / "ground_truth" / defect / f"{i:03d}_mask.png", img.mask * np.uint8(255)
                )
        for set_name, root in roots.items():
            os.replace(tmp / set_name, root)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the synthetic datasets ({exc}); choose a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return roots


def cached_synthetic(seed: int = 0) -> Path:
    """The generated sets for ``seed`` under the cache dir, created on first use and reused."""
    final = cache_dir() / "synthetic" / f"{VERSION}-seed{seed}"
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_folder(final.parent, f".{final.name}-")
        try:
            generate_synthetic(tmp, seed)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        if not final.is_dir():  # otherwise another process finished first: use its copy
            raise DataError(
                f"{final}: cannot write the synthetic datasets ({exc}); set ZSAD_BENCH_CACHE to a writable folder"
            ) from None
    return final


@register_dataset("synthetic", "generated textures + objects sets (synthetic:textures, synthetic:objects)", False)
def load_synthetic(root: Path | None) -> Dataset:
    """Both generated sets (``root`` None) or one of them (``root`` = ``textures`` / ``objects``), seed 0."""
    which = SETS if root is None else (str(root),)
    if which[0] not in SETS:
        raise DataError(f"unknown synthetic set '{root}'; use synthetic, synthetic:textures or synthetic:objects")
    base = cached_synthetic()
    samples = [s for w in which for cat in CATEGORIES[w] for s in scan_category(base / w / cat, cat)]
    name = "synthetic" if root is None else f"synthetic-{which[0]}"
    meta = {"layout": "mvtec", "generator": VERSION, "seed": "0"}
    return Dataset(name, base if root is None else base / which[0], samples, "synthetic", meta)
