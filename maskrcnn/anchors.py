"""Anchor generator: one anchor size per FPN level, several aspect ratios, on every feature-map cell.

Shapes: A = len(ratios) anchors per location; level i has Hi x Wi locations; anchors of a level are
[Hi * Wi * A, 4] xyxy pixels, ordered location-major (y, then x, then ratio), matching the RPN head's
[N, A, Hi, Wi] -> [N, Hi, Wi, A] flattening.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(size: float, ratios: Sequence[float], round_base: bool = False) -> Tensor:
    """[A, 4] anchors centred on (0, 0) of area size^2 and height/width = ratio."""
    ratios_t = torch.tensor(ratios, dtype=torch.float64)
    h_ratio = ratios_t.sqrt()
    ws = size / h_ratio  # w * h = size^2, h / w = ratio
    hs = size * h_ratio
    anchors = torch.stack((-ws, -hs, ws, hs), dim=1) / 2
    if round_base:  # torchvision rounds the base anchors to whole pixels
        anchors = anchors.round()
    return anchors.float()


class AnchorGenerator(nn.Module):
    def __init__(self, sizes: Sequence[float], ratios: Sequence[float], strides: Sequence[int],
                 round_base: bool = False, offset: float = 0.0):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per level: {len(sizes)} sizes for {len(strides)} strides")
        self.sizes = [float(s) for s in sizes]
        self.ratios = [float(r) for r in ratios]
        self.strides = [int(s) for s in strides]
        self.offset = offset
        self.num_anchors = len(self.ratios)  # A per location, the same on every level
        for i, size in enumerate(self.sizes):
            self.register_buffer(f"cell_{i}", cell_anchors(size, self.ratios, round_base), persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    def grid_anchors(self, level: int, height: int, width: int) -> Tensor:
        """[height * width * A, 4] anchors of one level; cached per (level, size, device)."""
        cell: Tensor = getattr(self, f"cell_{level}")
        key = (level, height, width, cell.device)
        if key not in self._cache:
            stride = self.strides[level]
            xs = (torch.arange(width, device=cell.device, dtype=torch.float32) + self.offset) * stride
            ys = (torch.arange(height, device=cell.device, dtype=torch.float32) + self.offset) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)  # [Hi*Wi, 1, 4]
            self._cache[key] = (shifts + cell[None]).reshape(-1, 4)  # broadcast: [Hi*Wi, A, 4] -> [Hi*Wi*A, 4]
        return self._cache[key]

    def forward(self, feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Feature sizes (Hi, Wi) per level -> list of [Hi * Wi * A, 4] anchors per level."""
        return [self.grid_anchors(i, h, w) for i, (h, w) in enumerate(feature_sizes)]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, ratios={self.ratios}, strides={self.strides}, offset={self.offset}"


def level_of_box_size(size: float, canonical: float = 224.0, k0: int = 4) -> int:
    """FPN level of a box of side `size` px (Lin et al. eq. 1), unclamped."""
    return int(math.floor(k0 + math.log2(size / canonical + 1e-8)))
