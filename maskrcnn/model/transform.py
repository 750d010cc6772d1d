"""Image transform inside the model: normalise, resize by short side (max long side), pad to a multiple
of 32; and the inverse mapping of detections back to the size of the image passed in.

Shapes: images list of [3, Hi, Wi] float 0..1 RGB -> ImageList(tensor [N, 3, Hp, Wp], image_sizes [(h, w)]).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ImageList:
    tensor: Tensor  # [N, 3, Hp, Wp] padded batch
    image_sizes: list[tuple[int, int]]  # (h, w) of each image after resizing, before padding

    def to(self, device: torch.device) -> "ImageList":
        return ImageList(self.tensor.to(device), self.image_sizes)


def resized_size(h: int, w: int, min_size: float, max_size: float) -> tuple[int, int]:
    """Scale so the short side is min_size unless the long side would exceed max_size (floor, as torchvision)."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(math.floor(h * scale)), int(math.floor(w * scale))


def resize_boxes(boxes: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Scale [B, 4] xyxy boxes from an image of size `old` (h, w) to `new`."""
    # The ratios are divided in the boxes' dtype (as torchvision does), so the two agree to the last bit.
    ratio = (torch.tensor(new, dtype=boxes.dtype, device=boxes.device)
             / torch.tensor(old, dtype=boxes.dtype, device=boxes.device))  # (ry, rx)
    return boxes * ratio.flip(0).repeat(2)  # (rx, ry, rx, ry)


class ImageTransform(nn.Module):
    def __init__(self, min_size_train: Sequence[int], max_size_train: int, min_size_test: int,
                 max_size_test: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisibility: int = 32):
        super().__init__()
        self.min_size_train = list(min_size_train)
        self.max_size_train = max_size_train
        self.min_size_test = min_size_test
        self.max_size_test = max_size_test
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)

    def resize(self, image: Tensor, target: Optional[dict]) -> tuple[Tensor, Optional[dict]]:
        h, w = image.shape[-2:]
        if self.training:
            min_size, max_size = random.choice(self.min_size_train), self.max_size_train
        else:
            min_size, max_size = self.min_size_test, self.max_size_test
        new = resized_size(h, w, min_size, max_size)
        if new != (h, w):
            image = F.interpolate(image[None], size=new, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, None
        target = dict(target)
        target["boxes"] = resize_boxes(target["boxes"], (h, w), new)
        if "masks" in target and new != (h, w):
            if target["masks"].shape[0] == 0:
                target["masks"] = target["masks"].new_zeros((0, *new))
            else:
                masks = target["masks"][:, None].float()
                target["masks"] = F.interpolate(masks, size=new, mode="nearest")[:, 0].to(torch.uint8)
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
                f"size_divisibility={self.size_divisibility}")
