"""Mapping detections back to the image that was passed in: rescale boxes, paste masks.

Shapes: D detections; masks [D, 1, M, M] probabilities in box coordinates; image (H, W).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .transform import resize_boxes


def _interp_weights(start: Tensor, end: Tensor, length: int, m: int) -> Tensor:
    """[D, length, m] bilinear weights taking the m mask cells of each box [start, end) to image pixels.

    Pixel p has centre p + 0.5; in mask-cell units its position is u = (p + 0.5 - start) / (end - start) * m
    - 0.5 (the align_corners=False convention). Linear interpolation with zero padding is the triangle
    kernel max(0, 1 - |u - j|) for cell j, so the weights are one broadcast expression, no loop.
    """
    pix = torch.arange(length, device=start.device, dtype=torch.float32) + 0.5
    scale = m / (end - start).clamp(min=1e-6)
    u = (pix[None, :] - start[:, None]) * scale[:, None] - 0.5  # [D, length]
    cells = torch.arange(m, device=start.device, dtype=torch.float32)
    return (1 - (u[:, :, None] - cells).abs()).clamp(min=0)  # [D, length, m]


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], chunk: int = 64) -> Tensor:
    """Paste [D, 1, M, M] mask probabilities into [D, 1, H, W] at `boxes` [D, 4] (image pixels).

    Bilinear sampling is separable, so each pasted mask is Wy @ mask @ Wx^T: two batched matmuls over all
    detections (no per-mask Python loop). Chunks bound the memory of the [D, H, W] output's temporaries.
    """
    h, w = image_size
    d, m = masks.shape[0], masks.shape[-1]
    out = masks.new_zeros((d, 1, h, w), dtype=torch.float32)
    for s in range(0, d, chunk):  # loop over chunks of detections, not over detections
        b = boxes[s : s + chunk].float()
        wy = _interp_weights(b[:, 1], b[:, 3], h, m)  # [d, H, M]
        wx = _interp_weights(b[:, 0], b[:, 2], w, m)  # [d, W, M]
        out[s : s + chunk, 0] = wy @ masks[s : s + chunk, 0].float() @ wx.transpose(1, 2)
    return out


def postprocess_detections(results: list[dict[str, Tensor]], resized_sizes: list[tuple[int, int]],
                           original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Boxes (and masks) from the resized frame to the frame of each input image."""
    out = []
    for r, resized, orig in zip(results, resized_sizes, original_sizes):
        r = dict(r)
        r["boxes"] = resize_boxes(r["boxes"], resized, orig)
        if "masks" in r:
            r["masks"] = paste_masks(r["masks"], r["boxes"], orig)
        out.append(r)
    return out
