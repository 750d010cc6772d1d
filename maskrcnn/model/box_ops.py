"""Box helpers on xyxy pixel boxes: area, pairwise IoU, clipping, small-box filtering.

Shapes: boxes [B, 4] as (x1, y1, x2, y2); M, N numbers of boxes in two sets.
"""
from __future__ import annotations

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """[B, 4] -> [B]"""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _at_least_fp32(boxes: Tensor) -> Tensor:
    return boxes.float() if boxes.dtype in (torch.float16, torch.bfloat16) else boxes


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of [M, 4] and [N, 4] -> [M, N] (0 where a union is empty). Half-precision boxes are
    compared in fp32: bf16 holds 8 significant bits, so a 500 x 500 px area would be rounded to 1024 px^2."""
    a, b = _at_least_fp32(a), _at_least_fp32(b)
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])  # [M, N, 2]
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip [..., 4] boxes to an image of size (height, width)."""
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def nonempty(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """Mask [B] of boxes whose width and height are both > min_size."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return (w > min_size) & (h > min_size)
