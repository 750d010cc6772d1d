"""Tests for maskrcnn.model.box_coder: round trips, zero deltas, the dw/dh clamp, class-specific deltas."""
from __future__ import annotations

import math

import pytest
import torch

from maskrcnn.model.box_coder import DEFAULT_SCALE_CLAMP, BoxCoder


def random_boxes(n: int, seed: int, max_xy: float = 500.0, min_wh: float = 10.0, max_wh: float = 300.0):
    """Valid boxes; sides within a factor 30 of each other, so round trips stay inside the dw/dh clamp
    (exp(log(1000/16)) = 62.5)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * max_xy
    wh = min_wh + torch.rand(n, 2, generator=g) * (max_wh - min_wh)
    return torch.cat((xy, xy + wh), dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    coder = BoxCoder(weights=weights)
    ref = random_boxes(200, seed=0)
    tgt = random_boxes(200, seed=1)
    deltas = coder.encode(ref, tgt)
    assert deltas.shape == (200, 4)
    assert torch.isfinite(deltas).all()
    back = coder.decode(deltas, ref)
    assert back.shape == (200, 4)
    torch.testing.assert_close(back, tgt, atol=1e-3, rtol=1e-4)


def test_encode_by_hand():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    tgt = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), w 20, h 20
    expected = torch.tensor([[0.7, 0.2, math.log(2.0), 0.0]])
    torch.testing.assert_close(BoxCoder(weights=(1, 1, 1, 1)).encode(ref, tgt), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(BoxCoder(weights=(10, 10, 5, 5)).encode(ref, tgt),
                               expected * torch.tensor([10.0, 10.0, 5.0, 5.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_zero_deltas_gives_reference(weights):
    ref = random_boxes(50, seed=2)
    out = BoxCoder(weights=weights).decode(torch.zeros(50, 4), ref)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_encode_identity_is_zero():
    ref = random_boxes(30, seed=3)
    torch.testing.assert_close(BoxCoder(weights=(10, 10, 5, 5)).encode(ref, ref), torch.zeros(30, 4), atol=1e-5, rtol=0)


def test_default_clamp_value():
    assert DEFAULT_SCALE_CLAMP == pytest.approx(math.log(1000.0 / 16))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_huge_deltas_clamped_and_finite(weights):
    coder = BoxCoder(weights=weights)
    ref = torch.tensor([[10.0, 20.0, 26.0, 52.0]])  # w 16, h 32
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    out = coder.decode(deltas, ref)
    assert torch.isfinite(out).all()
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    # exp(log(1000 / 16)) * 16 = 1000 and * 32 = 2000
    assert w.item() == pytest.approx(1000.0, rel=1e-4)
    assert h.item() == pytest.approx(2000.0, rel=1e-4)
    # centre unchanged
    assert (out[0, 0] + out[0, 2]).item() / 2 == pytest.approx(18.0, abs=1e-2)
    assert (out[0, 1] + out[0, 3]).item() / 2 == pytest.approx(36.0, abs=1e-2)


def test_huge_deltas_fp16_input_decoded_in_fp32():
    coder = BoxCoder(weights=(1, 1, 1, 1))
    ref = random_boxes(8, seed=4)
    deltas = torch.full((8, 4), 60000.0, dtype=torch.float16)
    out = coder.decode(deltas, ref)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_class_specific_deltas_shape_and_values():
    k = 5
    coder = BoxCoder(weights=(10, 10, 5, 5))
    ref = random_boxes(7, seed=5)
    targets = [random_boxes(7, seed=10 + j) for j in range(k)]
    deltas = torch.cat([coder.encode(ref, t) for t in targets], dim=1)  # [R, 4k], class j at 4j:4j+4
    assert deltas.shape == (7, 4 * k)
    out = coder.decode(deltas, ref)
    assert out.shape == (7, 4 * k)
    for j in range(k):
        torch.testing.assert_close(out[:, 4 * j: 4 * j + 4], targets[j], atol=1e-3, rtol=1e-4)


def test_empty_decode():
    out = BoxCoder(weights=(1, 1, 1, 1)).decode(torch.zeros(0, 8), torch.zeros(0, 4))
    assert out.shape == (0, 8)


def test_decode_is_fp32_under_bf16_autocast_and_from_bf16_deltas():
    """Box decoding in fp32 whatever autocast and the deltas' dtype: bf16 deltas decode as their fp32 values."""
    coder = BoxCoder(weights=(10, 10, 5, 5))
    ref = random_boxes(50, seed=7)
    deltas = torch.randn(50, 8, generator=torch.Generator().manual_seed(8))
    expected = coder.decode(deltas, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = coder.decode(deltas, ref)
        from_bf16 = coder.decode(deltas.bfloat16(), ref)
        enc = coder.encode(ref, expected[:, :4])
    assert got.dtype == from_bf16.dtype == enc.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(from_bf16, coder.decode(deltas.bfloat16().float(), ref), atol=0, rtol=0)
    torch.testing.assert_close(enc, coder.encode(ref, expected[:, :4]), atol=0, rtol=0)
