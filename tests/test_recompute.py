"""model.backbone.recompute: ResNet stages whose activations are computed again in the backward pass instead of
kept (torch.utils.checkpoint). The same losses and gradients, fewer saved tensors, nothing changed in inference."""
from __future__ import annotations

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.model.build import build_model

from conftest import saved_bytes

SETS = ["model.backbone.weights=none", "model.backbone.depth=18", "model.backbone.freeze_at=1"]


def _model(recompute: str = "[]"):
    torch.manual_seed(0)
    return build_model(load_config("configs/torchvision_compat.yaml", SETS + [f"model.backbone.recompute={recompute}"]),
                       load_weights=False)


def test_same_gradients_fewer_saved_tensors():
    plain, rec = _model(), _model("[layer1,layer2,layer3,layer4]")
    rec.load_state_dict(plain.state_dict())
    assert rec.bottom_up.recompute == ("layer1", "layer2", "layer3", "layer4") and plain.bottom_up.recompute == ()
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, rec):
        model.train()
        out, saved = saved_bytes(lambda: model.bottom_up(x))
        sum(v.square().mean() for v in out.values()).backward()
        results.append((out, saved, {n: p.grad for n, p in model.bottom_up.named_parameters() if p.requires_grad}))
    (out_p, saved_p, grads_p), (out_r, saved_r, grads_r) = results
    for k in out_p:
        assert torch.equal(out_r[k], out_p[k])
    assert grads_p.keys() == grads_r.keys() and len(grads_p) > 0
    for n in grads_p:  # the same operations on the same values: equal, up to the order autograd sums in
        torch.testing.assert_close(grads_r[n], grads_p[n], rtol=1e-6, atol=1e-7 * grads_p[n].abs().max().item())
    # kept for the backward: the parameters and each stage's input instead of every activation inside
    assert saved_r < 0.6 * saved_p, (saved_r, saved_p)


def test_only_in_training_with_gradients():
    """In eval mode, or with gradients off, the stages run as they are (nothing to recompute); in training the
    stage's activations are not kept."""
    plain, rec = _model(), _model("[layer2]")
    rec.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 64, 64)
    saved = {}
    for mode in ("eval", "train"):
        for name, model in (("plain", plain), ("rec", rec)):
            model.train(mode == "train")
            out, saved[mode, name] = saved_bytes(lambda: model.bottom_up(x))
    assert saved["eval", "rec"] == saved["eval", "plain"]
    assert saved["train", "rec"] < saved["train", "plain"]
    with torch.no_grad():
        out_r, out_p = rec.bottom_up(x), plain.bottom_up(x)
    assert all(v.grad_fn is None for v in out_r.values())
    assert all(torch.equal(out_r[k], out_p[k]) for k in out_p)


def test_an_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match=r"model.backbone.recompute: unknown stage\(s\) \['res2'\]"):
        _model("[res2]")


def test_the_benchmark_builds_ours_so():
    """python -m maskrcnn.bench --recompute STAGES measures the trade: ours is built with those stages."""
    from maskrcnn import bench

    s = bench.Settings(depth=18, recompute=["layer4", "layer2"])
    assert bench.build_ours(s).bottom_up.recompute == ("layer2", "layer4")
    assert bench.build_ours(bench.Settings(depth=18, recompute=[])).bottom_up.recompute == ()
    # by default the benchmark measures what train.py trains: the config's stages
    assert bench.build_ours(bench.Settings(depth=18)).bottom_up.recompute == ("layer2", "layer3")


def test_recomputed_by_default_and_the_same_gradient_bits():
    """model.backbone.recompute defaults to layer2 and layer3; the backward runs the forward's own graph with the
    recomputed tensors, so every gradient is the same bits as without recomputation."""
    from maskrcnn.config import BackboneConfig

    assert BackboneConfig().recompute == ["layer2", "layer3"]
    default = build_model(load_config("configs/torchvision_compat.yaml", SETS), load_weights=False)
    assert default.bottom_up.recompute == ("layer2", "layer3")
    plain = _model()
    default.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (plain, default):
        model.train()
        sum(v.square().mean() for v in model.bottom_up(x).values()).backward()
        grads.append({n: p.grad for n, p in model.bottom_up.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_a_stage_whose_batchnorm_tracks_statistics_is_not_recomputed():
    """norm: bn in training: computing a stage again would move its running statistics a second time, so the stage
    runs as it is (the same statistics as without recomputation); in eval mode BatchNorm moves nothing."""
    from maskrcnn.model.backbone import ResNetBottomUp, updates_statistics

    torch.manual_seed(0)
    plain = ResNetBottomUp(depth=18, norm="bn", freeze_at=2)
    rec = ResNetBottomUp(depth=18, norm="bn", freeze_at=2, recompute=["layer2", "layer3"])
    rec.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    for model in (plain, rec):
        model.train()
        sum(v.square().mean() for v in model(x).values()).backward()
    for (name, a), b in zip(plain.state_dict().items(), rec.state_dict().values()):
        assert torch.equal(a, b), name  # running_mean, running_var, num_batches_tracked: moved once
    assert rec.layer2[0].bn1.num_batches_tracked.item() == 1
    assert updates_statistics(rec.layer2) and not updates_statistics(rec.layer1)  # layer1 frozen: FrozenBatchNorm2d
    rec.eval()
    assert not updates_statistics(rec.layer2)


def test_not_recomputed_under_cpu_bf16_autocast_unless_asked():
    """Under a CPU's bf16 autocast (train.cpu_amp) the stages run as they are by default (their activations are bf16
    there, and the step was measured faster without); model.backbone.recompute_under_cpu_amp=true recomputes them
    there too. In fp32 the default recomputes."""
    from maskrcnn.config import BackboneConfig

    assert BackboneConfig().recompute_under_cpu_amp is False
    plain = _model()
    default = _model("[layer2,layer3]")
    asked = build_model(load_config("configs/torchvision_compat.yaml", SETS + [
        "model.backbone.recompute=[layer2,layer3]", "model.backbone.recompute_under_cpu_amp=true"]), load_weights=False)
    assert not default.bottom_up.recompute_under_cpu_amp and asked.bottom_up.recompute_under_cpu_amp
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    saved = {}
    for name, model in (("plain", plain), ("default", default), ("asked", asked)):
        model.train()
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, saved[name, bf16] = saved_bytes(lambda: model.bottom_up(x))
    assert saved["default", False] < saved["plain", False]  # fp32: recomputed
    assert saved["default", True] == saved["plain", True]  # bf16 autocast: kept, as without recomputation
    assert saved["asked", True] < saved["plain", True]  # asked for: recomputed under bf16 too
