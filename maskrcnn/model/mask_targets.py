"""Mask R-CNN's mask targets: the matched ground-truth mask, RoIAligned onto each foreground RoI's S x S grid.

Shapes: M ground-truth masks [M, H, W] uint8 of one image; F foreground RoIs with boxes [F, 4] xyxy (image
pixels) and matched_idx [F] (which mask each RoI learns); S the target side (28) -> [F, S, S] float32.

The target is defined as RoIAlign with adaptive sampling (`sampling_ratio=0`) of the full-resolution mask,
`roi_align(gt[:, None].float(), [matched_idx, box], (S, S), 1.0, 0, aligned)`, thresholded at 0.5 unless soft.
Built that way, RoIAlign materialises every sample of every RoI (about 4 x RoI area entries: 32 RoIs of
400 px took 1.3 s and 64 of them +1.1 GiB), and needs all M masks in float.

Here the same numbers are computed the cheap way. Bilinear sampling is separable and the average over a
bin's gh x gw sample grid is too, so for one RoI

    target = Ay @ mask @ Ax^T,   Ay [S, H]: row p = mean over bin p's y samples of their 1-D bilinear
                                 weights on the mask rows (Ax likewise for columns),

with torchvision's border rules (samples more than a pixel outside dropped, the rest clamped) folded into
Ay and Ax. Ay is banded (bin p only reads the ~2 gh rows under it), so both products are sparse bag-sums
(F.embedding_bag, as in maskrcnn.model.roi_align; the sample positions and weights of maskrcnn.model.sampling): first over the mask rows the RoIs read (only those rows
are converted to float), giving [F, S, W], then over its columns, giving [F, S, S]. Cost ~2 x RoI height x W
per RoI, memory F x S x W floats (RoIs processed in chunks above a budget), never an [entries, ...] buffer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling import axis_samples, exclusive_cumsum, segment_ids

__all__ = ["mask_targets"]

# Floats of the [chunk, S, W] intermediate at once (64 MB); more RoIs are processed in chunks.
MAX_INTERMEDIATE = 1 << 24


def _axis_entries(start: Tensor, bin_size: Tensor, size: int, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The banded averaging matrix of one axis as bag-sum entries, one bag per (RoI, bin), in that order.

    start, bin_size: [F] RoI start and bin size on this axis (mask pixels); length: H or W of the mask.
    Returns pos [E] (mask row / column read), weight [E], roi [E] (the RoI of each entry), offsets [F * size]."""
    grid = torch.ceil(bin_size).clamp(min=0).long()  # adaptive sampling: ceil(roi / S) samples per bin
    pos, weight = axis_samples(start, bin_size, grid, size, length, torch.int64)  # [T, 2]: (roi, bin, sample)
    n = grid * size  # samples of each RoI
    roi = segment_ids(n, int(n.sum()))
    weight = weight / grid.index_select(0, roi).clamp(min=1).to(weight.dtype)[:, None]  # the bin's mean
    offsets = exclusive_cumsum((2 * grid).repeat_interleave(size))  # 2 neighbours x grid samples per bin
    return pos.reshape(-1), weight.reshape(-1), roi.repeat_interleave(2), offsets


def _bag_sum(index: Tensor, table: Tensor, offsets: Tensor, weight: Tensor) -> Tensor:
    if index.numel() == 0:  # every RoI degenerate: no samples at all
        return table.new_zeros(offsets.numel(), table.shape[1])
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)


def mask_targets(gt_masks: Tensor, matched_idx: Tensor, boxes: Tensor, size: int, aligned: bool,
                 soft: bool = False, max_intermediate: Optional[int] = None) -> Tensor:
    """Mask targets of one image's foreground RoIs.

    Args:
        gt_masks: [M, H, W] uint8 (0/1) ground-truth masks (any dtype with values in 0..1 works).
        matched_idx: [F] int64, the mask each RoI is matched to.
        boxes: [F, 4] float xyxy RoI boxes in mask pixels.
        size: S, the side of the targets (28 for a 14x14 mask pooler).
        aligned: RoIAlign's half-pixel shift (detectron2 True, torchvision False).
        soft: keep the averaged values (torchvision) instead of thresholding them at >= 0.5 (detectron2).
        max_intermediate: floats of the [chunk, S, W] intermediate (default MAX_INTERMEDIATE); more RoIs go
            in chunks.

    Returns:
        [F, S, S] float32, equal (to float rounding) to RoIAlign(sampling_ratio=0) of the matched masks.
    """
    if gt_masks.dim() != 3:
        raise ValueError(f"gt_masks must be [M, H, W], got shape {tuple(gt_masks.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or matched_idx.shape != boxes.shape[:1]:
        raise ValueError(f"boxes must be [F, 4] with one matched_idx each, got boxes {tuple(boxes.shape)} "
                         f"and matched_idx {tuple(matched_idx.shape)}")
    num, dev = boxes.shape[0], gt_masks.device
    if num == 0:
        return torch.zeros(0, size, size, dtype=torch.float32, device=dev)
    _, H, W = gt_masks.shape
    rows = gt_masks.reshape(-1, W)  # [M * H, W], row m * H + y is row y of mask m
    b = boxes.detach().to(device=dev, dtype=torch.float32)
    matched = matched_idx.to(dev)
    # RoIAlign's geometry (maskrcnn.model.roi_align._geometry with spatial_scale 1).
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (b - offset).unbind(1)
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / size, roi_h / size

    limit = MAX_INTERMEDIATE if max_intermediate is None else max(1, int(max_intermediate))
    step = max(1, limit // (size * W))  # RoIs per chunk
    out = []
    for lo in range(0, num, step):  # one iteration per chunk of RoIs
        sl = slice(lo, lo + step)
        n = min(step, num - lo)
        # 1. rows: [n * S, W] = sum over each bin's y samples of weight x mask row, from the rows read only.
        ypos, yw, yroi, yoff = _axis_entries(y0[sl], bin_h[sl], size, H)
        flat_rows = matched[sl].index_select(0, yroi) * H + ypos
        read = torch.zeros(rows.shape[0], dtype=torch.bool, device=dev)
        read[flat_rows] = True  # no sort (torch.unique): mark the rows read, number them by a running sum
        needed = torch.nonzero(read).squeeze(1)
        local = (torch.cumsum(read, 0) - 1).index_select(0, flat_rows)
        table = rows.index_select(0, needed).to(torch.float32)  # [U, W]: the rows some RoI reads
        by_rows = _bag_sum(local, table, yoff, yw)  # [n * S, W] in (roi, p) order
        # 2. columns: [n * S, S] = sum over each bin's x samples, on the transposed [n * W, S] table.
        xpos, xw, xroi, xoff = _axis_entries(x0[sl], bin_w[sl], size, W)
        cols = by_rows.view(n, size, W).transpose(1, 2).reshape(n * W, size)  # [n * W, S(p)]
        t = _bag_sum(xroi * W + xpos, cols, xoff, xw)  # [n * S(q), S(p)]
        out.append(t.view(n, size, size).transpose(1, 2))  # [n, p, q]
    targets = torch.cat(out).contiguous()
    if soft:
        return targets
    return (targets >= 0.5).to(torch.float32)
