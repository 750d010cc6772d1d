"""Bilinear sampling along one axis, as RoIAlign defines it: where each bin's sample points fall, their two
neighbouring pixels and weights (torchvision's border rules: samples more than a pixel outside dropped, the
rest clamped). Shared by RoIAlign (roi_align.py) and the mask targets (mask_targets.py), which apply the same
rule to the feature maps and to the ground-truth masks.

Shape legend: K RoIs; `pooled` bins per RoI along the axis; a grid of `grid` samples per bin (one int, or one
per RoI when adaptive); T = sum over RoIs of pooled * grid sample positions.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

__all__ = ["axis_samples", "exclusive_cumsum", "segment_ids"]


def exclusive_cumsum(x: Tensor) -> Tensor:
    """[n] -> [n]: the sum of the elements before each one (0 first)."""
    return torch.cumsum(x, 0, dtype=x.dtype) - x


def segment_ids(counts: Tensor, total: int) -> Tensor:
    """[sum(counts)] segment id of each position, == arange(len(counts)).repeat_interleave(counts)."""
    if counts.numel() >= 16384:
        return torch.repeat_interleave(counts, output_size=total)
    # torch.repeat_interleave opens a parallel region even for tiny inputs,
    # which costs milliseconds on a busy CPU; for small segment counts mark
    # the segment starts and take a running sum instead (empty segments just
    # add more than one mark at the same position).
    marks = torch.zeros(total + 1, dtype=counts.dtype, device=counts.device)
    marks.index_add_(0, exclusive_cumsum(counts), torch.ones_like(counts))
    return torch.cumsum(marks[:total], 0, dtype=counts.dtype) - 1


def axis_samples(
    start: Tensor, bin_size: Tensor, grid: Union[int, Tensor], pooled: int, size: int, idt: torch.dtype
) -> Tuple[Tensor, Tensor]:
    """Sample coordinates along one axis and their two bilinear neighbours.

    start, bin_size: [K]; grid: an int (fixed sampling ratio) or Tensor[K] of
    per-RoI grid sizes (adaptive).  Returns ``(pos, weight)``, both [T, 2]:
    the low/high neighbour pixel (dtype idt) and its 1-D bilinear weight (zero
    for samples torchvision discards), T = sum_k pooled * grid_k, ordered
    (roi, bin, sample) -- for a fixed grid simply [K * pooled * grid, 2].
    """
    dt, dev = start.dtype, start.device
    if isinstance(grid, int):
        p = torch.arange(pooled, device=dev, dtype=dt).view(1, -1, 1)
        i = (torch.arange(grid, device=dev, dtype=dt) + 0.5).view(1, 1, -1)
        s, b = start.view(-1, 1, 1), bin_size.view(-1, 1, 1)
        # Same operation order as torchvision, so sample positions round identically.
        coord = ((s + p * b) + (i * b) / grid).reshape(-1)
    else:
        n = grid * pooled
        total = int(n.sum())
        roi = segment_ids(n, total)
        local = torch.arange(total, device=dev) - exclusive_cumsum(n).index_select(0, roi)
        g = grid.index_select(0, roi)
        p = torch.div(local, g, rounding_mode="floor")
        i = local - p * g
        b = bin_size.index_select(0, roi)
        coord = (start.index_select(0, roi) + p.to(dt) * b) + ((i.to(dt) + 0.5) * b) / g.to(dt)

    # torchvision drops samples more than one pixel outside the map (NaN
    # counts as outside here) and clamps the rest onto it.
    inside = (coord >= -1.0) & (coord <= size)
    valid = inside.to(dt)
    c = torch.where(inside, coord.clamp(min=0.0), torch.zeros_like(coord))  # in [0, size]
    lo = c.to(idt)  # c >= 0, so truncation == floor
    edge = lo >= size - 1
    lo = torch.where(edge, torch.full_like(lo, size - 1), lo)
    hi = torch.where(edge, lo, lo + 1)
    frac = torch.where(edge, torch.zeros_like(c), c - lo.to(dt))
    pos = torch.stack([lo, hi], dim=-1)
    weight = torch.stack([(1.0 - frac) * valid, frac * valid], dim=-1)
    return pos, weight
