"""Inference-only rewrites of a trained model that give the same outputs faster on a CPU.

`fold_batchnorm(model)`: every BatchNorm that directly follows a convolution (FrozenBatchNorm2d, or a trained
nn.BatchNorm2d in eval mode, whose running statistics are then constants too) is folded into that
convolution: W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), and the BatchNorm
becomes an Identity. A normalisation is an affine map per channel, so this is exact up to float rounding
(computed in float64), and it saves the one or two full passes over every convolution's output that the
BatchNorm costs (ResNet-50 has 53 of them).

Pairs are found by structure, not by tracing: in an nn.Sequential a Conv2d immediately followed by a
BatchNorm (torchvision's `downsample`), and elsewhere children named `conv<k>` and `bn<k>` (torchvision's
ResNet stem, BasicBlock and Bottleneck, whose forward applies bn<k> right after conv<k>).

The folded model is for inference: its state dict has no BatchNorm keys and conv biases instead, so save
and train the original. By default a copy is folded and returned, the model passed in is left as it is.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .backbone import FrozenBatchNorm2d

_BN_TYPES = (FrozenBatchNorm2d, nn.BatchNorm2d)


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) of the children of `parent` where the BatchNorm is applied right after the conv."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:])
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], _BN_TYPES)]
    out = []
    for name, child in children.items():
        m = re.fullmatch(r"conv(\d*)", name)
        if m and isinstance(child, nn.Conv2d) and isinstance(children.get(f"bn{m.group(1)}"), _BN_TYPES):
            out.append((name, f"bn{m.group(1)}"))
    return out


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The BatchNorm as y = x * scale + shift (float64)."""
    w, b = bn.weight, bn.bias
    mean, var = bn.running_mean.double(), bn.running_var.double()
    w = torch.ones_like(mean) if w is None else w.detach().double()
    b = torch.zeros_like(mean) if b is None else b.detach().double()
    scale = w * (var + bn.eps).rsqrt()
    return scale, b - mean * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to bn(conv(x)) for a BatchNorm with fixed statistics."""
    if isinstance(bn, nn.BatchNorm2d) and (bn.training or bn.running_mean is None):
        raise ValueError("fold_batchnorm: a BatchNorm2d in training mode (or without running statistics) "
                         "normalises by batch statistics and cannot be folded; call model.eval() first")
    scale, shift = _scale_shift(bn)
    weight = conv.weight.detach()
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter((weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype).contiguous(
        memory_format=torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last)
        and not weight.is_contiguous() else torch.contiguous_format), requires_grad=False)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    fused.bias = nn.Parameter((bias * scale + shift).to(weight.dtype), requires_grad=False)
    return fused


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` (a copy unless inplace) with every conv -> BatchNorm pair folded into one conv (see the module
    docstring). BatchNorms that follow no convolution, GroupNorm and everything else are left alone."""
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for conv_name, bn_name in _pairs(parent):
            fused = fold_conv_bn(getattr(parent, conv_name), getattr(parent, bn_name))
            setattr(parent, conv_name, fused)
            setattr(parent, bn_name, nn.Identity())
    return model

