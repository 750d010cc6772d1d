"""Multi-scale RoI pooling: each RoI is pooled from one FPN level chosen by its size.

Shapes: R RoIs over the batch as rois [R, 5] (batch index, x1, y1, x2, y2) in image pixels;
features list of [N, C, Hi, Wi] for levels k_min..k_max; output [R, C, S, S].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .box_ops import box_area


def roi_align_fn(impl: str):
    """RoIAlign implementation: "ours" (hand-written, maskrcnn.model.roi_align) or "torchvision" (compiled kernel)."""
    if impl == "ours":
        from .roi_align import roi_align
        return roi_align
    if impl == "torchvision":
        from torchvision.ops import roi_align
        return roi_align
    raise ValueError(f"unknown RoIAlign implementation '{impl}' (ours | torchvision)")


def rois_from_boxes(boxes: Sequence[Tensor]) -> Tensor:
    """List of [Ri, 4] boxes per image -> [R, 5] with the image index in column 0."""
    idx = torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat((idx, torch.cat(list(boxes))), dim=1)


def assign_levels(boxes: Tensor, k_min: int, k_max: int, canonical_size: float, canonical_level: int,
                  mapper: str = "detectron2") -> Tensor:
    """[R, 4] boxes -> [R] level index in 0..(k_max - k_min), by k = floor(k0 + log2(sqrt(wh) / s0)).

    The references differ in where a small eps goes, which moves boxes of side exactly s0 * 2^j:
    detectron2 log2(s / s0 + 1e-8) (inside, guards log2(0)), torchvision log2(s / s0) + 1e-6 (outside).
    """
    size = box_area(boxes).sqrt()
    if mapper == "detectron2":
        k = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-8))
    elif mapper == "torchvision":
        k = torch.floor(canonical_level + torch.log2(size / canonical_size) + 1e-6)
    else:
        raise ValueError(f"unknown level mapper '{mapper}' (detectron2 | torchvision)")
    return (k.clamp(min=k_min, max=k_max) - k_min).to(torch.int64)


class _InRoIOrder(torch.autograd.Function):
    """Each level's pooled RoIs written to their rows of one [R, C, S, S] tensor, in RoI order; the backward
    hands each level the gradient of its rows. (Written in place with index_put_ instead, autograd would clone
    the whole RoI gradient once per level in the backward, tens of MB each while the step's memory peaks; with
    index_copy_ it would keep every level's pooled features alive until the backward, where only their shape
    is needed.)"""

    @staticmethod
    def forward(ctx, num_rois: int, layout: torch.memory_format, rows: list[Tensor],  # type: ignore[override]
                *pooled: Tensor) -> Tensor:
        first = pooled[0]
        out = torch.empty((num_rois, *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=layout)
        for idx, p in zip(rows, pooled):  # every RoI has exactly one level, so every row is written
            out.index_copy_(0, idx, p)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (None, None, None, *(grad.index_select(0, idx) if needs else None
                                    for idx, needs in zip(ctx.rows, ctx.needs_input_grad[3:])))


class MultiScaleRoIAlign(nn.Module):
    def __init__(self, *, output_size: int, strides: Sequence[int], sampling_ratio: int, aligned: bool,
                 canonical_box_size: float = 224.0, canonical_level: int = 4, impl: str = "ours",
                 level_mapper: str = "detectron2"):
        super().__init__()
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.k_min = int(round(math.log2(strides[0])))
        self.k_max = int(round(math.log2(strides[-1])))
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.impl = impl
        if level_mapper not in ("detectron2", "torchvision"):
            raise ValueError(f"unknown level mapper '{level_mapper}' (detectron2 | torchvision)")
        self.level_mapper = level_mapper
        self._roi_align = roi_align_fn(impl)

    def prepare(self, features: list[Tensor]) -> list[Tensor]:
        """The maps in the layout this implementation reads fastest, to convert once per forward and share
        between the box and mask poolers: channels-last for ours (it gathers one C-vector per sample point;
        free if the model already runs channels-last), as they are for torchvision's kernel."""
        if self.impl != "ours":
            return features
        # Under autocast (bf16/fp16 features) RoIAlign gathers and sums in fp32: cast here, once for both
        # poolers, instead of inside every roi_align call.
        upcast = bool(features) and torch.is_autocast_enabled(features[0].device.type)
        return [f.to(torch.float32 if upcast and f.dtype in (torch.float16, torch.bfloat16) else f.dtype,
                     memory_format=torch.channels_last) for f in features]

    def forward(self, features: list[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """features: one map per level (fine to coarse); boxes: list of [Ri, 4] per image -> [R, C, S, S]."""
        rois = rois_from_boxes(boxes)
        if rois.dtype in (torch.float16, torch.bfloat16):
            rois = rois.float()  # coordinates stay fp32 even when the features are fp16 (AMP evaluation)
        c = features[0].shape[1]
        # Channels-last for ours: the layout its RoIAlign computes and the mask head's convs run fastest on.
        layout = torch.channels_last if self.impl == "ours" else torch.contiguous_format
        if rois.shape[0] == 0:
            return torch.empty((0, c, self.output_size, self.output_size), dtype=features[0].dtype,
                               device=features[0].device, memory_format=layout)
        levels = assign_levels(rois[:, 1:], self.k_min, self.k_max, self.canonical_box_size,
                               self.canonical_level, self.level_mapper)
        levels = levels.clamp_(0, len(features) - 1)  # a non-finite box's garbage level still gets a level
        rows, pooled = [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel() == 0:
                continue
            rows.append(idx)
            pooled.append(self._roi_align(feature, self._rois_for(rois[idx], feature),
                                          (self.output_size, self.output_size), spatial_scale=scale,
                                          sampling_ratio=self.sampling_ratio, aligned=self.aligned
                                          ).to(features[0].dtype))
        return _InRoIOrder.apply(rois.shape[0], layout, rows, *pooled)

    def _rois_for(self, rois: Tensor, feature: Tensor) -> Tensor:
        """RoIs in the dtype the implementation should see. fp16 has 11 significant bits, so above 1024 px it
        rounds coordinates to whole pixels (above 2048 to even ones): under AMP the RoIs must stay fp32.
        Ours computes coordinates in fp32 whatever the features' dtype; torchvision's kernel wants one dtype,
        and under autocast its wrapper casts both to fp32 itself."""
        if self.impl == "ours" or rois.dtype == feature.dtype:
            return rois
        if feature.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(feature.device.type):
            return rois
        return rois.to(feature.dtype)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, scales={self.scales}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}, impl={self.impl}, level_mapper={self.level_mapper}")
