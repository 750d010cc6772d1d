"""Mapping detections back to the image that was passed in: rescale boxes, paste masks.

Shapes: D detections; masks [D, 1, M, M] probabilities in box coordinates; image (H, W).

Two paste rules (config `model.roi_heads.mask_paste`):
  bilinear     sample the M x M mask at every pixel centre inside the float box (detectron2's rule);
  torchvision  torchvision's rule: pad the mask by one zero cell (M + 2), grow the box by (M + 2) / M about
               its centre, truncate it to integers, resize the padded mask to the integer box size
               (bilinear, align_corners=False, edge-clamped) and paste it at the box's integer corner.
Both are separable, so each pasted mask is Wy @ mask @ Wx^T: batched matmuls over chunks of detections, computed
only on a window around each box and copied into the zero image, one slice per detection.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import full_precision
from .transform import resize_boxes

# weights(pix [d, n] int64 image pixel indices, detection slice) -> [d, n, M] weights of the M mask cells
AxisWeights = Callable[[Tensor, slice], Tensor]


def _window(lo: Tensor, hi: Tensor, size: int) -> tuple[Tensor, int]:
    """One window length n for a chunk of detections and each one's start [d], such that the window
    [start, start + n) lies inside [0, size) and covers the detection's support [lo, hi) clipped to it.
    Starts are pushed back from the far edge rather than clipped, so no two window cells coincide."""
    lo, hi = lo.clamp(0, size), hi.clamp(0, size)
    n = max(1, int((hi - lo).max()))
    return lo.clamp(max=size - n), n


def _paste(masks: Tensor, support_y: tuple[Tensor, Tensor], support_x: tuple[Tensor, Tensor],
           weights_y: AxisWeights, weights_x: AxisWeights, image_size: tuple[int, int], chunk: int) -> Tensor:
    """Shared by both rules: masks [D, M', M'] fp32 -> [D, 1, H, W], each mask Wy @ mask @ Wx^T.

    Only the pixels around each detection's support ([lo, hi) per axis and detection) are computed:
    detections are sorted by support area and chunked, each chunk computes [d, n, nw] windows (n, nw the
    largest support of the chunk) in one batched product, and each window is copied into its detection's image
    as one slice. Computing full image rows instead costs W / box width more matmul and copy (3x for COCO-sized
    boxes at 800x1333). (The windows written by flat index instead, one index_copy_ per chunk, took 2.2x the
    time for boxes of 300-512 px at 512x512: the int64 index is twice the size of the window it writes.)
    Always fp32, even under autocast: mask probabilities are thresholded at 0.5 and bf16 would move that edge.
    """
    h, w = image_size
    d = masks.shape[0]
    out = masks.new_zeros((d, 1, h, w))
    if d == 0:
        return out
    area = (support_y[1] - support_y[0]).clamp(min=0) * (support_x[1] - support_x[0]).clamp(min=0)
    order = area.argsort()  # similar sizes share a chunk: windows stay small
    with full_precision(out.device):
        for s in range(0, d, chunk):
            idx = order[s : s + chunk]  # [d] detections of this chunk
            y0, n = _window(support_y[0][idx], support_y[1][idx], h)
            x0, nw = _window(support_x[0][idx], support_x[1][idx], w)
            rows = y0[:, None] + torch.arange(n, device=out.device)  # [d, n] image rows of each window
            cols = x0[:, None] + torch.arange(nw, device=out.device)  # [d, nw] image columns
            crop = weights_y(rows, idx) @ masks[idx] @ weights_x(cols, idx).transpose(1, 2)  # [d, n, nw]
            for window, i, top, left in zip(crop, idx.tolist(), y0.tolist(), x0.tolist()):
                out[i, 0, top:top + n, left:left + nw] = window
    return out


def _interp_weights(start: Tensor, end: Tensor, pix: Tensor, m: int) -> Tensor:
    """[D, n, m] bilinear weights taking the m mask cells of each box [start, end) to image pixels pix [D, n].

    Pixel p has centre p + 0.5; in mask-cell units its position is u = (p + 0.5 - start) / (end - start) * m
    - 0.5 (the align_corners=False convention). Linear interpolation with zero padding is the triangle
    kernel max(0, 1 - |u - j|) for cell j, so the weights are one broadcast expression, no loop.
    """
    scale = m / (end - start).clamp(min=1e-6)
    u = (pix.to(torch.float32) + 0.5 - start[:, None]) * scale[:, None] - 0.5  # [D, n]
    cells = torch.arange(m, device=start.device, dtype=torch.float32)
    return (1 - (u[:, :, None] - cells).abs()).clamp(min=0)  # [D, n, m]


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], chunk: int = 8) -> Tensor:
    """Paste [D, 1, M, M] mask probabilities into [D, 1, H, W] at `boxes` [D, 4] (image pixels), sampling
    the mask bilinearly at every pixel centre (zero outside the mask)."""
    m = masks.shape[-1]
    b = boxes.float()
    # A pixel gets weight while u is in (-1, m): up to half a cell (plus a pixel for rounding) outside the box.
    half_cell_y = (b[:, 3] - b[:, 1]).clamp(min=0) / (2 * m)
    half_cell_x = (b[:, 2] - b[:, 0]).clamp(min=0) / (2 * m)
    support_y = ((b[:, 1] - half_cell_y).floor().long() - 1, (b[:, 3] + half_cell_y).ceil().long() + 1)
    support_x = ((b[:, 0] - half_cell_x).floor().long() - 1, (b[:, 2] + half_cell_x).ceil().long() + 1)
    return _paste(masks[:, 0].float(), support_y, support_x,
                  lambda pix, i: _interp_weights(b[i, 1], b[i, 3], pix, m),
                  lambda pix, i: _interp_weights(b[i, 0], b[i, 2], pix, m), image_size, chunk)


def _resize_weights(start: Tensor, length: Tensor, pix: Tensor, m: int) -> Tensor:
    """[D, n, m] weights of torchvision's paste along one axis (see paste_masks_torchvision).

    start [D] int64 integer box corner, length [D] int64 integer box size (>= 1), pix [D, n] image pixels.
    Pixel p is pixel j = p - start of the padded mask resized to `length`; outside 0 <= j < length it gets no
    weight. The source position is PyTorch's bilinear one, u = m / length * (j + 0.5) - 0.5 in fp32, and the
    weights the triangle max(0, 1 - |u - c|) over cells c. The kernel also clamps u and the neighbours to
    the mask, but that only ever moves weight between the zero border cells, so the result is the same.
    """
    j = pix - start[:, None]  # [D, n]
    inside = ((j >= 0) & (j < length[:, None])).to(torch.float32)
    scale = m / length.to(torch.float32)  # fp32 division, as the kernel's input_size / output_size
    u = scale[:, None] * (j.to(torch.float32) + 0.5) - 0.5  # [D, n]
    cells = torch.arange(m, device=start.device, dtype=torch.float32)
    return (1 - (u[:, :, None] - cells).abs()).clamp(min=0) * inside[:, :, None]  # [D, n, m]


def paste_masks_torchvision(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], chunk: int = 8) -> Tensor:
    """torchvision's paste of [D, 1, M, M] masks at `boxes` [D, 4] into [D, 1, H, W] (see the module doc).

    Same arithmetic as torchvision's expand_masks / expand_boxes / paste_mask_in_image, but batched: the
    resize to each integer box is written as the separable weights of _resize_weights.
    """
    m = masks.shape[-1]
    padded = F.pad(masks[:, 0].float(), (1, 1, 1, 1))  # [D, M+2, M+2], zero border
    scale = (m + 2) / m
    b = boxes.float()
    half_w = (b[:, 2] - b[:, 0]) * 0.5 * scale
    half_h = (b[:, 3] - b[:, 1]) * 0.5 * scale
    cx = (b[:, 2] + b[:, 0]) * 0.5
    cy = (b[:, 3] + b[:, 1]) * 0.5
    # Truncation toward zero (int64 cast), as torchvision: [D] integer corners and sizes.
    x0, x1 = (cx - half_w).to(torch.int64), (cx + half_w).to(torch.int64)
    y0, y1 = (cy - half_h).to(torch.int64), (cy + half_h).to(torch.int64)
    bw = (x1 - x0 + 1).clamp(min=1)
    bh = (y1 - y0 + 1).clamp(min=1)
    return _paste(padded, (y0, y0 + bh), (x0, x0 + bw),
                  lambda pix, i: _resize_weights(y0[i], bh[i], pix, m + 2),
                  lambda pix, i: _resize_weights(x0[i], bw[i], pix, m + 2), image_size, chunk)


PASTE_MODES = ("bilinear", "torchvision")


def postprocess_detections(results: list[dict[str, Tensor]], resized_sizes: list[tuple[int, int]],
                           original_sizes: list[tuple[int, int]], mask_paste: str = "bilinear"
                           ) -> list[dict[str, Tensor]]:
    """Boxes (and masks) from the resized frame to the frame of each input image."""
    if mask_paste not in PASTE_MODES:
        raise ValueError(f"unknown mask paste mode '{mask_paste}' ({' | '.join(PASTE_MODES)})")
    paste = paste_masks if mask_paste == "bilinear" else paste_masks_torchvision
    out = []
    for r, resized, orig in zip(results, resized_sizes, original_sizes):
        r = dict(r)
        r["boxes"] = resize_boxes(r["boxes"], resized, orig)
        if "masks" in r:
            r["masks"] = paste(r["masks"], r["boxes"], orig)
        out.append(r)
    return out
