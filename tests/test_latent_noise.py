"""Tests for maskrcnn.model.latent_noise.LatentNoise: identity, train-only, the statistics of the
uniform_c5_per_position preset, shapes, seeding."""
from __future__ import annotations

import math

import pytest
import torch

from maskrcnn.model.latent_noise import LatentNoise


def features(n: int = 2, seed: int = 0, positive: bool = True, hw=(8, 10)) -> dict[str, torch.Tensor]:
    """A small bottom-up pyramid {"c2".."c5"}; positive values so out/in ratios are well defined."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    out = {}
    for i, (name, c) in enumerate((("c2", 4), ("c3", 6), ("c4", 8), ("c5", 5))):
        s = 2**i
        x = torch.rand(n, c, max(1, h * 4 // s), max(1, w * 4 // s), generator=g)
        out[name] = x + 0.5 if positive else x * 2 - 1
    return out


# ------------------------------------------------------------------------------------- identity / modes
def test_disabled_is_identity_same_objects():
    feats = features()
    noise = LatentNoise()  # default: disabled
    for training in (True, False):
        noise.train(training)
        out = noise(feats)
        assert out is feats or all(out[k] is feats[k] for k in feats)
        assert set(out) == set(feats)


def test_zero_strength_is_identity():
    feats = features()
    out = LatentNoise(enabled=True, strength=0.0)(feats)
    assert all(out[k] is feats[k] for k in feats)


def test_train_only_by_default():
    noise = LatentNoise.uniform_c5_per_position(seed=0)
    assert noise.train_only
    feats = features()
    noise.eval()
    out = noise(feats)
    assert all(out[k] is feats[k] for k in feats)
    noise.train()
    out = noise(feats)
    assert not torch.equal(out["c5"], feats["c5"])


def test_not_train_only_perturbs_in_eval():
    noise = LatentNoise(enabled=True, train_only=False, seed=0).eval()
    feats = features()
    out = noise(feats)
    assert not torch.equal(out["c5"], feats["c5"])


def test_input_not_modified_in_place():
    feats = features()
    before = {k: v.clone() for k, v in feats.items()}
    LatentNoise.uniform_c5_per_position(seed=0).train()(feats)
    for k in feats:
        assert torch.equal(feats[k], before[k])


# ----------------------------------------------------------------------------- uniform_c5_per_position
def test_seed_000_rule_preset_fields():
    n = LatentNoise.uniform_c5_per_position()
    assert n.enabled and n.levels == ("c5",) and n.mode == "multiplicative"
    assert n.distribution == "uniform" and n.strength == pytest.approx(0.2) and n.shape == "position"
    assert n.train_only


def test_seed_000_rule_factor_range_and_sharing():
    feats = features(n=3)
    noise = LatentNoise.uniform_c5_per_position(seed=1).train()
    out = noise(feats)
    # other levels untouched (same objects)
    for k in ("c2", "c3", "c4"):
        assert out[k] is feats[k]
    x, y = feats["c5"], out["c5"]
    assert y.shape == x.shape and y.dtype == x.dtype
    ratio = y / x  # [N, C, H, W]
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6
    # one value per spatial position: constant over N and C
    ref = ratio[:1, :1].expand_as(ratio)
    torch.testing.assert_close(ratio, ref, atol=1e-5, rtol=1e-5)
    # ... but not one value for the whole map
    assert ratio[0, 0].std() > 0.01


def test_seed_000_rule_statistics_on_big_map():
    x = torch.ones(1, 2, 256, 256)
    feats = {"c5": x}
    out = LatentNoise.uniform_c5_per_position(seed=123).train()(feats)["c5"]
    factor = out[0, 0]
    assert factor.min() >= 0.8 - 1e-6 and factor.max() <= 1.2 + 1e-6
    assert factor.mean().item() == pytest.approx(1.0, abs=0.005)
    assert factor.std().item() == pytest.approx(0.4 / math.sqrt(12), rel=0.03)
    # the range is actually used
    assert factor.min() < 0.81 and factor.max() > 1.19


def test_gradient_flows_through_noise():
    x = (torch.rand(2, 3, 4, 5) + 0.5).requires_grad_(True)
    out = LatentNoise.uniform_c5_per_position(seed=0).train()({"c5": x})["c5"]
    out.sum().backward()
    assert x.grad is not None
    assert x.grad.min() >= 0.8 - 1e-6 and x.grad.max() <= 1.2 + 1e-6


# -------------------------------------------------------------------------------------------- shapes
def _ratio(shape: str, mode: str = "multiplicative", distribution: str = "uniform", seed: int = 0):
    feats = features(n=3)
    noise = LatentNoise(enabled=True, levels=("c4",), mode=mode, distribution=distribution, strength=0.3,
                        shape=shape, seed=seed).train()
    out = noise(feats)
    x, y = feats["c4"], out["c4"]
    if mode == "multiplicative":
        return y / x
    return (y - x) / x.std()  # the additive noise relative to the feature's spread


def test_element_shape_varies_everywhere():
    r = _ratio("element")
    assert (r[0] - r[1]).abs().max() > 1e-3  # varies over N
    assert (r[:, 0] - r[:, 1]).abs().max() > 1e-3  # over C
    assert (r[..., 0, :] - r[..., 1, :]).abs().max() > 1e-3  # over H
    assert (r[..., 0] - r[..., 1]).abs().max() > 1e-3  # over W
    assert r.min() >= 0.7 - 1e-5 and r.max() <= 1.3 + 1e-5


def test_channel_shape_constant_over_n_h_w():
    r = _ratio("channel")
    ref = r[:1, :, :1, :1].expand_as(r)
    torch.testing.assert_close(r, ref, atol=1e-5, rtol=1e-5)
    assert r[0, :, 0, 0].std() > 1e-3  # varies over channels


def test_position_shape_constant_over_n_c():
    r = _ratio("position")
    torch.testing.assert_close(r, r[:1, :1].expand_as(r), atol=1e-5, rtol=1e-5)
    assert r[0, 0].std() > 1e-3


@pytest.mark.parametrize("shape", ["element", "position", "channel"])
def test_additive_relative_to_feature_std(shape):
    r = _ratio(shape, mode="additive")  # = noise, in units of std(x)
    assert r.abs().max() <= 0.3 + 1e-4
    assert r.abs().max() > 0.01
    if shape == "position":
        torch.testing.assert_close(r, r[:1, :1].expand_as(r), atol=1e-4, rtol=1e-4)
    if shape == "channel":
        torch.testing.assert_close(r, r[:1, :, :1, :1].expand_as(r), atol=1e-4, rtol=1e-4)


def test_gaussian_statistics():
    x = torch.ones(1, 1, 300, 300)
    noise = LatentNoise(enabled=True, levels=("c5",), distribution="gaussian", strength=0.1, seed=3).train()
    factor = noise({"c5": x})["c5"]
    assert factor.mean().item() == pytest.approx(1.0, abs=0.003)
    assert factor.std().item() == pytest.approx(0.1, rel=0.03)
    # Gaussian, not uniform: values beyond 1 +- strength occur
    assert ((factor - 1).abs() > 0.1).any()


def test_sample_shapes():
    x = torch.zeros(2, 3, 4, 5)
    for shape, size in (("element", (2, 3, 4, 5)), ("position", (1, 1, 4, 5)), ("channel", (1, 3, 1, 1))):
        assert LatentNoise(enabled=True, shape=shape, seed=0).sample(x).shape == size


def test_several_levels():
    feats = features()
    out = LatentNoise(enabled=True, levels=("c3", "c5"), seed=0).train()(feats)
    assert out["c2"] is feats["c2"] and out["c4"] is feats["c4"]
    assert not torch.equal(out["c3"], feats["c3"])
    assert not torch.equal(out["c5"], feats["c5"])


# ------------------------------------------------------------------------------------------- seeding
def _stream(noise: LatentNoise, steps: int = 3) -> list[torch.Tensor]:
    feats = features()
    return [noise(feats)["c5"] for _ in range(steps)]


def test_same_seed_same_sequence():
    a = _stream(LatentNoise.uniform_c5_per_position(seed=7).train())
    b = _stream(LatentNoise.uniform_c5_per_position(seed=7).train())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # a stream, not one value repeated
    assert not torch.equal(a[0], a[1])


def test_seeded_stream_independent_of_global_rng():
    noise = LatentNoise.uniform_c5_per_position(seed=7).train()
    torch.manual_seed(0)
    a = _stream(noise, 1)[0]
    noise.reset()
    torch.manual_seed(999)
    b = _stream(noise, 1)[0]
    assert torch.equal(a, b)


def test_different_seed_different_sequence():
    a = _stream(LatentNoise.uniform_c5_per_position(seed=7).train())
    b = _stream(LatentNoise.uniform_c5_per_position(seed=8).train())
    assert not torch.equal(a[0], b[0])


def test_reset_restarts_stream():
    noise = LatentNoise.uniform_c5_per_position(seed=5).train()
    first = _stream(noise)
    noise.reset()
    again = _stream(noise)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------- errors
def test_levels_not_passed_are_left_alone():
    """A site may pass some of the levels at a time (the roi site: "box", then "mask"); build_model checks the
    configured levels against the site's outputs (tests/test_model.py)."""
    noise = LatentNoise(enabled=True, levels=("c7", "c5"), seed=0).train()
    feats = features()
    out = noise(feats)
    assert set(out) == set(feats) and not torch.equal(out["c5"], feats["c5"])
    assert all(out[k] is feats[k] for k in ("c2", "c3", "c4"))


@pytest.mark.parametrize("kwargs", [{"mode": "divisive"}, {"distribution": "laplace"}, {"shape": "row"},
                                    {"strength": -0.1}])
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        LatentNoise(enabled=True, **kwargs)


def test_get_set_state_continues_the_stream():
    """A module given another's generator state draws what the other would have drawn next."""
    noise = LatentNoise.uniform_c5_per_position(seed=3).train()
    assert noise.get_state() == {}  # nothing drawn yet
    _stream(noise, 2)
    state = noise.get_state()
    assert set(state) == {"cpu"} and state["cpu"].dtype == torch.uint8
    expected = _stream(noise, 2)
    other = LatentNoise.uniform_c5_per_position(seed=3).train()
    other.set_state({k: v.clone() for k, v in state.items()})
    got = _stream(other, 2)
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    fresh = _stream(LatentNoise.uniform_c5_per_position(seed=3).train(), 1)[0]
    assert not torch.equal(got[0], fresh)  # the state mattered: not the start of the stream again
    other.set_state({})  # no state: the stream restarts from the seed
    assert torch.equal(_stream(other, 1)[0], fresh)


def test_set_state_needs_a_seed():
    assert LatentNoise.uniform_c5_per_position().get_state() == {}
    with pytest.raises(ValueError, match="no seed"):
        LatentNoise.uniform_c5_per_position().set_state({"cpu": torch.Generator().get_state()})
