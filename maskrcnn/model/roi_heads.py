"""RoI heads: proposal labelling and sampling, and the routing of RoIs through the poolers to the heads. Each
head (box_head.py, mask_head.py, maskiou_head.py) owns its training targets, its named losses and its inference;
what a head must offer is written once, in `RoIHead` below, so another head class is a new file and a name in
build.py's BOX_HEADS or MASK_HEADS.

What a head is given: by default its RoIs pooled by its pooler ([R', C, S, S]); a head that sets
`wants_features = True` also gets the RoI levels' FPN maps and its RoI boxes, and one that sets `pooled = False`
gets no pooled features and no pooler at all (a head that samples the maps itself, as PointRend does).

Shapes: N images; R sampled RoIs over the batch (Ri per image); F foreground RoIs; K classes (labels 1..K,
0 background); D detections.
  training:  proposals [Pi, 4] (+ GT) -> sample Ri -> per head: its RoIs (box: all, mask: foreground)
             -> its pooler [R', C, S, S] -> (the model's RoI noise site) -> the head's losses
  inference: proposals [Pi, 4] -> box pooler -> box head inference (detections [Di, 4])
             -> detections -> mask pooler -> mask head inference (masks [Di, 1, M, M])
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .box_ops import box_iou
from .losses import ratio
from .matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from .poolers import MultiScaleRoIAlign
from .sampler import BalancedSampler

Samples = list[dict[str, Tensor]]  # per image dict(boxes [Ri, 4], labels [Ri] (0 background), matched_idx [Ri])


class RoIHead(nn.Module, ABC):
    """What RoIHeads asks of a head. `results` are per-image dicts: for the first head (the box head) the
    proposals and image size ({"proposals": [Pi, 4], "image_size": (h, w)}), for the next ones the detections
    so far ({"boxes", "scores", "labels", ...}).

    What forward is given, chosen by two class attributes:
      pooled = True           x: this head's RoIs pooled by its pooler [R', C, S, S]; False: x is None and the
                              head needs no pooler
      wants_features = False  True: forward(x, features=..., boxes=...) also gets the RoI levels' FPN maps
                              ({"p2": [N, C, H2, W2], ...}, in model-input pixels / the level's stride) and the
                              RoIs it is to predict for (per image [R'i, 4], model-input pixels)"""

    pooled: bool = True
    wants_features: bool = False

    @abstractmethod
    def select(self, samples: Samples) -> Samples:
        """The sampled RoIs this head learns from, per image (e.g. all of them, or the foreground ones)."""

    @abstractmethod
    def forward(self, x: Optional[Tensor]) -> Any:
        """Pooled RoI features [R, C, S, S] (None for a head with pooled = False; with wants_features = True
        also the keywords features and boxes, see the class doc) -> this head's predictions."""

    @abstractmethod
    def targets(self, samples: Samples, targets: list[dict]) -> Any:
        """The training targets of the selected RoIs `samples`, from the ground truth `targets`."""

    @abstractmethod
    def losses(self, predictions: Any, samples: Samples, targets: list[dict], stats: Optional[dict] = None
               ) -> dict[str, Tensor]:
        """Named losses of the predictions for the selected RoIs (e.g. {"loss_mask": ...}); `stats`, when given,
        receives the head's training statistics from the same tensors (name -> losses.ratio(...))."""

    @abstractmethod
    def inference_rois(self, results: list[dict]) -> list[Tensor]:
        """The boxes per image this head pools at inference (proposals, or the detections so far)."""

    @abstractmethod
    def inference(self, predictions: Any, results: list[dict], record: Optional[dict] = None) -> list[dict]:
        """The detections per image with this head's outputs added (or made, by the first head); `record`
        (the model's probe, else None) receives the head's intermediate results."""

    @abstractmethod
    def reset_predictor(self) -> None:
        """Fresh class-specific predictor layers (fine-tuning on other classes)."""


class RoIHeads(nn.Module):
    def __init__(self, *, in_features: list[str], box_pooler: MultiScaleRoIAlign, box_head: RoIHead,
                 matcher: Matcher, sampler: BalancedSampler, mask_pooler: Optional[MultiScaleRoIAlign] = None,
                 mask_head: Optional[RoIHead] = None, add_gt_as_proposals: bool = True):
        super().__init__()
        if mask_head is None and mask_pooler is not None:
            raise ValueError("a mask pooler without a mask head")
        for name, head, pooler in (("box", box_head, box_pooler), ("mask", mask_head, mask_pooler)):
            if head is not None and head.pooled and pooler is None:
                raise ValueError(f"the {name} head pools its RoIs (pooled = True) but has no pooler")
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

    def heads(self) -> list[tuple[str, Optional[MultiScaleRoIAlign], RoIHead]]:
        """(name, pooler, head) in the order they run: the box head first (it makes the detections). The pooler
        is None for a head that does not pool (pooled = False)."""
        heads = [("box", self.box_pooler, self.box_head)]
        if self.mask_on:
            heads.append(("mask", self.mask_pooler, self.mask_head))
        return heads

    @torch.no_grad()
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict]) -> Samples:
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
                targets: Optional[list[dict]] = None, record: Optional[dict] = None,
                pooled_hook: Optional[Callable[[str, Tensor], Tensor]] = None, stats: Optional[dict] = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """proposals: list of [Pi, 4] (constants). Training: ([], losses); eval: (detections per image, {}).
        `record` (the model's probe) receives "roi_samples" when there are targets and, in inference, what each
        head's inference records (box head: "box_refinement", mask head: "mask_logits"). `pooled_hook(name, x)`:
        applied to each head's pooled features (name "box" or "mask") before the head (the model's RoI site).
        `stats` (training): receives roi_fg_samples and roi_bg_samples (per image) and each head's statistics."""
        first = next((p for _, p, h in self.heads() if h.pooled), None)  # prepares the maps once for every pooler
        feats = first.prepare([features[name] for name in self.in_features]) if first is not None else None
        if self.training and targets is None:
            raise ValueError("RoI heads in training mode need targets")
        maps = {name: features[name] for name in self.in_features}

        def run(name: str, pooler: Optional[MultiScaleRoIAlign], head: RoIHead, boxes: list[Tensor]) -> Any:
            """The head's forward on what it asks for (see RoIHead)."""
            x = None
            if head.pooled:
                x = pooler(feats, boxes)
                x = x if pooled_hook is None else pooled_hook(name, x)
            if head.wants_features:
                return head(x, features=maps, boxes=boxes)
            return head(x)

        if targets is not None and (self.training or record is not None):
            samples = self.sample_proposals(proposals, targets)
            if record is not None:
                record["roi_samples"] = samples
            if self.training:
                if stats is not None:
                    labels = torch.cat([s["labels"] for s in samples])
                    stats["roi_fg_samples"] = ratio((labels > 0).sum(), len(samples))
                    stats["roi_bg_samples"] = ratio((labels == 0).sum(), len(samples))
                losses: dict[str, Tensor] = {}
                for name, pooler, head in self.heads():
                    chosen = head.select(samples)
                    losses.update(head.losses(run(name, pooler, head, [c["boxes"] for c in chosen]), chosen,
                                              targets, stats=stats))
                return [], losses
        with torch.no_grad():
            results: list[dict] = [{"proposals": p, "image_size": s} for p, s in zip(proposals, image_sizes)]
            for name, pooler, head in self.heads():
                results = head.inference(run(name, pooler, head, head.inference_rois(results)), results, record)
        return results, {}
