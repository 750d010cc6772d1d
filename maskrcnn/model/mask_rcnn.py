"""Mask R-CNN (and its RPN-only first stage) as a short sequence of stages.

    images -> transform -> bottom_up -> noise -> fpn -> rpn -> roi_heads -> losses | detections

Shapes: N images; inputs list of [3, Hi, Wi] float 0..1 RGB; targets list of dict(boxes [M, 4] xyxy px,
labels [M] int64 1..K, masks [M, Hi, Wi] uint8). Training returns {loss name: scalar}; inference returns per
image dict(boxes [D, 4], labels [D], scores [D], masks [D, 1, Hi, Wi] probabilities) in input pixels, or, for
the RPN stage, dict(boxes [P, 4], scores [P]) proposals in input pixels.

`probe()` runs the same pass and returns every intermediate result (see its docstring): pictures, reports
and the TensorBoard images are drawn from it, never from a copy of this chain.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .backbone import ResNetBottomUp
from .fpn import FPN
from .latent_noise import LatentNoise
from .postprocess import PASTE_MODES, postprocess_detections
from .roi_heads import RoIHeads
from .rpn import RPN
from .transform import ImageList, ImageTransform, resize_boxes


class MaskRCNN(nn.Module):
    def __init__(self, *, transform: ImageTransform, bottom_up: ResNetBottomUp, noise: LatentNoise, fpn: FPN,
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

    def features(self, images: list[Tensor], targets: Optional[list[dict]] = None, record: Optional[dict] = None):
        """Transform and features: (ImageList, targets in the resized frame, {"p2".."p6"})."""
        image_list, targets = self.transform(images, targets)
        bottom_up = self.bottom_up(image_list.tensor)
        noisy = self.noise(bottom_up)
        feats = self.fpn(noisy)
        if record is not None:
            record.update(images=self.input_images(image_list), image_sizes=image_list.image_sizes,
                          padded_size=tuple(image_list.tensor.shape[-2:]), targets=targets,
                          bottom_up=bottom_up, noisy=noisy, fpn=feats)
        return image_list, targets, feats

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None, record: Optional[dict] = None):
        """Losses (training) or detections (eval). `record`: a dict that receives every intermediate result
        (see probe); None in ordinary training and inference."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets, feats = self.features(images, targets, record)
        proposals, losses = self.rpn(image_list, feats, targets, record)
        if self.roi_heads is None:
            if self.training:
                return losses
            return [{"boxes": resize_boxes(p["boxes"], size, orig), "scores": p["scores"]}
                    for p, size, orig in zip(proposals, image_list.image_sizes, original_sizes)]
        detections, head_losses = self.roi_heads(feats, [p["boxes"] for p in proposals],
                                                 image_list.image_sizes, targets, record)
        if self.training:
            return {**losses, **head_losses}
        return postprocess_detections(detections, image_list.image_sizes, original_sizes, self.mask_paste)

    @torch.no_grad()
    def probe(self, images: list[Tensor], targets: Optional[list[dict]] = None, noise: Optional[bool] = None,
              heads: bool = True) -> dict:
        """One pass of forward (in the model's current mode, without gradients) that returns every intermediate
        result; with targets in eval mode the RPN's anchor labelling and the RoI sampling run too, on the
        test-time proposals. Keys (N images, level lists fine to coarse):
          images           list of [3, h, w] float 0..1: each image as the model sees it (resized, unpadded)
          image_sizes      [(h, w)]; padded_size (Hp, Wp)
          targets          the targets in the model-input frame (None without targets)
          bottom_up        {"c2".."c5"}; noisy: the same after LatentNoise; fpn: {"p2".."p6"}
          anchors          list per level of [Ai, 4]; objectness: list per level of [N, Ai] logits
          anchor_labels    [N, Atot] 1 / 0 / -1 (positive, negative, ignored); sampled_anchor_labels: the same
                           after sampling (-1: not sampled)                                  (with targets)
          proposals        per image dict(boxes [P, 4], scores [P], levels [P]) in the model-input frame
          roi_samples      per image dict(boxes, labels, matched_idx)              (full stage, with targets)
          output           what forward returns: losses (training) or detections/proposals in input pixels
        `noise`: None: LatentNoise as the mode says; True: applied as in training; False: skipped.
        `heads=False`: the pass ends after the RPN, as the RPN stage's (for proposal statistics, cheaper)."""
        record: dict = {}
        was_training, was_enabled, roi_heads = self.noise.training, self.noise.enabled, self.roi_heads
        try:
            if noise is not None:
                self.noise.train(noise)
                self.noise.enabled = was_enabled and noise
            if not heads:
                self.roi_heads = None
            record["output"] = self(images, targets, record)
        finally:
            self.noise.train(was_training)
            self.noise.enabled = was_enabled
            self.roi_heads = roi_heads
        return record

    def input_images(self, image_list: ImageList) -> list[Tensor]:
        """Each image of the batch as the model sees it (resized, unpadded), un-normalised to 0..1."""
        t = self.transform
        return [(image_list.tensor[i, :, :h, :w].float() * t.pixel_std + t.pixel_mean).clamp(0, 1)
                for i, (h, w) in enumerate(image_list.image_sizes)]
