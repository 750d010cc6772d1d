"""Feature Pyramid Network: lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs, and an
extra level P6 by max-pooling P5 (stride 2, kernel 1), as in Lin et al. 2017 and both references.

Shapes: {"c2".."c5"} [N, Ci, H/s, W/s] -> {"p2".."p6"} [N, 256, H/s, W/s] for s = 4, 8, 16, 32, 64.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    def __init__(self, *, in_channels: Sequence[int], in_features: Sequence[str], out_channels: int = 256):
        super().__init__()
        self.in_features = list(in_features)  # fine to coarse, e.g. c2..c5
        # Output names follow the input level numbers: c2 -> p2, ... plus one extra max-pooled level.
        levels = [int(name[1:]) for name in self.in_features]
        self.out_features = [f"p{k}" for k in levels] + [f"p{levels[-1] + 1}"]
        self.out_channels = out_channels
        # Names match torchvision's FeaturePyramidNetwork (inner = lateral, layer = output) for weight import.
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # kaiming_uniform(a=1) as both references
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        xs = [features[name] for name in self.in_features]
        top = self.inner_blocks[-1](xs[-1])
        outs = [self.layer_blocks[-1](top)]
        for i in range(len(xs) - 2, -1, -1):  # coarse to fine
            lateral = self.inner_blocks[i](xs[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.layer_blocks[i](top))
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))  # P6
        return dict(zip(self.out_features, outs))
