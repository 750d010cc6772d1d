"""RoI heads: proposal labelling and sampling, and the routing of RoIs through the poolers to the box head
and the mask head. Each head owns its loss and its inference (box_head.py, mask_head.py).

Shapes: N images; R sampled RoIs over the batch (Ri per image); F foreground RoIs; K classes (labels 1..K,
0 background); D detections.
  training:  proposals [Pi, 4] (+ GT) -> sample Ri -> box pooler [R, C, S, S] -> box head losses
             foreground RoIs -> mask pooler [F, C, Sm, Sm] -> mask head loss
  inference: proposals [Pi, 4] -> box pooler -> box head inference [Di, 4]
             detections -> mask pooler -> mask head inference [Di, 1, M, M]
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .box_head import BoxHead
from .box_ops import box_iou
from .mask_head import MaskHead
from .matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from .poolers import MultiScaleRoIAlign
from .sampler import BalancedSampler


class RoIHeads(nn.Module):
    def __init__(self, *, in_features: list[str], box_pooler: MultiScaleRoIAlign, box_head: BoxHead,
                 matcher: Matcher, sampler: BalancedSampler, mask_pooler: Optional[MultiScaleRoIAlign] = None,
                 mask_head: Optional[MaskHead] = None, add_gt_as_proposals: bool = True):
        super().__init__()
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("the mask head needs its pooler and the pooler its head")
        self.in_features = in_features
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.matcher = matcher
        self.sampler = sampler
        self.add_gt_as_proposals = add_gt_as_proposals

    @property
    def mask_on(self) -> bool:
        return self.mask_head is not None

    @torch.no_grad()
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict]) -> list[dict[str, Tensor]]:
        """Per image: add GT boxes, match (IoU), sample. Returns dict(boxes [Ri,4], labels [Ri] (0 bg),
        matched_idx [Ri] index of the matched GT (0 for background, unused there))."""
        out = []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            if self.add_gt_as_proposals:
                boxes = torch.cat((boxes, gt_boxes.to(boxes.dtype)))
            matches = self.matcher(box_iou(gt_boxes, boxes))  # [Ri]
            matched_idx = matches.clamp(min=0)
            labels = gt_labels[matched_idx].clone() if gt_labels.numel() else torch.zeros_like(matches)
            labels[matches == BELOW_LOW_THRESHOLD] = 0
            labels[matches == BETWEEN_THRESHOLDS] = -1  # ignored (only when bg_iou < fg_iou)
            pos, neg = self.sampler(labels)
            keep = torch.cat((pos, neg))
            out.append({"boxes": boxes[keep], "labels": labels[keep], "matched_idx": matched_idx[keep]})
        return out

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: Optional[list[dict]] = None, record: Optional[dict] = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """proposals: list of [Pi, 4] (constants). Training: ([], losses); eval: (detections per image, {}).
        `record` (the model's probe) receives "roi_samples" when there are targets."""
        feats = self.box_pooler.prepare([features[name] for name in self.in_features])
        if self.training and targets is None:
            raise ValueError("RoI heads in training mode need targets")
        if targets is not None and (self.training or record is not None):
            samples = self.sample_proposals(proposals, targets)
            if record is not None:
                record["roi_samples"] = samples
            if self.training:
                return [], self.losses(feats, samples, targets)
        return self.inference(feats, proposals, image_sizes), {}

    def losses(self, feats: list[Tensor], samples: list[dict], targets: list[dict]) -> dict[str, Tensor]:
        boxes = [s["boxes"] for s in samples]
        labels = torch.cat([s["labels"] for s in samples])  # [R]
        matched_gt = torch.cat([t["boxes"][s["matched_idx"]] if t["boxes"].numel() else s["boxes"]
                                for s, t in zip(samples, targets)])  # [R, 4], any box for background
        scores, deltas = self.box_head(self.box_pooler(feats, boxes))
        losses = self.box_head.losses(scores, deltas, torch.cat(boxes), labels, matched_gt)
        if self.mask_on:
            fg = [torch.nonzero(s["labels"] > 0).squeeze(1) for s in samples]
            fg_boxes = [s["boxes"][i] for s, i in zip(samples, fg)]
            logits = self.mask_head(self.mask_pooler(feats, fg_boxes))  # [F, K+1, M, M]
            mask_targets = self.mask_head.targets(fg_boxes, [s["matched_idx"][i] for s, i in zip(samples, fg)],
                                                  [t["masks"] for t in targets], logits.shape[-1])
            fg_labels = torch.cat([s["labels"][i] for s, i in zip(samples, fg)])
            losses["loss_mask"] = self.mask_head.loss(logits, fg_labels, mask_targets)
        return losses

    @torch.no_grad()
    def inference(self, feats: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
                  ) -> list[dict[str, Tensor]]:
        scores, deltas = self.box_head(self.box_pooler(feats, proposals))
        results = self.box_head.inference(scores, deltas, proposals, image_sizes)
        if self.mask_on:
            det_boxes = [r["boxes"] for r in results]
            logits = self.mask_head(self.mask_pooler(feats, det_boxes))  # [D, K+1, M, M]
            probs = self.mask_head.inference(logits, torch.cat([r["labels"] for r in results]))
            for r, m in zip(results, probs.split([len(b) for b in det_boxes])):
                r["masks"] = m  # [Di, 1, M, M], pasted into the image by the model's postprocess
        return results
