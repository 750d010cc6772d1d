"""Matcher: assign each prediction (anchor or proposal) to a ground-truth box by IoU.

Shapes: M ground-truth boxes, N predictions; `iou` is [M, N]; the result is [N] indices into M, or one of
the negative constants below.
"""
from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1  # IoU < low: background
BETWEEN_THRESHOLDS = -2  # low <= IoU < high: ignored in the loss


class Matcher:
    def __init__(self, *, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high = high_threshold
        self.low = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """[M, N] IoU -> [N] int64 matched GT index (>= 0), BELOW_LOW_THRESHOLD or BETWEEN_THRESHOLDS."""
        m, n = iou.shape
        if n == 0:
            return torch.empty((0,), dtype=torch.int64, device=iou.device)
        if m == 0:  # no ground truth: everything is background
            return torch.full((n,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
        best_iou, matches = iou.max(dim=0)
        result = matches.clone()
        result[best_iou < self.low] = BELOW_LOW_THRESHOLD
        result[(best_iou >= self.low) & (best_iou < self.high)] = BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            # Every GT keeps the predictions that overlap it most (ties included), even below `high`,
            # so that a GT with no good anchor still gets a positive.
            best_per_gt = iou.max(dim=1, keepdim=True).values  # [M, 1]
            is_best = (iou == best_per_gt) & (best_per_gt > 0)
            pred_idx = is_best.any(dim=0).nonzero().squeeze(1)
            result[pred_idx] = matches[pred_idx]
        return result
