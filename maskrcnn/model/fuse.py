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

from .backbone import FREEZE_ORDER, FrozenBatchNorm2d
from .winograd import winograd_convs

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
    if isinstance(fused, FrozenBNConv2d):  # folded live (fold_frozen_batchnorm_live): a plain conv from here on
        fused.__class__ = nn.Conv2d
        del fused._bn
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


class FrozenBNConv2d(nn.Conv2d):
    """A convolution followed by its FrozenBatchNorm2d, computed as one convolution with bias during training
    too: conv(x, W * s) + (b * s + shift), where s and shift come from the BatchNorm's buffers at every call.
    The weight stays the trained parameter (its gradient flows through the product, a weight-sized
    operation), so this saves the BatchNorm's pass over the activations in the forward and its pass in the
    backward. The state dict is the conv's and the BatchNorm's own, under their own names: the BatchNorm stays
    in place, switched to the identity (`folded`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._bn[0].scale_shift()
        bias = shift if self.bias is None else self.bias * scale + shift
        weight = self.weight * scale.to(self.weight.dtype)[:, None, None, None]
        return self._conv_forward(x, weight, bias.to(weight.dtype))


def fold_frozen_batchnorm_live(model: nn.Module, parents=None, plain_only: bool = False) -> int:
    """In place: every Conv2d followed by a FrozenBatchNorm2d (found as fold_batchnorm finds pairs) becomes a
    FrozenBNConv2d over the same parameters and the BatchNorm an identity, for training and inference alike
    (model.backbone.fold_frozen_bn). `parents`: only the pairs that are children of these modules (default: every
    module of `model`); `plain_only`: only plain nn.Conv2d (Winograd's convolutions keep their own computation).
    Returns the number of pairs folded."""
    n = 0
    for parent in list(model.modules()) if parents is None else parents:
        for conv_name, bn_name in _pairs(parent):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if not isinstance(bn, FrozenBatchNorm2d) or isinstance(conv, FrozenBNConv2d):
                continue
            if plain_only and type(conv) is not nn.Conv2d:
                continue
            conv.__class__ = FrozenBNConv2d  # the same object, parameters and hooks: only its forward changes
            conv._bn = [bn]  # a list: not registered as a submodule, so the state dict keeps its keys
            bn.folded = True
            n += 1
    return n


def frozen_as_inference(model: nn.Module, setting, device) -> int:
    """In place, where `setting` resolves to true (train.frozen_as_inference; auto: an AVX2 or AVX-512 CPU, where
    channels-last gains: AVX2, the bottom-up pathway's forward in training, 2 x 512x512, 874 -> 742 and 932 -> 722
    ms in two runs, medians of 21; AVX-512 listed with it as for inference, ATen's scalar kernels not): the
    backbone's frozen stem and stages (ResNetBottomUp.frozen_stages, no gradient flows through them) computed as
    inference computes them, each FrozenBatchNorm2d inside its plain convolution (fold_frozen_batchnorm_live) and,
    in fp32 on a CPU, in channels-last memory format, their outputs given back in the standard layout. Call it
    after use_winograd (a folded convolution is not Winograd's) and not on a model in channels-last already.
    The same parameters and state dict; the outputs equal to float rounding. Returns the number of convolutions
    folded."""
    bottom_up = getattr(model, "bottom_up", None)
    if not _where_measured(setting, device, CHANNELS_LAST_CAPABILITIES, "frozen_as_inference") or not \
            hasattr(bottom_up, "frozen_stages"):
        return 0
    frozen = bottom_up.frozen_stages()
    parents = [bottom_up] if frozen >= 1 else []  # the stem's conv1 / bn1 pair
    parents += [m for names in FREEZE_ORDER[1:frozen] for name in names for m in getattr(bottom_up, name).modules()]
    n = fold_frozen_batchnorm_live(bottom_up, parents, plain_only=True)
    bottom_up.frozen_channels_last = frozen > 0
    return n


def _where_measured(setting, device, capabilities: tuple[str, ...], key: str) -> bool:
    """A Switch (true / false / auto) resolved for `device`: true / false as given; auto: on a CPU whose capability
    (torch.backends.cpu.get_cpu_capability()) is in `capabilities`, never on CUDA. Any other value is an error."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"{key}: {setting!r} is not true, false or auto")
    return torch.device(device).type == "cpu" and torch.backends.cpu.get_cpu_capability() in capabilities


# CPU capabilities where channels-last inference was measured to gain (fp32, BatchNorm folded, the benchmark's
# 512x512 batch of 2): AVX2 -9.5% and -11% (two runs), as training on AVX-512 gains 7-10%; with ATen's scalar
# kernels and oneDNN at SSE4.1 (`ATEN_CPU_CAPABILITY=default`) it lost 15%.
CHANNELS_LAST_CAPABILITIES = ("AVX2", "AVX512")


def inference_channels_last(setting, device) -> bool:
    """test.channels_last resolved for `device` (auto: where it was measured to gain, CHANNELS_LAST_CAPABILITIES)."""
    return _where_measured(setting, device, CHANNELS_LAST_CAPABILITIES, "channels_last")


# Where Winograd's 3x3 convolutions were measured to gain (model/winograd.py; fp32, channels-last inference and
# standard-layout training): AVX2, 256 channels 0.6-0.85x oneDNN's direct convolution's time, 512 channels 0.4x,
# 128 channels 0.5-0.85x, 64 channels 1.3-1.5x (hence WINOGRAD_MIN_CHANNELS). AVX-512 has the same kind of vector
# units and GEMM and is listed with it; with ATen's scalar kernels it was not measured, so auto leaves it off there.
WINOGRAD_CAPABILITIES = ("AVX2", "AVX512")
WINOGRAD_MIN_CHANNELS = 128


def resolve_winograd(setting, device) -> bool:
    """test.winograd / train.winograd resolved for `device` (auto: where it was measured to gain,
    WINOGRAD_CAPABILITIES). It computes in fp32 on a CPU only (elsewhere, and under autocast, the convolutions stay
    the plain ones whatever this says)."""
    return _where_measured(setting, device, WINOGRAD_CAPABILITIES, "winograd")


def use_winograd(model: nn.Module, setting, device) -> int:
    """In place, where `setting` resolves to true: the model's 3x3 convolutions (stride 1) of WINOGRAD_MIN_CHANNELS
    channels or more computed by Winograd's F(2x2, 3x3), forward and backward (model/winograd.py); the same
    parameters and state dict. Returns how many convolutions."""
    if not resolve_winograd(setting, device):
        return 0
    return winograd_convs([model], min_channels=WINOGRAD_MIN_CHANNELS)


def prepare_training(model: nn.Module, device, winograd="auto", frozen="auto", channels_last: bool = False
                     ) -> tuple[int, int]:
    """In place, the model as training runs it (train.py, the benchmarks), after it is on its device and in its
    memory format: Winograd's 3x3 convolutions as `winograd` says (train.winograd, use_winograd), then the frozen
    stages as inference computes them as `frozen` says (train.frozen_as_inference; not on a model in channels-last,
    `channels_last`: train.channels_last). Returns (Winograd's convolutions, folded convolutions)."""
    n = use_winograd(model, winograd, device)
    return n, (0 if channels_last else frozen_as_inference(model, frozen, device))


def prepare_inference(model: nn.Module, device, channels_last="auto", winograd="auto", inplace: bool = False
                      ) -> nn.Module:
    """The model as inference runs it (evaluate.py, infer.py, the benchmark): BatchNorm folded into the
    convolutions (fold_batchnorm), the weights in channels-last memory format as `channels_last` says
    (test.channels_last) and the 3x3 convolutions of 128 channels or more computed by Winograd's F(2x2, 3x3) as
    `winograd` says (test.winograd). The same outputs to float rounding, faster; for inference only."""
    model = fold_batchnorm(model, inplace=inplace)
    for m in model.modules():  # the layout is this function's choice for the whole model (frozen_as_inference)
        if getattr(m, "frozen_channels_last", False):
            m.frozen_channels_last = False
    if inference_channels_last(channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    use_winograd(model, winograd, device)
    return model
