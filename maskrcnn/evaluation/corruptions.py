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

import hashlib
import math
import operator
from typing import Any, Callable, Dict, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["CORRUPTIONS", "corrupt", "Corrupt", "motion_blur_kernel", "disk_kernel"]


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


def _motion_blur(x: np.ndarray, c: Tuple[int, float], rng: np.random.Generator) -> np.ndarray:
    angle = float(rng.uniform(-45.0, 45.0))
    kernel = motion_blur_kernel(c[0], c[1], angle)
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


def _center_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by ``factor`` keeping the size (bilinear)."""
    h, w = x.shape[:2]
    ch = max(1, int(math.ceil(h / factor)))
    cw = max(1, int(math.ceil(w / factor)))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top:top + ch, left:left + cw]
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)


def _zoom_blur(x: np.ndarray, c: Tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    # ImageNet-C: mean of the image and its centre zooms by np.arange(*c).
    # Zoom factors are relative, so this is size independent; the centre crop
    # is resized straight to H x W (the reference zooms with scipy and crops).
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


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # PIL BOX down-sampling then NEAREST up-sampling; INTER_AREA is the box
    # filter in OpenCV, INTER_NEAREST_EXACT is the pixel-centre aligned nearest
    # neighbour of PIL (plain INTER_NEAREST is shifted by half a pixel).
    h, w = x.shape[:2]
    small = cv2.resize(x, (max(1, int(w * c)), max(1, int(h * c))), interpolation=cv2.INTER_AREA)
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
}

#: Names accepted by :func:`corrupt`, in a stable order.
CORRUPTIONS: Tuple[str, ...] = tuple(_FUNCS)

#: Corruptions whose output depends on ``seed``.
RANDOM_CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur",
)


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


def corrupt(image: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to an RGB image.

    Args:
        image: ``Tensor[3, H, W]`` float RGB in ``[0, 1]`` (any device).
        name: one of :data:`CORRUPTIONS`.
        severity: integer in 1..5.
        seed: seed of the local random generator; same inputs and seed give
            the same output.

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


class Corrupt:
    """Dataset transform: ``(image, target) -> (corrupt(image), target)``.

    The per-image seed is derived from ``seed`` and ``target["image_id"]``
    (when present), so the corruption of a given image is reproducible and
    independent of loading order / worker count, while different images get
    different noise.  Without an ``image_id`` the base ``seed`` is used.  The
    target is returned unchanged (corruptions are photometric or
    geometry-preserving).
    """

    def __init__(self, name: str, severity: int, seed: int = 0) -> None:
        self.severity = _check(name, severity)
        self.name = name
        self.seed = int(seed)

    def seed_for(self, target: Any) -> int:
        if isinstance(target, dict) and target.get("image_id") is not None:
            return _image_seed(self.seed, target["image_id"])
        return self.seed

    def __call__(self, image: Tensor, target: Any = None):
        return corrupt(image, self.name, self.severity, self.seed_for(target)), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, severity={self.severity}, seed={self.seed})"
