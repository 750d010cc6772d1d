"""Image transform inside the model: normalise, resize by short side (max long side), pad to a multiple
of 32; and the inverse mapping of detections back to the size of the image passed in.

Shapes: images list of [3, Hi, Wi] float 0..1 RGB -> ImageList(tensor [N, 3, Hp, Wp], image_sizes [(h, w)]).

In training the short side is drawn per image from `min_size_train` (detectron2's ResizeShortestEdge "choice",
torchvision's GeneralizedRCNNTransform). Two rules differ between the references, each a switch:
  resize_rounding  detectron2: short side set to the size, long side scaled, both rescaled if the long side
                   exceeds the max, then int(x + 0.5) | torchvision: floor(side * scale), scale = min(...)
  mask_resize      centre: bilinear at pixel centres (as the image), then >= 0.5: edges stay where they are |
                   nearest: torchvision's F.interpolate "nearest", which reads source pixel floor(i * old / new)
                   and so shifts enlarged masks ~half a (new) pixel right and down against the image and boxes
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESIZE_ROUNDINGS = ("detectron2", "torchvision")
MASK_RESIZES = ("centre", "nearest")


@dataclass
class ImageList:
    tensor: Tensor  # [N, 3, Hp, Wp] padded batch
    image_sizes: list[tuple[int, int]]  # (h, w) of each image after resizing, before padding

    def to(self, device: torch.device) -> "ImageList":
        return ImageList(self.tensor.to(device), self.image_sizes)


def resized_size(h: int, w: int, min_size: float, max_size: float, rounding: str = "torchvision"
                 ) -> tuple[int, int]:
    """(h, w) scaled so the short side is min_size unless the long side would exceed max_size.

    torchvision: floor(side * min(min_size / short, max_size / long)).
    detectron2 (ResizeShortestEdge.get_output_shape): short side = min_size, long side scaled; if the long
    side exceeds max_size both are scaled down again; then rounded, int(x + 0.5)."""
    if rounding == "torchvision":
        scale = min(min_size / min(h, w), max_size / max(h, w))
        return int(math.floor(h * scale)), int(math.floor(w * scale))
    if rounding == "detectron2":
        size = float(min_size)
        scale = size / min(h, w)
        new_h, new_w = (size, scale * w) if h < w else (scale * h, size)
        if max(new_h, new_w) > max_size:
            scale = max_size * 1.0 / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        return int(new_h + 0.5), int(new_w + 0.5)
    raise ValueError(f"unknown resize rounding '{rounding}' ({' | '.join(RESIZE_ROUNDINGS)})")


def resize_masks(masks: Tensor, size: tuple[int, int], mode: str = "centre") -> Tensor:
    """[N, H, W] uint8 0/1 masks -> [N, h, w] uint8 (see the module docstring for the two modes)."""
    if mode not in MASK_RESIZES:
        raise ValueError(f"unknown mask resize '{mode}' ({' | '.join(MASK_RESIZES)})")
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    m = masks[:, None].float()
    if mode == "nearest":
        return F.interpolate(m, size=size, mode="nearest")[:, 0].to(torch.uint8)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return (m[:, 0] >= 0.5).to(torch.uint8)


def resize_boxes(boxes: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Scale [B, 4] xyxy boxes from an image of size `old` (h, w) to `new`."""
    # The ratios are divided in the boxes' dtype (as torchvision does), so the two agree to the last bit.
    ratio = (torch.tensor(new, dtype=boxes.dtype, device=boxes.device)
             / torch.tensor(old, dtype=boxes.dtype, device=boxes.device))  # (ry, rx)
    return boxes * ratio.flip(0).repeat(2)  # (rx, ry, rx, ry)


class ImageTransform(nn.Module):
    def __init__(self, *, min_size_train: Sequence[int], max_size_train: int, min_size_test: int,
                 max_size_test: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisibility: int = 32, resize_rounding: str = "detectron2", mask_resize: str = "centre"):
        super().__init__()
        if resize_rounding not in RESIZE_ROUNDINGS:
            raise ValueError(f"unknown resize rounding '{resize_rounding}' ({' | '.join(RESIZE_ROUNDINGS)})")
        if mask_resize not in MASK_RESIZES:
            raise ValueError(f"unknown mask resize '{mask_resize}' ({' | '.join(MASK_RESIZES)})")
        self.resize_rounding = resize_rounding
        self.mask_resize = mask_resize
        self.min_size_train = list(min_size_train)
        self.max_size_train = max_size_train
        self.min_size_test = min_size_test
        self.max_size_test = max_size_test
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)

    def resize(self, image: Tensor, target: Optional[dict]) -> tuple[Tensor, Optional[dict]]:
        h, w = image.shape[-2:]
        if self.training:  # drawn for each image (forward calls resize once per image)
            min_size, max_size = random.choice(self.min_size_train), self.max_size_train
        else:
            min_size, max_size = self.min_size_test, self.max_size_test
        new = resized_size(h, w, min_size, max_size, self.resize_rounding)
        if new != (h, w):
            image = F.interpolate(image[None], size=new, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, None
        target = dict(target)
        target["boxes"] = resize_boxes(target["boxes"], (h, w), new)
        if "masks" in target and new != (h, w):
            target["masks"] = resize_masks(target["masks"], new, self.mask_resize)
        return image, target

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None
                ) -> tuple[ImageList, Optional[list[dict]]]:
        out_images, out_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: expected a [3, H, W] tensor, got shape {tuple(image.shape)}")
            image = (image - self.pixel_mean) / self.pixel_std
            image, target = self.resize(image, targets[i] if targets is not None else None)
            out_images.append(image)
            if out_targets is not None:
                out_targets.append(target)
        sizes = [tuple(img.shape[-2:]) for img in out_images]
        d = self.size_divisibility
        hp = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        wp = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = out_images[0].new_zeros((len(out_images), 3, hp, wp))
        for img, pad in zip(out_images, batch):
            pad[:, : img.shape[1], : img.shape[2]].copy_(img)
        return ImageList(batch, sizes), out_targets

    def extra_repr(self) -> str:
        return (f"min_size_train={self.min_size_train}, max_size_train={self.max_size_train}, "
                f"min_size_test={self.min_size_test}, max_size_test={self.max_size_test}, "
                f"size_divisibility={self.size_divisibility}, resize_rounding={self.resize_rounding}, "
                f"mask_resize={self.mask_resize}")
