"""Common image corruptions for robustness evaluation (ImageNet-C / COCO-C).

Re-implementation, with numpy / OpenCV only, of the corruption functions of

* Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
  Corruptions and Perturbations", ICLR 2019 (ImageNet-C, ``make_imagenet_c.py``)
* Michaelis et al., "Benchmarking Robustness in Object Detection: Autonomous
  Driving when Winter is Coming", 2019 (COCO-C, the ``imagecorruptions``
  package, which generalises the ImageNet-C functions to arbitrary sizes).

The severity parameter tables are the reference ones (see ``_PARAMS``).

Image size
----------
ImageNet-C was defined on 224x224 crops.  Like COCO-C (``imagecorruptions``),
every spatial parameter here (blur sigmas, disk radii, motion-blur radius) is
used **in pixels of the image that is passed in, unscaled**, whatever its size.
To reproduce COCO-C numbers, corrupt the image at its original dataset
resolution, i.e. put :class:`Corrupt` *before* any resize in the transform
pipeline.  Parameters that are relative by construction (zoom factors,
pixelate factor, JPEG quality, noise amplitudes, brightness / contrast) are
size independent anyway.

Input / output convention: ``Tensor[3, H, W]`` float RGB in ``[0, 1]`` (values
outside are clamped first).  The output is float32, same shape and device,
clamped to ``[0, 1]``.  All randomness comes from a local
``numpy.random.Generator`` seeded with ``seed``; global RNG state (numpy,
torch, python) is never touched.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import operator
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "HELD_OUT_CORRUPTIONS", "RANDOM_CORRUPTIONS", "corrupt", "Corrupt",
           "frost_source", "motion_blur_kernel", "disk_kernel"]


# --------------------------------------------------------------------------
# severity tables (index = severity - 1), taken from ImageNet-C / COCO-C
# --------------------------------------------------------------------------
_PARAMS: Dict[str, tuple] = {
    # std of additive gaussian noise (image in [0, 1])
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    # photon count scale: poisson(x * c) / c
    "shot_noise": (60, 25, 12, 5, 3),
    # fraction of values replaced by salt (1) or pepper (0), 50 / 50
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    # std of multiplicative gaussian noise: x + x * N(0, c)
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    # gaussian sigma in pixels
    "gaussian_blur": (1, 2, 3, 4, 6),
    # (disk radius, anti-alias gaussian sigma) in pixels
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    # (radius, sigma) in pixels, ImageMagick motion-blur convention
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    # zoom factors averaged together with the original image
    "zoom_blur": (
        (1.0, 1.11, 0.01),
        (1.0, 1.16, 0.01),
        (1.0, 1.21, 0.02),
        (1.0, 1.26, 0.02),
        (1.0, 1.31, 0.03),
    ),
    # added to V of HSV
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    # contrast factor: (x - mean) * c + mean
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # down-sampling factor of the box/nearest resize round trip
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    # JPEG quality
    "jpeg_compression": (25, 18, 15, 10, 7),
    # (gaussian sigma, max pixel displacement, shuffle iterations)
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    # (flake noise mean, std, zoom, threshold, motion radius, motion sigma, image weight)
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    # (image weight, frost weight)
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    # (plasma-fractal amount, wibble decay)
    "fog": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    # alpha: gain of the smoothed random displacement field (imagecorruptions' elastic transform)
    "elastic_transform": (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12),
    # (liquid noise mean, std, blur sigma, threshold, amount, mud): water drops (mud = 0) with `amount` the
    # strength of their embossed edges, or mud splashes (mud = 1) with `amount` the sigma of their soft border
    "spatter": (
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ),
    # (factor, shift) of the HSV saturation: S := clip(S * factor + shift, 0, 1)
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
}


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Normalised, anti-aliased disk (defocus) kernel as in ImageNet-C.

    The grid is at least 17x17 (``[-8, 8]``) and grows with larger radii; the
    aliased binary disk is smoothed with a small gaussian (3x3 for radius <= 8,
    5x5 above, as in the reference).

    Reference quirk, kept on purpose for comparability with published
    ImageNet-C / COCO-C numbers: for radius 8 and 10 (severities 4, 5) the
    disk touches the border of its grid and the anti-aliasing blur (OpenCV's
    default reflect-101 border) folds mass back in, so the kernel sums to
    ~1.013 / ~1.011, i.e. those severities also brighten the image by ~1 %.
    """
    if radius <= 8:
        half, ksize = 8, 3
    else:
        half, ksize = int(math.ceil(radius)), 5
    coords = np.arange(-half, half + 1, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    kernel = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    kernel /= kernel.sum()
    return cv2.GaussianBlur(kernel, (ksize, ksize), sigmaX=float(alias_blur))


def motion_blur_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """One-sided linear motion-blur kernel (ImageMagick ``-motion-blur`` style).

    ``width = 2 * radius + 1`` taps ``i = 0 .. width-1`` lie on a line at
    ``angle_deg`` starting at the kernel centre, tap ``i`` weighted by
    ``exp(-i^2 / (2 sigma^2))``; weights are normalised to sum to one.  The
    kernel is meant for ``cv2.filter2D`` (correlation), so output pixel ``p``
    averages input pixels ``p + round(i * (sin a, cos a))`` (row, col), which
    is the same sampling as the reference ``_motion_blur`` shift-and-add
    implementation of ``imagecorruptions``.
    """
    width = 2 * int(radius) + 1
    taps = np.arange(width, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * float(sigma) ** 2))
    weights /= weights.sum()
    a = math.radians(angle_deg)
    # round half down, like the reference (ceil(v - 0.5))
    dy = np.ceil(taps * math.sin(a) - 0.5).astype(np.int64)
    dx = np.ceil(taps * math.cos(a) - 0.5).astype(np.int64)
    half = int(max(np.abs(dy).max(), np.abs(dx).max()))
    kernel = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float64)
    np.add.at(kernel, (dy + half, dx + half), weights)
    return kernel.astype(np.float32)


# --------------------------------------------------------------------------
# corruption functions: HxWx3 float32 RGB in [0, 1], severity param, rng
# --------------------------------------------------------------------------
def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, c, size=x.shape).astype(np.float32)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.poisson(x.astype(np.float64) * c) / float(c)).astype(np.float32)


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # skimage.util.random_noise(mode="s&p", amount=c, salt_vs_pepper=0.5):
    # each value (per channel) independently flipped with probability c,
    # half of the flipped values set to 1, the other half to 0.
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def _speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(0.0, c, size=x.shape).astype(np.float32)


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    # skimage.filters.gaussian: truncate at 4 sigma, 'nearest' border, each
    # channel filtered spatially only.
    r = int(4.0 * sigma + 0.5)
    k = 2 * r + 1
    return cv2.GaussianBlur(x, (k, k), sigmaX=float(sigma), sigmaY=float(sigma),
                            borderType=cv2.BORDER_REPLICATE)


def _defocus_blur(x: np.ndarray, c: Tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    kernel = disk_kernel(radius=c[0], alias_blur=c[1])
    return cv2.filter2D(x, -1, kernel)  # default border (reflect 101), as reference


def _motion_filter(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Motion blur of an H x W (x C) float image along ``angle`` (degrees), edges replicated."""
    kernel = motion_blur_kernel(radius, sigma, angle)
    h, w = x.shape[:2]
    half = kernel.shape[0] // 2
    if half >= min(h, w):
        # The reference stops adding taps once the shift reaches the image
        # size; drop those taps and renormalise (only matters for tiny images).
        ys, xs = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1), indexing="ij")
        kernel = kernel * ((np.abs(ys) < h) & (np.abs(xs) < w))
        kernel = kernel / kernel.sum()
    # reference replicates the edge pixels when shifting
    return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REPLICATE)


def _motion_blur(x: np.ndarray, c: Tuple[int, float], rng: np.random.Generator) -> np.ndarray:
    angle = float(rng.uniform(-45.0, 45.0))
    return _motion_filter(x, c[0], c[1], angle)


def _center_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by ``factor`` keeping the size (bilinear), sampled as the reference's
    ``scipy.ndimage.zoom(crop, factor, order=1)`` followed by a top-left crop: the zoomed crop has
    ``round(c * factor)`` pixels whose first and last ones sit on the crop's first and last ones."""
    h, w = x.shape[:2]
    ch = max(1, int(math.ceil(h / factor)))
    cw = max(1, int(math.ceil(w / factor)))
    top, left = (h - ch) // 2, (w - cw) // 2
    sy = (ch - 1) / max(1, int(round(ch * factor)) - 1)
    sx = (cw - 1) / max(1, int(round(cw * factor)) - 1)
    m = np.array([[sx, 0.0, left], [0.0, sy, top]], dtype=np.float64)  # output pixel -> input pixel
    return cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _zoom_blur(x: np.ndarray, c: Tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    # ImageNet-C: mean of the image and its centre zooms by np.arange(*c).
    # Zoom factors are relative, so this is size independent.
    factors = np.arange(*c)
    out = x.astype(np.float32).copy()
    for f in factors:
        out += _center_zoom(x, float(f))
    return out / (len(factors) + 1)


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # HSV round trip with V := clip(V + c, 0, 1).  In HSV every RGB channel is
    # V * g(H, S), so this is exactly a per-pixel rescale by V_new / V (black
    # pixels, V = 0, have S = 0 and become grey c).
    v = x.max(axis=2, keepdims=True)
    v_new = np.clip(v + c, 0.0, 1.0)
    scale = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return np.where(v > 0, x * scale, v_new)


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # Reference: means = np.mean(x, axis=(0, 1)) i.e. the mean over all pixels
    # of the image, computed per colour channel.
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _box_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """PIL's BOX resampling along one axis as (indices, weights), both [n_out, K].

    As Pillow's ``precompute_coeffs``: output pixel ``o`` covers the input
    window ``center +- scale / 2`` with ``center = (o + 0.5) * scale``; an input
    pixel counts (weight 1, then normalised) when its centre falls inside
    ``(-0.5, 0.5]`` of the window in filter units.  Unlike OpenCV's
    INTER_AREA, pixels are not weighted by the fraction they overlap."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    xmin = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    k = int((xmax - xmin).max())
    idx = xmin[:, None] + np.arange(k)[None]
    u = (idx - centre[:, None] + 0.5) / max(scale, 1.0)
    wts = ((u > -0.5) & (u <= 0.5) & (idx < xmax[:, None])).astype(np.float64)
    wts /= np.maximum(wts.sum(1, keepdims=True), 1e-12)
    return np.minimum(idx, n_in - 1), wts


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # PIL: BOX down-sampling (horizontal pass, then vertical, each rounded to
    # 8 bits as PIL keeps uint8 between passes) then NEAREST up-sampling;
    # INTER_NEAREST_EXACT is the pixel-centre aligned nearest neighbour of PIL
    # (plain INTER_NEAREST is shifted by half a pixel).
    h, w = x.shape[:2]
    sw, sh = max(1, int(w * c)), max(1, int(h * c))
    idx, wts = _box_taps(w, sw)
    small = np.einsum("hokc,ok->hoc", x[:, idx], wts)  # [H, sw, 3]
    small = np.round(small * 255.0) / 255.0
    idx, wts = _box_taps(h, sh)
    small = np.einsum("okwc,ok->owc", small[idx], wts)  # [sh, sw, 3]
    small = (np.round(small * 255.0) / 255.0).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


def _jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    # 8-bit RGB -> JPEG (libjpeg, 4:2:0 chroma subsampling, as PIL) -> RGB.
    u8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover - OpenCV always has a JPEG encoder
        raise RuntimeError("cv2.imencode failed to encode JPEG")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return cv2.cvtColor(dec, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def _glass_blur(x: np.ndarray, c: Tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    """Blur, locally scramble pixels, blur again (ImageNet-C / COCO-C glass blur).

    The reference visits every interior pixel ``p = (h, w)`` in descending
    row-major order and "swaps" it with ``q = (h + dy, w + dx)``, ``dx, dy``
    drawn from ``[-d, d)``.  Its swap ``x[p], x[q] = x[q], x[p]`` works on
    numpy views, so it is in fact a copy ``x[p] = x[q]`` (kept on purpose, for
    comparable numbers).  When ``q`` was visited before ``p`` (it comes later in
    row-major order), it already holds a copied value, so ``p`` ends up with the
    value at the end of a chain ``p -> q -> ...`` of increasing positions.  We
    resolve all chains at once by pointer jumping (``log2`` of the longest
    chain rounds) instead of the reference's per-pixel Python loop: same
    result for the same offsets, ~100x faster.
    """
    sigma, d, iterations = c
    # the reference keeps the first blur as uint8 (truncated)
    x = np.floor(_gaussian_blur(x, sigma, rng) * 255.0) / 255.0
    h, w = x.shape[:2]
    hs = np.arange(h - d, d, -1)
    ws = np.arange(w - d, d, -1)
    if hs.size and ws.size:
        n = h * w
        hh, ww = (a.ravel() for a in np.meshgrid(hs, ws, indexing="ij"))  # the reference's visiting order
        p = hh * w + ww
        visited = np.zeros(n, dtype=bool)
        visited[p] = True
        for _ in range(iterations):
            dxy = rng.integers(-d, d, size=(p.size, 2))  # (dx, dy) per visited pixel, as the reference draws
            q = (hh + dxy[:, 1]) * w + (ww + dxy[:, 0])
            chained = visited[q] & (q > p)  # q was overwritten before p copied it
            source = np.arange(n)  # at the end of a chain: the pixel whose current value is copied
            source[p] = q
            nxt = np.arange(n)
            nxt[p[chained]] = q[chained]
            while True:  # pointer jumping: nxt -> the end of each chain
                jumped = nxt[nxt]
                if np.array_equal(jumped, nxt):
                    break
                nxt = jumped
            x = x.reshape(n, -1)[source[nxt]].reshape(x.shape)
    return _gaussian_blur(x, sigma, rng)


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``size x size`` (a power of two) diamond-square height map in [0, 1], as ImageNet-C's fog."""
    m = np.zeros((size, size), dtype=np.float64)
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        # square step: the centre of each square is the mean of its 4 corners (wrapping) + noise
        acc = corners + np.roll(corners, -1, axis=0)
        acc = acc + np.roll(acc, -1, axis=1)
        m[half:size:step, half:size:step] = acc / 4 + wibble * rng.uniform(-wibble, wibble, acc.shape)
        # diamond step: the edge midpoints, from the 2 corners and 2 centres next to each
        centres = m[half:size:step, half:size:step]
        corners = m[0:size:step, 0:size:step]
        acc = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        m[0:size:step, half:size:step] = acc / 4 + wibble * rng.uniform(-wibble, wibble, acc.shape)
        acc = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        m[half:size:step, 0:size:step] = acc / 4 + wibble * rng.uniform(-wibble, wibble, acc.shape)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / max(m.max(), 1e-12)


def _fog(x: np.ndarray, c: Tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    amount, decay = c
    h, w = x.shape[:2]
    size = 1 << (max(h, w, 3) - 1).bit_length()  # next power of two (the reference counts channels too)
    max_val = float(x.max())
    fog = _plasma_fractal(size, decay, rng)[:h, :w, None].astype(np.float32)
    return (x + amount * fog) * (max_val / (max_val + amount))


def _snow(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, keep = c
    h, w = x.shape[:2]
    flakes = rng.normal(loc, scale, size=(h, w)).astype(np.float32)
    flakes = _center_zoom(flakes, float(zoom))
    flakes[flakes < threshold] = 0.0
    flakes = np.clip(flakes, 0.0, 1.0)
    flakes = _motion_filter(flakes, radius, sigma, float(rng.uniform(-135.0, -45.0)))
    flakes = (np.round(flakes * 255.0) / 255.0)[..., None]  # the reference stores the layer as uint8
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = keep * x + (1.0 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + flakes[::-1, ::-1]


# Per-channel (RGB) mean and standard deviation of the reference's frost photographs frost1..frost5 (the ones it
# draws from), measured once; the procedural stand-in reproduces these first two moments.
_FROST_STATS = (
    ((0.305, 0.585, 0.650), (0.106, 0.065, 0.060)),
    ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089)),
    ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089)),
    ((0.540, 0.599, 0.648), (0.112, 0.112, 0.117)),
    ((0.441, 0.484, 0.528), (0.174, 0.170, 0.163)),
)
# (height, width) of frost1..frost5: the procedural stand-in is made at a photograph's size and then scaled and
# cropped as the photograph would be, so a crop sees as much of the texture's large-scale variation as the
# reference's crop sees of the photograph's (a small image's crop is a small part of it: less contrast).
_FROST_SIZES = ((600, 900), (315, 560), (315, 560), (350, 527), (495, 660))
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
FROST_SOURCES = ("auto", "photos", "procedural")


def frost_photo_dir() -> Optional[Path]:
    """The frost photographs of the installed ``imagecorruptions`` package, or None.

    Found without importing the package (its import fails on current setuptools / numpy)."""
    try:
        spec = importlib.util.find_spec("imagecorruptions")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "frost"
        if all((folder / f).is_file() for f in _FROST_FILES):
            return folder
    return None


def frost_source(frost: str = "auto") -> str:
    """'photos' or 'procedural': what ``frost`` ('auto' | 'photos' | 'procedural') resolves to here."""
    if frost not in FROST_SOURCES:
        raise ValueError(f"frost must be one of {', '.join(FROST_SOURCES)}, got {frost!r}")
    if frost == "procedural":
        return "procedural"
    if frost_photo_dir() is None:
        if frost == "photos":
            raise ValueError("frost=photos needs the imagecorruptions package (pip install imagecorruptions)")
        return "procedural"
    return "photos"


def _frost_cover_size(fh: int, fw: int, h: int, w: int) -> Tuple[int, int]:
    """(height, width) the reference scales an fh x fw frost texture to for an h x w image: up by the ratio
    of the dimension that is too small (the larger ratio if both are), then 1.1x more, so random crops vary."""
    scale = max(1.0, h / fh, w / fw) * 1.1
    return int(math.ceil(fh * scale)), int(math.ceil(fw * scale))


def _cover(texture: np.ndarray, h: int, w: int) -> np.ndarray:
    th, tw = _frost_cover_size(texture.shape[0], texture.shape[1], h, w)
    return cv2.resize(texture, (tw, th), interpolation=cv2.INTER_CUBIC)


@functools.lru_cache(maxsize=16)
def _frost_photo(index: int, h: int, w: int) -> np.ndarray:
    """Frost photograph ``index`` (RGB float32) scaled as the reference does to cover an h x w image."""
    folder = frost_photo_dir()
    img = cv2.imread(str(folder / _FROST_FILES[index]), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read frost photograph {folder / _FROST_FILES[index]}")
    # scaled as uint8 (saturating), then the channels reversed, as the reference does
    return cv2.cvtColor(_cover(img, h, w), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def _procedural_frost_texture(index: int, rng: np.random.Generator) -> np.ndarray:
    """Stand-in for frost photograph ``index`` at its size: cloudy plasma plus short bright ice needles, with
    that photograph's per-channel mean and standard deviation (see :data:`_FROST_STATS`)."""
    fh, fw = _FROST_SIZES[index]
    # the cloud at half resolution, then enlarged: its finest octave carries < 1 % of its variance, and the
    # diamond-square is most of the cost
    size = 1 << (max(fh, fw) // 2).bit_length()
    cloud = _plasma_fractal(size, 2.0, rng)[:(fh + 1) // 2, :(fw + 1) // 2].astype(np.float32)
    cloud = cv2.resize(cloud, (fw, fh), interpolation=cv2.INTER_LINEAR)
    needles = np.zeros((fh, fw), dtype=np.float32)
    n = fh * fw // 120
    centre = rng.random((n, 2)) * (fw, fh)
    angle = rng.uniform(0.0, np.pi, n)
    length = rng.uniform(2.0, 15.0, n)  # half-length in pixels of the photograph
    ends = np.stack((np.cos(angle), np.sin(angle)), 1) * length[:, None]
    p0 = np.rint(centre - ends).astype(np.int32)
    p1 = np.rint(centre + ends).astype(np.int32)
    level = rng.uniform(0.3, 1.0, n)
    for a, b, v in zip(p0.tolist(), p1.tolist(), level.tolist()):
        cv2.line(needles, tuple(a), tuple(b), v, 1, cv2.LINE_AA)
    needles = cv2.GaussianBlur(needles, (3, 3), 0.6)
    # cloud : needles = 0.9 : 1 in standard deviation: then a 128x96 crop keeps, on average over the five, the
    # share of the texture's variance that such a crop keeps of the photographs' (about half; 0.6 kept 70 %)
    pattern = (cloud - cloud.mean()) / (cloud.std() + 1e-6) * 0.9 + (needles - needles.mean()) / (needles.std() + 1e-6)
    pattern = (pattern - pattern.mean()) / (pattern.std() + 1e-6)
    mean, std = (np.asarray(v, dtype=np.float32) for v in _FROST_STATS[index])
    return np.clip(mean + std * pattern[..., None], 0.0, 1.0)


def _frost(x: np.ndarray, c: Tuple[float, float], rng: np.random.Generator, source: str = "auto") -> np.ndarray:
    """keep * image + amount * a random h x w crop of one of the five frost textures, scaled to cover the image.

    The reference draws the photograph and the crop's top-left corner from numpy's global generator; here the
    first three draws of ``rng`` do, with the same ranges, so ``seed`` picks one photograph (seed 0: frost5, the
    darkest): compare single draws with the reference only photograph by photograph.  The procedural texture
    goes through the same choice, scaling and crop, drawn after them (a seed crops both sources alike)."""
    keep, amount = c
    h, w = x.shape[:2]
    index = int(rng.integers(5))
    photos = frost_source(source) == "photos"
    if photos:
        texture = _frost_photo(index, h, w)
        th, tw = texture.shape[:2]
    else:
        th, tw = _frost_cover_size(*_FROST_SIZES[index], h, w)
    top = int(rng.integers(max(1, th - h)))
    left = int(rng.integers(max(1, tw - w)))
    if not photos:
        texture = np.clip(_cover(_procedural_frost_texture(index, rng), h, w), 0.0, 1.0)
    return keep * x + amount * texture[top:top + h, left:left + w]


def _gaussian_filter_2d(x: np.ndarray, sigma_y: float, sigma_x: float, truncate: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter with per-axis sigma, mode 'reflect' (half-sample symmetric)."""
    ry, rx = int(truncate * sigma_y + 0.5), int(truncate * sigma_x + 0.5)
    ky = cv2.getGaussianKernel(2 * ry + 1, sigma_y) if ry > 0 else np.ones((1, 1))
    kx = cv2.getGaussianKernel(2 * rx + 1, sigma_x) if rx > 0 else np.ones((1, 1))
    return cv2.sepFilter2D(x, -1, kx, ky, borderType=cv2.BORDER_REFLECT)


def _elastic_transform(x: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    # imagecorruptions' version (no affine part, unlike ImageNet-C): a uniform random displacement field,
    # smoothed with sigma = 1 % of the image size per axis, times alpha; bilinear resampling, reflected border.
    h, w = x.shape[:2]
    max_d = h * 0.005  # the reference uses the height for both directions
    dx = _gaussian_filter_2d(rng.uniform(-max_d, max_d, (h, w)), 0.01 * h, 0.01 * w, 3.0) * alpha
    dy = _gaussian_filter_2d(rng.uniform(-max_d, max_d, (h, w)), 0.01 * h, 0.01 * w, 3.0) * alpha
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(x, xx + dx.astype(np.float32), yy + dy.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT)


_WATER = np.array([175, 238, 238], dtype=np.float32) / 255.0  # pale turquoise, RGB
_MUD = np.array([63, 42, 20], dtype=np.float32) / 255.0  # brown, RGB
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)


def _spatter(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    # ImageNet-C's spatter: a blurred gaussian "liquid" field, thresholded into drops. Water (severities
    # 1-3) lightens the image along the drops' embossed edges in turquoise; mud (4-5) covers the drops in
    # brown, with a border softened by a gaussian of sigma `amount`.
    loc, scale, sigma, threshold, amount, mud = c
    h, w = x.shape[:2]
    liquid = _gaussian_blur(rng.normal(loc, scale, (h, w)).astype(np.float32), sigma, rng)
    liquid[liquid < threshold] = 0.0
    if not mud:
        edges = cv2.Canny((liquid * 255).astype(np.uint8), 50, 150)
        dist = np.minimum(cv2.distanceTransform(255 - edges, cv2.DIST_L2, 5), 20.0)  # distance to an edge
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, _EMBOSS), (3, 3)).astype(np.float32)
        m = liquid * dist
        top = float(m.max())
        if top <= 0.0:  # no drop at all (a tiny image): the reference divides by zero here
            return x
        return x + (m / top * amount)[..., None] * _WATER
    m = _gaussian_blur((liquid > threshold).astype(np.float32), amount, rng)
    m[m < 0.8] = 0.0
    return x * (1.0 - m[..., None]) + m[..., None] * _MUD


def _saturate(x: np.ndarray, c: Tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    # HSV round trip with S := clip(S * factor + shift, 0, 1). In HSV every RGB channel is V * (1 - S * f),
    # f depending on the hue alone, so a new saturation scales each channel's distance below V. Grey pixels
    # (S = 0) have hue 0 in the reference's rgb2hsv: a positive shift tints them red.
    factor, shift = c
    v = x.max(axis=2, keepdims=True)
    s = np.divide(v - x.min(axis=2, keepdims=True), v, out=np.zeros_like(v), where=v > 0)
    s_new = np.clip(s * factor + shift, 0.0, 1.0)
    ratio = np.divide(s_new, s, out=np.zeros_like(s), where=s > 0)
    grey = v * (1.0 - s_new * np.array([0.0, 1.0, 1.0], dtype=np.float32))
    return np.where(s > 0, v - (v - x) * ratio, grey)


_FUNCS: Dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "glass_blur": _glass_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "elastic_transform": _elastic_transform,
    "spatter": _spatter,
    "saturate": _saturate,
}

#: The 15 corruptions of COCO-C (Michaelis et al. 2019) / ImageNet-C, in the reference order: noise, blur,
#: weather, digital.
BENCHMARK_CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: ImageNet-C's four held-out ("validation") corruptions, in the reference order (not part of the benchmark's mPC).
HELD_OUT_CORRUPTIONS: Tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

#: Names accepted by :func:`corrupt`, in a stable order: the benchmark's, then the held-out ones.
CORRUPTIONS: Tuple[str, ...] = BENCHMARK_CORRUPTIONS + HELD_OUT_CORRUPTIONS
assert set(CORRUPTIONS) == set(_FUNCS)

#: Corruptions whose output depends on ``seed``.
RANDOM_CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur",
    "glass_blur", "snow", "frost", "fog", "elastic_transform", "spatter",
)

#: Cache folders this process could not write to (see :meth:`Corrupt._store`).
_UNWRITABLE_CACHES: set = set()

#: Bump when a corruption's output changes: part of every cache key (2: procedural frost scaled and cropped
#: as the photographs).
IMPLEMENTATION_VERSION = 2


def _check(name: str, severity: int) -> int:
    if name not in _FUNCS:
        raise ValueError(
            f"unknown corruption {name!r}; valid names are: {', '.join(CORRUPTIONS)}")
    try:
        if isinstance(severity, bool):
            raise TypeError
        sev = operator.index(severity)
    except TypeError:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}") from None
    if not 1 <= sev <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    return sev


def corrupt(image: Tensor, name: str, severity: int, seed: int = 0, frost: str = "auto") -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to an RGB image.

    Args:
        image: ``Tensor[3, H, W]`` float RGB in ``[0, 1]`` (any device).
        name: one of :data:`CORRUPTIONS`.
        severity: integer in 1..5.
        seed: seed of the local random generator; same inputs and seed give
            the same output.
        frost: texture of the ``frost`` corruption: 'photos' (the reference
            package's photographs, needs ``imagecorruptions`` installed),
            'procedural' (generated here) or 'auto' (photos when installed).

    Returns:
        ``Tensor[3, H, W]`` float32 in ``[0, 1]`` on the input's device.
    """
    sev = _check(name, severity)
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"expected an RGB image Tensor[3, H, W], got {shape}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"empty image of shape {tuple(image.shape)}")
    device = image.device
    x = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    x = np.ascontiguousarray(x.permute(1, 2, 0).numpy())  # H, W, 3
    rng = np.random.default_rng(seed)
    if name == "frost":
        out = _frost(x, _PARAMS[name][sev - 1], rng, frost)
    else:
        out = _FUNCS[name](x, _PARAMS[name][sev - 1], rng)
    out = np.clip(out.astype(np.float32, copy=False), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).to(device)


def _image_seed(base_seed: int, image_id: Any) -> int:
    """Seed for one image, from the base seed and its (integer) image id."""
    if isinstance(image_id, Tensor):
        image_id = image_id.reshape(-1)[0].item() if image_id.numel() else 0
    try:
        key = int(image_id)
    except (TypeError, ValueError):
        # non-numeric ids (e.g. file names): stable hash of the string
        digest = hashlib.sha256(str(image_id).encode("utf-8")).digest()
        key = int.from_bytes(digest[:8], "little")
    ss = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFFFFFFFFFF, key & 0xFFFFFFFFFFFFFFFF])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def to_uint8_grid(image: Tensor) -> Tensor:
    """Round a [0, 1] image to the 8-bit grid (what an image file holds, as COCO-C's stored images)."""
    return torch.round(image * 255.0) / 255.0


class Corrupt:
    """Dataset transform: ``(image, target) -> (corrupt(image), target)``.

    The per-image seed is derived from ``seed`` and ``target["image_id"]``
    (when present), so the corruption of a given image is reproducible and
    independent of loading order / worker count, while different images get
    different noise.  Without an ``image_id`` the base ``seed`` is used.  The
    target is returned unchanged (corruptions are photometric or
    geometry-preserving).

    ``uint8=True`` rounds the output to the 8-bit grid, as the image files of
    COCO-C.  With ``cache_dir`` (implies ``uint8``) each corrupted image is
    kept there as a PNG, keyed by the clean pixels, corruption, severity,
    seed, frost source and :data:`IMPLEMENTATION_VERSION`: a second
    evaluation (another checkpoint) reads the same pixels instead of
    recomputing them.  ``hits`` / ``misses`` count cache reads and writes.
    """

    def __init__(self, name: str, severity: int, seed: int = 0, frost: str = "auto",
                 cache_dir: Optional[str | Path] = None, uint8: bool = False) -> None:
        self.severity = _check(name, severity)
        self.name = name
        self.seed = int(seed)
        self.frost = frost_source(frost) if name == "frost" else frost
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.uint8 = bool(uint8) or self.cache_dir is not None
        self.hits = 0
        self.misses = 0

    def seed_for(self, target: Any) -> int:
        if isinstance(target, dict) and target.get("image_id") is not None:
            return _image_seed(self.seed, target["image_id"])
        return self.seed

    def cache_path(self, image: Tensor, seed: int, target: Any = None) -> Path:
        clean = np.ascontiguousarray(to_uint8_grid(image.detach().to("cpu", torch.float32).clamp(0, 1)).numpy()
                                     * 255.0).astype(np.uint8)
        key = hashlib.sha1(clean.tobytes())
        key.update(repr((clean.shape, self.name, self.severity, seed, self.frost if self.name == "frost" else "",
                         IMPLEMENTATION_VERSION)).encode())
        image_id = target.get("image_id") if isinstance(target, dict) else None
        stem = f"{int(image_id)}-" if isinstance(image_id, (int, np.integer)) else ""
        return self.cache_dir / f"{self.name}-{self.severity}" / f"{stem}{key.hexdigest()[:20]}.png"

    def __call__(self, image: Tensor, target: Any = None):
        seed = self.seed_for(target)
        path = self.cache_path(image, seed, target) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is not None and bgr.shape[:2] == tuple(image.shape[1:]):
                self.hits += 1
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
                return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(image.device), target
        out = corrupt(image, self.name, self.severity, seed, self.frost)
        if self.uint8:
            out = to_uint8_grid(out)
        if path is not None:
            self.misses += 1
            if self.cache_dir not in _UNWRITABLE_CACHES:
                self._store(out, path)
        return out, target

    def _store(self, out: Tensor, path: Path) -> None:
        """Write a corrupted image to the cache, atomically (a reader never sees half a file). A cache that
        cannot be written (a full disk, no permission) is not needed for a correct result: one line on stderr
        says so and this process stops writing to it."""
        u8 = np.rint(out.cpu().numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
        try:
            ok, png = cv2.imencode(".png", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_PNG_COMPRESSION), 1])
            if not ok:
                raise OSError(f"PNG encoding of {path.name} failed")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(png.tobytes())
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            _UNWRITABLE_CACHES.add(self.cache_dir)
            print(f"warning: cannot write the corrupted-image cache {self.cache_dir} ({e.strerror or e}); "
                  "continuing without caching (the results are unaffected)", file=sys.stderr, flush=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, severity={self.severity}, seed={self.seed})"
