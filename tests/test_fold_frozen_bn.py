"""model.backbone.fold_frozen_bn (maskrcnn/model/fuse.py: fold_frozen_batchnorm_live): each FrozenBatchNorm2d
computed inside its convolution, in training too. Same state dict, same outputs and gradients up to float
rounding, and the inference fold (fold_batchnorm) still applies on top."""
from __future__ import annotations

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.model.backbone import FrozenBatchNorm2d
from maskrcnn.model.build import build_model
from maskrcnn.model.fuse import FrozenBNConv2d, fold_batchnorm

SETS = ["model.backbone.weights=none", "model.backbone.depth=18", "model.backbone.freeze_at=2"]


def pair():
    """A model with random BatchNorm statistics and the same model with the fold (loaded from its state dict)."""
    torch.manual_seed(0)
    plain = build_model(load_config("configs/torchvision_compat.yaml", SETS), load_weights=False)
    for m in plain.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    folded = build_model(load_config("configs/torchvision_compat.yaml", SETS + ["model.backbone.fold_frozen_bn=true"]),
                         load_weights=False)
    folded.load_state_dict(plain.state_dict())
    return plain, folded


def test_same_state_dict_outputs_and_gradients():
    """In float64 the fold is the same function with the same gradients (to 1e-10: in float32 a ReLU input
    near 0 may flip with rounding and move a gradient element by ~1e-4 of the largest)."""
    plain, folded = pair()
    assert list(plain.state_dict()) == list(folded.state_dict())
    convs = [m for m in folded.bottom_up.modules() if isinstance(m, FrozenBNConv2d)]
    assert len(convs) == 20  # ResNet-18: the stem, 16 block convs, 3 downsamples
    assert not any(isinstance(m, FrozenBNConv2d) for m in plain.modules())
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    out_p, out_f = plain.bottom_up(x), folded.bottom_up(x)
    for k in out_p:  # float32
        torch.testing.assert_close(out_f[k], out_p[k], rtol=1e-5, atol=1e-5 * out_p[k].abs().max().item())
    plain, folded, x = plain.double(), folded.double(), x.double()
    out_p, out_f = plain.bottom_up(x), folded.bottom_up(x)
    sum(v.square().mean() for v in out_p.values()).backward()
    sum(v.square().mean() for v in out_f.values()).backward()
    grads_p = {n: p.grad for n, p in plain.bottom_up.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in folded.bottom_up.named_parameters() if p.requires_grad}
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > 0  # res3..res5 train, through the fold
    for n in grads_p:
        torch.testing.assert_close(grads_f[n], grads_p[n], rtol=1e-10, atol=1e-10 * grads_p[n].abs().max().item())


def test_a_changed_batchnorm_buffer_reaches_the_folded_conv():
    """The fold reads the BatchNorm's buffers at every call (loading new statistics changes the outputs)."""
    plain, folded = pair()
    x = torch.rand(1, 3, 64, 64)
    before = folded.bottom_up(x)["c2"]
    folded.bottom_up.bn1.running_var.mul_(4.0)
    plain.bottom_up.bn1.running_var.mul_(4.0)
    after = folded.bottom_up(x)["c2"]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain.bottom_up(x)["c2"], rtol=1e-5, atol=1e-5)


def test_inference_fold_on_top_gives_plain_convolutions():
    plain, folded = pair()
    fused = fold_batchnorm(folded).eval()
    assert not any(isinstance(m, (FrozenBNConv2d, FrozenBatchNorm2d)) for m in fused.bottom_up.modules())
    assert any(isinstance(m, FrozenBNConv2d) for m in folded.modules())  # the original is left as it was
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused.bottom_up(x)["c5"], plain.eval().bottom_up(x)["c5"], rtol=1e-4, atol=1e-4)
