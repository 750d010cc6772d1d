"""Anchor generator: one anchor size per FPN level, several aspect ratios, on every feature-map cell.

Shapes: A = len(ratios) anchors per location; level i has Hi x Wi locations; anchors of a level are
[Hi * Wi * A, 4] xyxy pixels, ordered location-major (y, then x, then ratio), matching the RPN head's
[N, A, Hi, Wi] -> [N, Hi, Wi, A] flattening.

Strides come from the config. torchvision instead derives each level's stride from the padded batch,
Hp // Hi and Wp // Wi: the same on P2..P5, but on P6 (max-pooled, ceil(Hp / 64) rows) an odd Hp / 32
gives e.g. 800 // 13 = 61 instead of 64. `stride_from_image=True` reproduces that for weight parity.

Grids are cached in a small LRU (`cache_size` entries, one per (level, Hi, Wi, stride, device)): a multi-scale
COCO run meets ~1400 distinct grids (1.4 GiB if all were kept), and building one costs ~11 ms for all five
levels of an 800x1333 batch on a CPU, so only the few most recent are worth keeping.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

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
    def __init__(self, *, sizes: Sequence[float], ratios: Sequence[float], strides: Sequence[int],
                 round_base: bool = False, offset: float = 0.0, stride_from_image: bool = False,
                 cache_size: int = 16):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per level: {len(sizes)} sizes for {len(strides)} strides")
        self.sizes = [float(s) for s in sizes]
        self.ratios = [float(r) for r in ratios]
        self.strides = [int(s) for s in strides]
        self.offset = offset
        self.stride_from_image = stride_from_image
        self.num_anchors = len(self.ratios)  # A per location, the same on every level
        for i, size in enumerate(self.sizes):
            self.register_buffer(f"cell_{i}", cell_anchors(size, self.ratios, round_base), persistent=False)
        self.cache_size = cache_size  # LRU entries kept (0: no cache)
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    def grid_anchors(self, level: int, height: int, width: int, stride: Optional[tuple[int, int]] = None
                     ) -> Tensor:
        """[height * width * A, 4] anchors of one level; the `cache_size` most recently used grids are kept.
        `stride` (y, x) overrides the configured stride of the level."""
        cell: Tensor = getattr(self, f"cell_{level}")
        stride_y, stride_x = stride if stride is not None else (self.strides[level], self.strides[level])
        key = (level, height, width, stride_y, stride_x, cell.device)
        anchors = self._cache.get(key)
        if anchors is not None:
            self._cache.move_to_end(key)  # most recently used last
            return anchors
        xs = (torch.arange(width, device=cell.device, dtype=torch.float32) + self.offset) * stride_x
        ys = (torch.arange(height, device=cell.device, dtype=torch.float32) + self.offset) * stride_y
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)  # [Hi*Wi, 1, 4]
        anchors = (shifts + cell[None]).reshape(-1, 4)  # broadcast: [Hi*Wi, A, 4] -> [Hi*Wi*A, 4]
        if self.cache_size > 0:
            self._cache[key] = anchors
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # least recently used first
        return anchors

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # .to() / .half() / .cuda(): cached grids would be on the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    def forward(self, feature_sizes: Sequence[tuple[int, int]], image_size: Optional[tuple[int, int]] = None
                ) -> list[Tensor]:
        """Feature sizes (Hi, Wi) per level -> list of [Hi * Wi * A, 4] anchors per level. `image_size` is
        the padded batch size (Hp, Wp), needed only when strides come from the image."""
        if not self.stride_from_image:
            return [self.grid_anchors(i, h, w) for i, (h, w) in enumerate(feature_sizes)]
        if image_size is None:
            raise ValueError("AnchorGenerator(stride_from_image=True) needs the padded image size")
        hp, wp = image_size
        return [self.grid_anchors(i, h, w, (hp // h, wp // w)) for i, (h, w) in enumerate(feature_sizes)]

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, ratios={self.ratios}, strides={self.strides}, offset={self.offset}, "
                f"stride_from_image={self.stride_from_image}, cache_size={self.cache_size}")

