"""The Fast R-CNN box head: two shared FC layers, class scores and class-specific box deltas, with its own
training targets, losses and inference (class-specific decoding, per-class NMS, top-k): a RoIHead.

Shapes: R RoIs over the batch (Ri per image); K classes (labels 1..K, 0 background); S pool size (7);
D detections per image.
  features [R, C, S, S] -> fc6, fc7 -> [R, fc_dim] -> scores [R, K+1], deltas [R, 4(K+1)]
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .box_coder import BoxCoder
from .box_ops import clip_boxes, nonempty
from .losses import ratio, smooth_l1_sum
from .precision import cast_as_autocast, fp32
from .roi_heads import RoIHead, Samples


class BoxHead(RoIHead):
    def __init__(self, *, in_channels: int, resolution: int, fc_dim: int, num_classes: int, box_coder: BoxCoder,
                 smooth_l1_beta: float = 0.0, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_image: int = 100, min_box_size: float = 1e-2):
        super().__init__()
        self.num_classes = num_classes
        self.box_coder = box_coder
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.min_box_size = min_box_size  # detections with a side below this (px) are dropped
        self.fc6 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, 4 * (num_classes + 1))  # column block 0 (background) is unused
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.constant_(fc.bias, 0)
        self.reset_predictor()

    def reset_predictor(self) -> None:
        """Fresh class-score and box-delta layers (also used when fine-tuning on other classes)."""
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0)
        nn.init.constant_(self.bbox_pred.bias, 0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[R, C, S, S] pooled features -> (scores [R, K+1], deltas [R, 4(K+1)])."""
        # ReLUs in place: a linear layer's backward does not need its output (saves a copy)
        # the pooler's channels-last features in the standard layout, already cast where autocast would cast them
        x = F.relu(self.fc6(cast_as_autocast(x).flatten(1)), inplace=True)  # [R, C*S*S] -> [R, fc_dim]
        x = F.relu(self.fc7(x), inplace=True)
        # fp32 under autocast: the scores rank detections for NMS and the deltas become pixels (precision.py)
        return fp32(self.cls_score, x), fp32(self.bbox_pred, x)

    def select(self, samples: Samples) -> Samples:
        """Every sampled RoI: the classifier learns from background RoIs too."""
        return samples

    @torch.no_grad()
    def targets(self, samples: Samples, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """(labels [R] 0..K, regression deltas [R, 4]) of the sampled RoIs: each foreground RoI encoded against
        its matched ground-truth box; zeros for background RoIs (no box loss there)."""
        labels = torch.cat([s["labels"] for s in samples])
        rois = torch.cat([s["boxes"] for s in samples]).float()
        matched = torch.cat([t["boxes"][s["matched_idx"]] if t["boxes"].numel() else s["boxes"]
                             for s, t in zip(samples, targets)])  # [R, 4], any box for background
        fg = torch.nonzero(labels > 0).squeeze(1)
        deltas = rois.new_zeros(rois.shape)
        deltas[fg] = self.box_coder.encode(rois[fg], matched[fg])
        return labels, deltas

    def losses(self, predictions: tuple[Tensor, Tensor], samples: Samples, targets: list[dict],
               stats: Optional[dict] = None) -> dict[str, Tensor]:
        """Classification over all sampled RoIs; box regression on the foreground RoIs, on the deltas of
        their ground-truth class, normalised by all sampled RoIs (detectron2). `stats` receives cls_accuracy
        (the arg-max class is the label, over all sampled RoIs) and fg_cls_accuracy (over the foreground ones)."""
        scores, deltas = predictions
        labels, reg_targets = self.targets(samples, targets)
        if stats is not None:
            correct = scores.detach().argmax(1) == labels
            stats["cls_accuracy"] = ratio(correct.sum(), labels.numel())
            stats["fg_cls_accuracy"] = ratio(correct[labels > 0].sum(), (labels > 0).sum())
        if labels.numel() == 0:  # no RoI sampled at all (no proposals, no GT): zero losses, graph kept
            zero = scores.sum() * 0 + deltas.sum() * 0
            return {"loss_cls": zero, "loss_box": zero.clone()}
        loss_cls = F.cross_entropy(scores.float(), labels)
        fg = torch.nonzero(labels > 0).squeeze(1)
        fg_deltas = deltas.view(deltas.shape[0], self.num_classes + 1, 4)[fg, labels[fg]]  # [F, 4]
        loss_box = smooth_l1_sum(fg_deltas, reg_targets[fg], self.smooth_l1_beta) / labels.numel()
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def inference_rois(self, results: list[dict]) -> list[Tensor]:
        """The proposals: the box head makes the detections."""
        return [r["proposals"] for r in results]

    @torch.no_grad()
    def inference(self, predictions: tuple[Tensor, Tensor], results: list[dict], record: Optional[dict] = None
                  ) -> list[dict[str, Tensor]]:
        """Per image dict(boxes [D, 4], scores [D], labels [D]) from the scores and deltas of the proposals in
        `results` (dict(proposals, image_size)): class-specific boxes, score threshold, per-class NMS, the top
        `detections_per_image`. `record` receives "box_refinement": per image dict(proposals [Pi, 4],
        class_logits [Pi, K+1], box_deltas [Pi, 4(K+1)], steps): steps maps "class_boxes" (every proposal's
        box for every class, clipped), "score_threshold", "nms" and "top_k" (the detections) to dict(boxes,
        scores, labels, roi: the index of the proposal each box came from), in that order."""
        scores, deltas = predictions
        proposals = [r["proposals"] for r in results]
        image_sizes = [r["image_size"] for r in results]
        probs = F.softmax(scores.float(), dim=-1)[:, 1:]  # [R, K], background dropped
        boxes = self.box_coder.decode(deltas, torch.cat(proposals))  # [R, 4(K+1)]
        boxes = boxes.view(-1, self.num_classes + 1, 4)[:, 1:]  # [R, K, 4]
        counts = [len(p) for p in proposals]
        results, refinement = [], []
        for i, (boxes_i, probs_i, size) in enumerate(zip(boxes.split(counts), probs.split(counts), image_sizes)):
            b = clip_boxes(boxes_i, size).reshape(-1, 4)  # [Ri*K, 4], class-major inside each RoI
            s = probs_i.reshape(-1)
            labels = torch.arange(1, self.num_classes + 1, device=b.device).repeat(len(boxes_i))
            keep = (s > self.score_thresh) & nonempty(b, self.min_box_size)
            if record is not None:  # the probe: every step, each box with the index of its proposal
                roi = torch.arange(len(boxes_i), device=b.device).repeat_interleave(self.num_classes)  # [Ri*K]
                steps = {"class_boxes": {"boxes": b, "scores": s, "labels": labels, "roi": roi}}
                roi = roi[keep]
            b, s, labels = b[keep], s[keep], labels[keep]
            kept = batched_nms(b, s, labels, self.nms_thresh)  # sorted by score
            keep = kept[: self.detections_per_image]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
            if record is not None:
                steps["score_threshold"] = {"boxes": b, "scores": s, "labels": labels, "roi": roi}
                steps["nms"] = {"boxes": b[kept], "scores": s[kept], "labels": labels[kept], "roi": roi[kept]}
                steps["top_k"] = {**results[-1], "roi": roi[keep]}
                rows = slice(sum(counts[:i]), sum(counts[: i + 1]))
                refinement.append({"proposals": proposals[i], "class_logits": scores[rows].float(),
                                   "box_deltas": deltas[rows].float(), "steps": steps})
        if record is not None:
            record["box_refinement"] = refinement
        return results

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, score_thresh={self.score_thresh}, nms_thresh={self.nms_thresh}, "
                f"detections_per_image={self.detections_per_image}")
