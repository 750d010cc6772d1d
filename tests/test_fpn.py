"""Tests for maskrcnn.model.fpn.FPN: output names, channels, strides, P6, and the top-down sum."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.model.fpn import FPN

IN_CHANNELS = [8, 16, 24, 32]
IN_FEATURES = ["c2", "c3", "c4", "c5"]
IMAGE_HW = (64, 96)


def bottom_up(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pyramid as a 64x96 input would give it: strides 4, 8, 16, 32."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    return {name: torch.randn(n, c, h // s, w // s, generator=g)
            for name, c, s in zip(IN_FEATURES, IN_CHANNELS, (4, 8, 16, 32))}


@pytest.mark.parametrize("out_channels", [256, 16])
def test_keys_channels_strides(out_channels):
    fpn = FPN(in_channels=IN_CHANNELS, in_features=IN_FEATURES, out_channels=out_channels)
    assert fpn.out_features == ["p2", "p3", "p4", "p5", "p6"]
    assert fpn.out_channels == out_channels
    out = fpn(bottom_up())
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    h, w = IMAGE_HW
    expected_hw = {"p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)}
    for name, stride in zip(out, (4, 8, 16, 32, 64)):
        assert out[name].shape == (2, out_channels, *expected_hw[name]), name
        # the size of level k is ceil(input / stride)
        assert out[name].shape[-2:] == (-(-h // stride), -(-w // stride)), name


def test_p6_is_strided_subsample_of_p5():
    fpn = FPN(in_channels=IN_CHANNELS, in_features=IN_FEATURES, out_channels=16)
    out = fpn(bottom_up())
    torch.testing.assert_close(out["p6"], F.max_pool2d(out["p5"], kernel_size=1, stride=2), atol=0, rtol=0)
    # kernel 1, stride 2 is exactly taking every other cell
    torch.testing.assert_close(out["p6"], out["p5"][..., ::2, ::2], atol=0, rtol=0)


def test_top_down_matches_reference():
    """P_k = out_k(lat_k(C_k) + nearest_up(top_{k+1})), computed here from the module's own convs."""
    torch.manual_seed(0)
    fpn = FPN(in_channels=IN_CHANNELS, in_features=IN_FEATURES, out_channels=16)
    with torch.no_grad():  # non-zero biases so a missing bias would show
        for m in fpn.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.normal_()
    feats = bottom_up()
    out = fpn(feats)
    xs = [feats[k] for k in IN_FEATURES]
    tops = [None] * 4
    tops[3] = fpn.inner_blocks[3](xs[3])
    for i in (2, 1, 0):
        lat = fpn.inner_blocks[i](xs[i])
        up = tops[i + 1].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # exact 2x nearest
        tops[i] = lat + up
    for i, name in enumerate(("p2", "p3", "p4", "p5")):
        torch.testing.assert_close(out[name], fpn.layer_blocks[i](tops[i]), atol=1e-5, rtol=1e-5)


def test_odd_sizes():
    """Inputs whose levels do not halve exactly (e.g. an unpadded image) still work."""
    fpn = FPN(in_channels=IN_CHANNELS, in_features=IN_FEATURES, out_channels=8)
    feats = {"c2": torch.randn(1, 8, 25, 19), "c3": torch.randn(1, 16, 13, 10),
             "c4": torch.randn(1, 24, 7, 5), "c5": torch.randn(1, 32, 4, 3)}
    out = fpn(feats)
    assert out["p2"].shape[-2:] == (25, 19)
    assert out["p5"].shape[-2:] == (4, 3)
    assert out["p6"].shape[-2:] == (2, 2)


def test_three_levels_names():
    fpn = FPN(in_channels=[16, 24, 32], in_features=["c3", "c4", "c5"], out_channels=8)
    assert fpn.out_features == ["p3", "p4", "p5", "p6"]
    feats = bottom_up()
    out = fpn({k: feats[k] for k in ("c3", "c4", "c5")})
    assert list(out) == ["p3", "p4", "p5", "p6"]


def test_gradients_reach_all_inputs():
    fpn = FPN(in_channels=IN_CHANNELS, in_features=IN_FEATURES, out_channels=8)
    feats = {k: v.requires_grad_(True) for k, v in bottom_up(n=1).items()}
    out = fpn(feats)
    sum(v.sum() for v in out.values()).backward()
    for k, v in feats.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k
