"""Tests for maskrcnn.evaluation.corruptions (ImageNet-C / COCO-C style corruptions)."""

from __future__ import annotations

import io
import random

import cv2
import numpy as np
import pytest
import torch

from maskrcnn.evaluation.corruptions import (
    CORRUPTIONS,
    RANDOM_CORRUPTIONS,
    Corrupt,
    corrupt,
    disk_kernel,
    motion_blur_kernel,
)

SEVERITIES = (1, 2, 3, 4, 5)
REQUIRED = (
    "gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "motion_blur",
    "defocus_blur", "brightness", "contrast", "jpeg_compression",
)
# change must grow strictly with every severity step
STRICT = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur",
    "brightness", "contrast",
)


def make_image(h: int = 96, w: int = 128) -> torch.Tensor:
    """Natural-looking synthetic RGB image: gradients, shapes, texture."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            0.25 + 0.5 * xx / w,
            0.2 + 0.6 * yy / h,
            0.5 + 0.25 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
        ],
        axis=-1,
    )
    img = np.ascontiguousarray(img)
    cv2.rectangle(img, (10 * w // 128, 12 * h // 96), (45 * w // 128, 50 * h // 96), (0.85, 0.2, 0.15), -1)
    cv2.circle(img, (90 * w // 128, 40 * h // 96), max(2, 18 * min(h, w) // 96), (0.1, 0.3, 0.8), -1)
    cv2.line(img, (5, 85 * h // 96), (w - 8, 60 * h // 96), (0.95, 0.95, 0.9), 2)
    tex = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.0)
    img = img + 0.15 * (tex[..., None] - tex.mean())
    ys, xs = slice(60 * h // 96, 90 * h // 96), slice(20 * w // 128, 60 * w // 128)
    img[ys, xs] += 0.2 * ((xx[ys, xs] // 4 + yy[ys, xs] // 4) % 2 - 0.5)[..., None]
    img = np.clip(img, 0.02, 0.95).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return make_image()


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- registry
def test_corruption_list():
    assert isinstance(CORRUPTIONS, tuple)
    assert all(isinstance(n, str) for n in CORRUPTIONS)
    assert len(set(CORRUPTIONS)) == len(CORRUPTIONS)
    for name in REQUIRED:
        assert name in CORRUPTIONS
    assert set(RANDOM_CORRUPTIONS) <= set(CORRUPTIONS)


# ------------------------------------------------------ per name & severity
@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_output_contract(image, name, severity):
    out = corrupt(image, name, severity, seed=0)
    assert out.shape == image.shape
    assert out.dtype == image.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert mad(out, image) > 0.005, "corruption left the image (almost) unchanged"
    # input not modified in place
    assert torch.equal(image, make_image())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_change_grows_with_severity(image, name):
    d = [mad(corrupt(image, name, s, seed=0), image) for s in SEVERITIES]
    assert d[-1] > d[0], d
    if name in STRICT:
        assert all(a < b for a, b in zip(d, d[1:])), d
    elif name == "pixelate":
        # The reference pixelate (PIL box down-sampling + nearest up-sampling)
        # is not monotone per step: non-integer factors (0.6, 0.4, 0.3)
        # misalign the blocks, so e.g. factor 0.6 can differ more from the
        # clean image than the exact 2x factor 0.5.  Only the overall trend
        # holds (checked above).
        pass
    else:
        assert all(a <= b for a, b in zip(d, d[1:])), d


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_given_seed(image, name):
    a = corrupt(image, name, 3, seed=7)
    b = corrupt(image, name, 3, seed=7)
    assert torch.equal(a, b)
    c = corrupt(image, name, 3, seed=8)
    if name in RANDOM_CORRUPTIONS:
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_global_rng_untouched(image, name):
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    corrupt(image, name, 2, seed=3)
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert py_state == random.getstate()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_small_and_odd_sizes(name):
    for h, w in ((5, 7), (33, 20)):
        x = make_image(h, w)
        out = corrupt(x, name, 5, seed=1)
        assert out.shape == (3, h, w)
        assert out.dtype == torch.float32
        assert 0.0 <= out.min().item() and out.max().item() <= 1.0


# ------------------------------------------------------------ input handling
def test_dtype_and_range_handling(image):
    out = corrupt(image.double(), "contrast", 2)
    assert out.dtype == torch.float32
    assert torch.allclose(out, corrupt(image, "contrast", 2), atol=1e-6)
    # out-of-range inputs are clamped to [0, 1] before corrupting
    wild = image * 3.0 - 1.0
    assert torch.equal(corrupt(wild, "brightness", 1), corrupt(wild.clamp(0, 1), "brightness", 1))


def test_rejects_bad_image():
    with pytest.raises(ValueError):
        corrupt(torch.rand(1, 8, 8), "contrast", 1)
    with pytest.raises(ValueError):
        corrupt(torch.rand(8, 8, 3), "contrast", 1)
    with pytest.raises(ValueError):
        corrupt(np.random.default_rng(0).random((3, 8, 8)), "contrast", 1)


def test_unknown_name_lists_valid_names(image):
    with pytest.raises(ValueError) as err:
        corrupt(image, "fancy_blur", 1)
    msg = str(err.value)
    assert "fancy_blur" in msg
    for name in CORRUPTIONS:
        assert name in msg


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3", None])
def test_bad_severity(image, severity):
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "gaussian_noise", severity)
    with pytest.raises(ValueError, match="severity"):
        Corrupt("gaussian_noise", severity)


def test_numpy_integer_severity(image):
    assert torch.equal(corrupt(image, "contrast", np.int64(3)), corrupt(image, "contrast", 3))


# --------------------------------------------- agreement with the definitions
def test_contrast_formula(image):
    c = [0.4, 0.3, 0.2, 0.1, 0.05]
    means = image.mean(dim=(1, 2), keepdim=True)
    for s in SEVERITIES:
        ref = ((image - means) * c[s - 1] + means).clamp(0, 1)
        assert torch.allclose(corrupt(image, "contrast", s), ref, atol=1e-6)


def test_brightness_matches_hsv_roundtrip(image):
    x = to_hwc(image).copy()
    x[0, 0] = 0.0  # black pixel: V = 0
    for s, c in zip(SEVERITIES, [0.1, 0.2, 0.3, 0.4, 0.5]):
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        ref = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)
        out = to_hwc(corrupt(torch.from_numpy(x.transpose(2, 0, 1).copy()), "brightness", s))
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_gaussian_noise_statistics():
    x = torch.full((3, 200, 200), 0.5)
    for s, c in zip((1, 2), (0.08, 0.12)):
        diff = corrupt(x, "gaussian_noise", s, seed=11) - x
        assert abs(diff.mean().item()) < 0.005
        assert diff.std().item() == pytest.approx(c, rel=0.03)


def test_shot_noise_statistics():
    x = torch.full((3, 200, 200), 0.5)
    for s, c in zip((1, 2), (60, 25)):
        out = corrupt(x, "shot_noise", s, seed=5)
        assert out.mean().item() == pytest.approx(0.5, abs=0.005)
        # poisson(x c) / c has variance x / c
        assert out.var().item() == pytest.approx(0.5 / c, rel=0.05)
        # values lie on the 1/c grid
        k = out * c
        assert torch.allclose(k, k.round(), atol=1e-4)


def test_impulse_noise_fraction(image):
    for s, c in zip(SEVERITIES, [0.03, 0.06, 0.09, 0.17, 0.27]):
        out = corrupt(image, "impulse_noise", s, seed=2)
        changed = out != image
        assert changed.float().mean().item() == pytest.approx(c, rel=0.1)
        vals = out[changed]
        assert bool(((vals == 0) | (vals == 1)).all())
        assert (vals == 1).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_jpeg_matches_pil(image):
    Image = pytest.importorskip("PIL.Image")
    u8 = np.rint(to_hwc(image) * 255).astype(np.uint8)
    xq = torch.from_numpy(u8.transpose(2, 0, 1) / 255.0).float()
    for s, q in zip(SEVERITIES, [25, 18, 15, 10, 7]):
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, "JPEG", quality=q)
        ref = np.asarray(Image.open(buf)).astype(np.float32) / 255.0
        out = to_hwc(corrupt(xq, "jpeg_compression", s))
        # same libjpeg quantisation tables and 4:2:0 subsampling as PIL;
        # allow for a different IDCT / upsampling implementation
        assert np.abs(out - ref).mean() < 2 / 255


def test_pixelate_matches_pil(image):
    Image = pytest.importorskip("PIL.Image")
    u8 = np.rint(to_hwc(image) * 255).astype(np.uint8)
    xq = torch.from_numpy(u8.transpose(2, 0, 1) / 255.0).float()
    im = Image.fromarray(u8)
    w, h = im.size
    for s, c in zip(SEVERITIES, [0.6, 0.5, 0.4, 0.3, 0.25]):
        ref = im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.NEAREST)
        ref = np.asarray(ref).astype(np.float32) / 255.0
        out = to_hwc(corrupt(xq, "pixelate", s))
        assert np.abs(out - ref).mean() < 0.01
        if s in (2, 5):  # exact integer factors: identical up to 8-bit rounding
            assert np.abs(out - ref).max() <= 1.01 / 255


def test_disk_kernel():
    # kernel sums: 1 while the disk stays inside its grid; for radius 8 / 10
    # the reference anti-aliasing blur reflects mass back in at the grid
    # border (kept for comparability with ImageNet-C / COCO-C).
    expected_sum = {3: 1.0, 4: 1.0, 6: 1.0, 8: 1.013, 10: 1.011}
    for radius, alias in [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)]:
        k = disk_kernel(radius, alias)
        assert k.shape[0] == k.shape[1] == 2 * max(8, radius) + 1
        assert k.sum() == pytest.approx(expected_sum[radius], abs=1e-3)
        assert k.min() >= 0.0
        np.testing.assert_allclose(k, k.T, atol=1e-7)
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)


@pytest.mark.parametrize("angle", [-45.0, -13.3, 0.0, 27.0, 44.9])
def test_motion_blur_kernel_is_shift_and_add(image, angle):
    radius, sigma = 10, 3
    k = motion_blur_kernel(radius, sigma, angle)
    assert k.sum() == pytest.approx(1.0, abs=1e-5)
    x = to_hwc(image)
    out = cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REPLICATE)
    # direct definition: weighted sum of edge-replicated shifted copies
    width = 2 * radius + 1
    w = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    w /= w.sum()
    pad = width
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, wd = x.shape[:2]
    ref = np.zeros_like(x)
    a = np.deg2rad(angle)
    for i in range(width):
        dy = int(np.ceil(i * np.sin(a) - 0.5))
        dx = int(np.ceil(i * np.cos(a) - 0.5))
        ref += w[i] * xp[pad + dy:pad + dy + h, pad + dx:pad + dx + wd]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_motion_blur_uses_seeded_angle(image):
    angle = np.random.default_rng(4).uniform(-45, 45)
    k = motion_blur_kernel(15, 5, angle)
    ref = cv2.filter2D(to_hwc(image), -1, k, borderType=cv2.BORDER_REPLICATE)
    out = to_hwc(corrupt(image, "motion_blur", 2, seed=4))
    np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-5)


def test_blurs_preserve_constant_image():
    x = torch.full((3, 40, 50), 0.3)
    for name in ("gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur", "pixelate"):
        for s in SEVERITIES:
            gain = float(disk_kernel(*[(8, 0.5), (10, 0.5)][s - 4]).sum()) \
                if name == "defocus_blur" and s >= 4 else 1.0
            assert torch.allclose(corrupt(x, name, s), x * gain, atol=1e-5), (name, s)


# ------------------------------------------------------------ the transform
def test_corrupt_transform(image):
    t = Corrupt("gaussian_noise", 3, seed=10)
    target = {"image_id": 42, "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]])}
    out, tgt = t(image, target)
    assert tgt is target
    assert out.shape == image.shape and out.dtype == torch.float32
    # reproducible per image, independent of call order
    out2, _ = Corrupt("gaussian_noise", 3, seed=10)(image, {"image_id": 42})
    assert torch.equal(out, out2)
    # image_id as a tensor gives the same seed
    out3, _ = t(image, {"image_id": torch.tensor([42])})
    assert torch.equal(out, out3)
    # different images / base seeds get different noise
    other_id, _ = t(image, {"image_id": 43})
    other_seed, _ = Corrupt("gaussian_noise", 3, seed=11)(image, target)
    assert not torch.equal(out, other_id)
    assert not torch.equal(out, other_seed)
    # per-image seed differs from the base seed
    assert not torch.equal(out, corrupt(image, "gaussian_noise", 3, seed=10))


def test_corrupt_transform_without_image_id(image):
    t = Corrupt("impulse_noise", 2, seed=5)
    out, tgt = t(image, {})
    assert tgt == {}
    assert torch.equal(out, corrupt(image, "impulse_noise", 2, seed=5))
    out_none, none = t(image, None)
    assert none is None
    assert torch.equal(out_none, out)
    # string ids are hashed deterministically
    a, _ = t(image, {"image_id": "000000397133.jpg"})
    b, _ = t(image, {"image_id": "000000397133.jpg"})
    assert torch.equal(a, b)


def test_corrupt_transform_deterministic_corruption(image):
    out, _ = Corrupt("contrast", 4, seed=0)(image, {"image_id": 3})
    assert torch.equal(out, corrupt(image, "contrast", 4))


def test_corrupt_transform_validates():
    with pytest.raises(ValueError, match="valid names"):
        Corrupt("snowstorm", 1)
    assert "motion_blur" in repr(Corrupt("motion_blur", 5, 1))
