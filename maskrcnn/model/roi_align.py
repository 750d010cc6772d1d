"""RoIAlign (Mask R-CNN, He et al. 2017) in plain PyTorch tensor ops.

Semantics are exactly those of ``torchvision.ops.roi_align`` (its CPU/CUDA
kernels), but nothing here calls torchvision.

Shape legend
    N  images in the batch           C  channels
    H, W  feature map height/width   K  number of RoIs
    oh, ow  output bins per RoI      B = K * oh * ow  (one "bag" per bin)
    gh, gw  sampling grid per bin (sampling_ratio, or adaptive per RoI)
    E  (bag, sample, neighbour) entries = sum over bins of 4 * gh * gw
    P = N * H * W  rows of the channels-last feature table

How it works
    Every output bin is a weighted sum of feature vectors: each of its
    gh * gw sample points is a bilinear blend of 4 pixels, and the bin
    averages its samples. So the whole op is a sparse [B, P] matrix times the
    dense [P, C] channels-last feature table. We build that matrix as E
    (row index, weight) pairs grouped into one bag per bin and evaluate it
    with ``F.embedding_bag(mode="sum", per_sample_weights=...)``, a fused
    gather-scale-reduce kernel that fetches contiguous C-vectors and never
    materialises [E, C]. The backward is the transposed product, done with
    the same kernel after sorting the entries by pixel row.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .sampling import axis_samples, exclusive_cumsum, segment_ids

__all__ = ["roi_align"]

BoxesT = Union[Tensor, Sequence[Tensor]]


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {size}")
    return size[0], size[1]


def _boxes_to_rois(boxes: BoxesT) -> Tensor:
    """Tensor[K, 5] or list of Tensor[L_i, 4] -> Tensor[K, 5] (batch idx, x1, y1, x2, y2)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ValueError(f"boxes tensor must have shape [K, 5], got {tuple(boxes.shape)}")
        return boxes
    boxes = list(boxes)
    for b in boxes:
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
            raise ValueError("each element of a boxes list must be a Tensor[L, 4]")
    if len(boxes) == 0:
        return torch.zeros(0, 5)
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids, 0), torch.cat(boxes, 0)], dim=1)


class _BagSum(torch.autograd.Function):
    """out[b] = sum_{e in bag b} weight[e] * feat[index[e]]   (a sparse [B, P] @ [P, C]).

    feat: [P, C]; index, weight: [E]; offsets: [B] first entry of each bag.
    bag_of: [E] bag id per entry, or None when every bag has exactly
    ``bag_len`` entries (then it is rebuilt cheaply in backward).
    Gradient only w.r.t. feat (torchvision does not differentiate w.r.t. boxes).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, feat: Tensor, index: Tensor, weight: Tensor, offsets: Tensor, bag_of: Optional[Tensor], bag_len: int
    ) -> Tensor:
        ctx.save_for_backward(index, weight, bag_of)
        ctx.num_rows, ctx.bag_len = feat.shape[0], bag_len
        if offsets.numel() == 0:  # no RoIs: embedding_bag cannot produce 0 bags
            return feat.new_zeros(0, feat.shape[1])
        return F.embedding_bag(index, feat, offsets, mode="sum", per_sample_weights=weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        index, weight, bag_of = ctx.saved_tensors
        P, C = ctx.num_rows, grad_out.shape[1]
        if index.numel() == 0:
            return grad_out.new_zeros(P, C), None, None, None, None, None
        grad_feat = _bag_sum_transposed(index, weight, bag_of, ctx.bag_len, grad_out, (0, P))
        return grad_feat, None, None, None, None, None


# (index, weight) entries built at once. Larger inputs (big RoIs with adaptive sampling: a 400 px RoI at full
# resolution has ~640k entries) are processed in chunks of whole RoIs, and the backward rebuilds each chunk's
# entries instead of keeping them all, so memory stays at roughly 40 bytes x MAX_ENTRIES whatever the input.
MAX_ENTRIES = 1 << 23


def _geometry(rois: Tensor, oh: int, ow: int, spatial_scale: float, aligned: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """[K, 5] rois -> (start_h, start_w, bin_h, bin_w), each [K], in feature-map pixels."""
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = (rois[:, 3] * spatial_scale - offset) - start_w
    roi_h = (rois[:, 4] * spatial_scale - offset) - start_h
    if not aligned:  # legacy behaviour: force malformed RoIs to 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    return start_h, start_w, roi_h / oh, roi_w / ow


def _entries_per_roi(bin_h: Tensor, bin_w: Tensor, oh: int, ow: int, sampling_ratio: int) -> Tensor:
    """[K] int64 number of (bag, sample, neighbour) entries of each RoI."""
    if sampling_ratio > 0:
        return torch.full_like(bin_h, 4 * oh * ow * sampling_ratio ** 2, dtype=torch.int64)
    gh = torch.ceil(bin_h).clamp(min=0).long()
    gw = torch.ceil(bin_w).clamp(min=0).long()
    return 4 * oh * ow * gh * gw


def _build_entries(rois: Tensor, oh: int, ow: int, spatial_scale: float, sampling_ratio: int, aligned: bool,
                   N: int, H: int, W: int, num_entries: int, need_bag_of: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], int]:
    """The sparse [K*oh*ow, N*H*W] RoIAlign matrix as (index, weight, offsets, bag_of, bag_len) for _BagSum."""
    dev, cdt = rois.device, rois.dtype
    K = rois.shape[0]
    start_h, start_w, bin_h, bin_w = _geometry(rois, oh, ow, spatial_scale, aligned)
    # int32 index arithmetic / gathers / sort are ~2-4x faster than int64 on CPU.
    idt = torch.int32 if max(num_entries, N * H * W) < 2**31 - 1 else torch.int64
    base = rois[:, 0].to(idt) * (H * W)  # first row of each RoI's image in `feat`

    bag_of: Optional[Tensor] = None
    bag_len = 0
    if sampling_ratio > 0:
        g = int(sampling_ratio)
        m = 4 * g * g  # entries per bag: g*g samples x 4 neighbours
        ypos, yw = axis_samples(start_h, bin_h, g, oh, H, idt)
        xpos, xw = axis_samples(start_w, bin_w, g, ow, W, idt)
        # [K, oh, 2g] row starts and [K, ow, 2g] columns; broadcast to
        # [K, oh, ow, 2g, 2g]: every (y neighbour, x neighbour) pair of a bin.
        yrow = (base.view(-1, 1, 1) + ypos.view(K, oh, 2 * g) * W).view(K, oh, 1, 2 * g, 1)
        ywt = (yw.view(K, oh, 2 * g) / float(g * g)).view(K, oh, 1, 2 * g, 1)
        index = (yrow + xpos.view(K, 1, ow, 1, 2 * g)).reshape(-1)
        weight = (ywt * xw.view(K, 1, ow, 1, 2 * g)).reshape(-1)
        offsets = torch.arange(0, num_entries, m, device=dev, dtype=idt)
        bag_len = m
        return index, weight, offsets, bag_of, bag_len

    gh = torch.ceil(bin_h).clamp(min=0).long()
    gw = torch.ceil(bin_w).clamp(min=0).long()
    # Adaptive grids differ per RoI, so the entries are ragged. Build them
    # in two ragged levels without any Python loop over RoIs:
    #   bag (k, ph, pw) -> its 2*gh y-neighbour "rows" -> 2*gw x-neighbours.
    ypos, yw = axis_samples(start_h, bin_h, gh, oh, H, idt)
    xpos, xw = axis_samples(start_w, bin_w, gw, ow, W, idt)
    ypos, yw, xpos, xw = ypos.reshape(-1), yw.reshape(-1), xpos.reshape(-1), xw.reshape(-1)
    gh, gw = gh.to(idt), gw.to(idt)
    inv_count = 1.0 / (gh * gw).clamp(min=1).to(cdt)
    # Where each RoI's block starts in the flat y / x tables.
    y_start = exclusive_cumsum(2 * oh * gh)
    x_start = exclusive_cumsum(2 * ow * gw)

    # Bag level, [B] in (k, ph, pw) order.
    k_b = torch.arange(K, device=dev, dtype=idt).view(K, 1, 1).expand(K, oh, ow).reshape(-1)
    ph_b = torch.arange(oh, device=dev, dtype=idt).view(1, oh, 1).expand(K, oh, ow).reshape(-1)
    pw_b = torch.arange(ow, device=dev, dtype=idt).view(1, 1, ow).expand(K, oh, ow).reshape(-1)
    gh_b, gw_b = gh.index_select(0, k_b), gw.index_select(0, k_b)
    y0_b = y_start.index_select(0, k_b) + ph_b * (2 * gh_b)  # first y entry of the bag
    x0_b = x_start.index_select(0, k_b) + pw_b * (2 * gw_b)  # first x entry of the bag
    wt_b = inv_count.index_select(0, k_b)
    base_b = base.index_select(0, k_b)

    # Row level: one per (bag, y neighbour), R = sum_b 2 * gh_b.
    num_rows = int(2 * oh * ow * gh.sum())
    bag_r = segment_ids(2 * gh_b, num_rows)
    # yi = y0 of the bag + position within the bag, folded into one gather.
    y_shift = y0_b - exclusive_cumsum(2 * gh_b)
    yi = torch.arange(num_rows, device=dev, dtype=idt) + y_shift.index_select(0, bag_r)
    row_base = base_b.index_select(0, bag_r) + ypos.index_select(0, yi) * W
    row_wt = yw.index_select(0, yi) * wt_b.index_select(0, bag_r)
    row_len = 2 * gw_b.index_select(0, bag_r)

    # Entry level: one per (row, x neighbour), E = sum_r row_len.
    row_e = segment_ids(row_len, num_entries)
    # xi = x0 of the bag + position within the row, folded into one gather.
    x_shift = x0_b.index_select(0, bag_r) - exclusive_cumsum(row_len)
    xi = torch.arange(num_entries, device=dev, dtype=idt) + x_shift.index_select(0, row_e)
    index = row_base.index_select(0, row_e) + xpos.index_select(0, xi)
    weight = row_wt.index_select(0, row_e) * xw.index_select(0, xi)
    if need_bag_of:  # only the backward needs it
        bag_of = bag_r.index_select(0, row_e)
    offsets = exclusive_cumsum(4 * gh_b * gw_b)
    return index, weight, offsets, bag_of, bag_len


def _bag_sum_transposed(index: Tensor, weight: Tensor, bag_of: Optional[Tensor], bag_len: int, grad_out: Tensor,
                        rows: Tuple[int, int]) -> Tensor:
    """grad_feat[rows[0]:rows[1]] = sum over entries e reading that row of weight[e] * grad_out[bag e].

    The transpose of a bag-sum is again a bag-sum: group the entries by the feature row they read (sort) and
    sum the weighted output grads of their bags. Avoids both an [E, C] buffer and scatter-add atomics."""
    if bag_of is None:
        bag_of = torch.arange(index.numel(), device=index.device, dtype=index.dtype) // bag_len
    sorted_index, order = torch.sort(index)
    # first entry of every feature row in the range (rows nobody reads get empty bags)
    row_ids = torch.arange(rows[0], rows[1], device=index.device, dtype=index.dtype)
    row_offsets = torch.searchsorted(sorted_index, row_ids, out_int32=index.dtype == torch.int32)
    return F.embedding_bag(
        bag_of.index_select(0, order),
        grad_out.contiguous(),
        row_offsets,
        mode="sum",
        per_sample_weights=weight.index_select(0, order),
    )


class _ChunkedRoIAlign(torch.autograd.Function):
    """RoIAlign over chunks of RoIs whose entries are built, used and freed one chunk at a time, in the forward
    and again in the backward (nothing but the RoIs is saved), so memory does not grow with the input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, feat: Tensor, rois: Tensor, bounds: List[int], counts: List[int], shape: Tuple[int, int, int],
        args: Tuple[int, int, float, int, bool]
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.bounds, ctx.counts, ctx.shape, ctx.args = bounds, counts, shape, args
        N, H, W = shape
        outs = []
        for lo, hi, n in zip(bounds[:-1], bounds[1:], counts):
            index, weight, offsets, _, _ = _build_entries(rois[lo:hi], *args, N, H, W, n, need_bag_of=False)
            outs.append(F.embedding_bag(index, feat, offsets, mode="sum", per_sample_weights=weight))
            del index, weight, offsets
        return torch.cat(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        N, H, W = ctx.shape
        oh, ow = ctx.args[0], ctx.args[1]
        grad_feat = grad_out.new_zeros(N * H * W, grad_out.shape[1])
        for lo, hi, n in zip(ctx.bounds[:-1], ctx.bounds[1:], ctx.counts):
            index, weight, _, bag_of, bag_len = _build_entries(rois[lo:hi], *ctx.args, N, H, W, n, need_bag_of=True)
            if index.numel() == 0:
                continue
            first, last = int(index.min()), int(index.max()) + 1  # rows this chunk reads (often one image)
            grad_feat[first:last] += _bag_sum_transposed(index, weight, bag_of, bag_len,
                                                         grad_out[lo * oh * ow: hi * oh * ow], (first, last))
            del index, weight, bag_of
        return grad_feat, None, None, None, None, None


def _chunks(counts: Tensor, max_entries: int) -> Tuple[List[int], List[int]]:
    """Split RoIs into consecutive chunks of at most ~max_entries entries (a single bigger RoI is its own
    chunk). Returns the chunk boundaries [0, ..., K] and the entries of each chunk."""
    ends = torch.cumsum(counts, 0)
    chunk = torch.div(ends - counts, max_entries, rounding_mode="floor")  # chunk of each RoI (non-decreasing)
    firsts = torch.nonzero(chunk[1:] != chunk[:-1]).squeeze(1) + 1
    bounds = [0] + firsts.tolist() + [counts.numel()]
    ends_list = ends.tolist()
    totals = [ends_list[b - 1] - (ends_list[a - 1] if a > 0 else 0) for a, b in zip(bounds[:-1], bounds[1:])]
    return bounds, totals


def roi_align(
    input: Tensor,
    boxes: BoxesT,
    output_size: Union[int, Tuple[int, int], List[int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    max_entries: Optional[int] = None,
) -> Tensor:
    """RoIAlign with average pooling, identical in semantics to ``torchvision.ops.roi_align``.

    Args:
        input: Tensor[N, C, H, W] feature map (float32/float64/float16/bfloat16).
        boxes: Tensor[K, 5] of (batch index, x1, y1, x2, y2), or a list of N
            Tensor[L_i, 4] of (x1, y1, x2, y2), one per image. Any float dtype:
            float32 boxes with float16/bfloat16 features keep their precision
            (coordinates are always computed in float32 or better).
        output_size: int or (oh, ow) bins per RoI.
        spatial_scale: factor mapping box coordinates to feature-map coordinates.
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive,
            ceil(roi_h / oh) x ceil(roi_w / ow) per RoI.
        aligned: if True, shift boxes by -0.5 pixel (Detectron2 convention)
            and do not force RoIs to be at least 1x1.
        max_entries: sparse-matrix entries built at once (default MAX_ENTRIES);
            above it the RoIs are processed in chunks, forward and backward.

    Returns:
        Tensor[K, C, oh, ow] in the dtype of ``input``, channels-last strided. Differentiable w.r.t.
        ``input`` (not w.r.t. boxes, like torchvision).
    """
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got {tuple(input.shape)}")
    oh, ow = _pair(output_size)
    N, C, H, W = input.shape
    dev = input.device
    # Half types: gather/accumulate in float32 for accuracy; fp64 stays fp64.
    cdt = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype

    # Only the RoIs are cast: float32 (or float16) boxes become cdt, never rounded to the features' half type.
    rois = _boxes_to_rois(boxes).detach().to(device=dev, dtype=cdt)
    K = rois.shape[0]

    # Channels-last table: each gathered row is one contiguous C-vector.
    # (No copy at all if the caller already uses channels_last.)
    feat = input.permute(0, 2, 3, 1)
    if cdt == input.dtype:
        feat = feat.contiguous().view(N * H * W, C)
    else:  # cast and transpose in a single copy
        feat = feat.to(cdt, memory_format=torch.contiguous_format).view(N * H * W, C)

    _, _, bin_h, bin_w = _geometry(rois, oh, ow, spatial_scale, aligned)
    counts = _entries_per_roi(bin_h, bin_w, oh, ow, sampling_ratio)
    num_entries = int(counts.sum())
    limit = MAX_ENTRIES if max_entries is None else max(1, int(max_entries))
    args = (oh, ow, spatial_scale, sampling_ratio, aligned)
    if num_entries <= limit or K <= 1:
        need_bag_of = torch.is_grad_enabled() and feat.requires_grad
        index, weight, offsets, bag_of, bag_len = _build_entries(rois, *args, N, H, W, num_entries, need_bag_of)
        out = _BagSum.apply(feat, index, weight, offsets, bag_of, bag_len)  # [B, C]
    else:
        bounds, totals = _chunks(counts, limit)
        out = _ChunkedRoIAlign.apply(feat, rois, bounds, totals, (N, H, W), args)  # [B, C]
    # [B, C] -> [K, oh, ow, C] -> [K, C, oh, ow]: returned channels-last, the layout it was computed in (no
    # copy); the heads' convolutions run fastest on it, and .flatten / .reshape copy where they need to.
    out = out.view(K, oh, ow, C).permute(0, 3, 1, 2)
    return out if out.dtype == input.dtype else out.to(input.dtype)
