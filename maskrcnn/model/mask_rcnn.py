"""Mask R-CNN (and its RPN-only first stage) as a short sequence of stages.

    images -> transform -> bottom_up -> noise -> fpn -> rpn -> roi_heads -> losses | detections

Shapes: N images; inputs list of [3, Hi, Wi] float 0..1 RGB; targets list of dict(boxes [M, 4] xyxy px,
labels [M] int64 1..K, masks [M, Hi, Wi] uint8). Training returns {loss name: scalar}; inference returns per
image dict(boxes [D, 4], labels [D], scores [D], masks [D, 1, Hi, Wi] probabilities) in input pixels, or, for
the RPN stage, dict(boxes [P, 4], scores [P]) proposals in input pixels.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .backbone import ResNetBottomUp
from .fpn import FPN
from .latent_noise import LatentNoise
from .postprocess import PASTE_MODES, postprocess_detections
from .roi_heads import RoIHeads
from .rpn import RPN
from .transform import ImageTransform, resize_boxes


class MaskRCNN(nn.Module):
    def __init__(self, transform: ImageTransform, bottom_up: ResNetBottomUp, noise: LatentNoise, fpn: FPN,
                 rpn: RPN, roi_heads: Optional[RoIHeads] = None, mask_paste: str = "bilinear"):
        super().__init__()
        self.transform = transform
        self.bottom_up = bottom_up
        self.noise = noise
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads  # None: the RPN stage
        if mask_paste not in PASTE_MODES:
            raise ValueError(f"unknown mask paste mode '{mask_paste}' ({' | '.join(PASTE_MODES)})")
        self.mask_paste = mask_paste  # how masks are pasted into the input image (postprocess.py)

    @property
    def stage(self) -> str:
        return "rpn" if self.roi_heads is None else "full"

    def features(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        """Transform and features: (ImageList, targets in the resized frame, {"p2".."p6"})."""
        image_list, targets = self.transform(images, targets)
        feats = self.fpn(self.noise(self.bottom_up(image_list.tensor)))
        return image_list, targets, feats

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets, feats = self.features(images, targets)
        proposals, losses = self.rpn(image_list, feats, targets)
        if self.roi_heads is None:
            if self.training:
                return losses
            return [{"boxes": resize_boxes(p["boxes"], size, orig), "scores": p["scores"]}
                    for p, size, orig in zip(proposals, image_list.image_sizes, original_sizes)]
        detections, head_losses = self.roi_heads(feats, [p["boxes"] for p in proposals],
                                                 image_list.image_sizes, targets)
        if self.training:
            return {**losses, **head_losses}
        return postprocess_detections(detections, image_list.image_sizes, original_sizes, self.mask_paste)
