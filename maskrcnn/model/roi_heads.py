"""RoI heads: proposal labelling and sampling, the Fast R-CNN box head, the mask head, their losses, and
inference (class-specific decoding, per-class NMS, top-k, mask probabilities).

Shapes: N images; R sampled RoIs over the batch (Ri per image); K classes (labels 1..K, 0 background);
S box-pool size (7), Sm mask-pool size (14), 2*Sm mask size (28); D detections.
  box features [R, C, S, S] -> fc -> [R, 1024] -> scores [R, K+1], deltas [R, 4(K+1)]
  mask features [R, C, Sm, Sm] -> 4 convs -> deconv -> logits [R, K+1, 2Sm, 2Sm]
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .box_coder import BoxCoder
from .box_ops import box_iou, clip_boxes, nonempty
from .losses import smooth_l1_sum
from .matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher
from .poolers import MultiScaleRoIAlign, rois_from_boxes
from .sampler import BalancedSampler


class BoxHead(nn.Module):
    """Two shared FC layers (fc6, fc7) then the class scores and class-specific box deltas."""

    def __init__(self, in_channels: int, resolution: int, fc_dim: int, num_classes: int):
        super().__init__()
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
        # ReLUs in place: a linear layer's or conv's backward does not need its output (saves a copy)
        x = F.relu(self.fc6(x.flatten(1)), inplace=True)  # [R, C*S*S] -> [R, fc_dim]
        x = F.relu(self.fc7(x), inplace=True)
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """num_convs x (3x3 conv, ReLU), 2x2 stride-2 deconv, ReLU, 1x1 conv: one mask logit map per class."""

    def __init__(self, in_channels: int, conv_dim: int, num_convs: int, num_classes: int):
        super().__init__()
        convs, c = [], in_channels
        for _ in range(num_convs):
            convs.append(nn.Conv2d(c, conv_dim, 3, padding=1))
            c = conv_dim
        self.convs = nn.ModuleList(convs)
        self.deconv = nn.ConvTranspose2d(c, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes + 1, 1)  # channel 0 (background) is unused
        for layer in [*self.convs, self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(layer.bias, 0)
        self.reset_predictor()

    def reset_predictor(self) -> None:
        """A fresh per-class 1x1 mask predictor (also used when fine-tuning on other classes)."""
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)  # in place: a conv's backward does not need its output
        return self.predictor(F.relu(self.deconv(x), inplace=True))


class RoIHeads(nn.Module):
    def __init__(
        self,
        in_features: list[str],
        box_pooler: MultiScaleRoIAlign,
        box_head: BoxHead,
        mask_pooler: Optional[MultiScaleRoIAlign],
        mask_head: Optional[MaskHead],
        box_coder: BoxCoder,
        matcher: Matcher,
        sampler: BalancedSampler,
        num_classes: int,
        add_gt_as_proposals: bool = True,
        smooth_l1_beta: float = 0.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        mask_aligned: bool = True,
        min_box_size: float = 1e-2,  # detections with a side below this (px) are dropped
        mask_soft_targets: bool = False,  # torchvision: RoIAligned GT masks are not thresholded
    ):
        super().__init__()
        self.in_features = in_features
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.num_classes = num_classes
        self.add_gt_as_proposals = add_gt_as_proposals
        self.smooth_l1_beta = smooth_l1_beta
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.mask_aligned = mask_aligned
        self.min_box_size = min_box_size
        self.mask_soft_targets = mask_soft_targets

    @property
    def mask_on(self) -> bool:
        return self.mask_head is not None

    # -------------------------------------------------------------------------------------- sampling
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
            if gt_labels.numel():
                labels = gt_labels[matched_idx].clone()
            else:
                labels = torch.zeros_like(matches)
            labels[matches == BELOW_LOW_THRESHOLD] = 0
            labels[matches == BETWEEN_THRESHOLDS] = -1  # ignored (only when bg_iou < fg_iou)
            pos, neg = self.sampler(labels)
            keep = torch.cat((pos, neg))
            out.append({"boxes": boxes[keep], "labels": labels[keep], "matched_idx": matched_idx[keep]})
        return out

    # -------------------------------------------------------------------------------------- forward
    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: Optional[list[dict]] = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """proposals: list of [Pi, 4] (constants). Training: ([], losses); eval: (detections per image, {})."""
        feats = self.box_pooler.prepare([features[name] for name in self.in_features])
        if self.training:
            if targets is None:
                raise ValueError("RoI heads in training mode need targets")
            samples = self.sample_proposals(proposals, targets)
            return [], self.losses(feats, samples, targets)
        return self.inference(feats, proposals, image_sizes), {}

    def losses(self, feats: list[Tensor], samples: list[dict], targets: list[dict]) -> dict[str, Tensor]:
        boxes = [s["boxes"] for s in samples]
        labels = torch.cat([s["labels"] for s in samples])  # [R]
        scores, deltas = self.box_head(self.box_pooler(feats, boxes))
        if labels.numel() == 0:  # no RoI sampled at all (no proposals, no GT): zero losses, graph kept
            zero = scores.sum() * 0 + deltas.sum() * 0
            losses = {"loss_cls": zero, "loss_box": zero.clone()}
            if self.mask_on:
                losses["loss_mask"] = self.mask_loss(feats, samples, targets)
            return losses
        loss_cls = F.cross_entropy(scores.float(), labels)
        # Box regression on foreground RoIs, on the deltas of their GT class; normalised by all sampled RoIs.
        fg = torch.nonzero(labels > 0).squeeze(1)
        matched_gt = torch.cat([t["boxes"][s["matched_idx"]] if t["boxes"].numel() else s["boxes"]
                                for s, t in zip(samples, targets)])
        reg_targets = self.box_coder.encode(torch.cat(boxes)[fg], matched_gt[fg])
        fg_deltas = deltas.view(deltas.shape[0], self.num_classes + 1, 4)[fg, labels[fg]]  # [F, 4]
        loss_box = smooth_l1_sum(fg_deltas, reg_targets, self.smooth_l1_beta) / max(1, labels.numel())
        losses = {"loss_cls": loss_cls, "loss_box": loss_box}
        if self.mask_on:
            losses["loss_mask"] = self.mask_loss(feats, samples, targets)
        return losses

    def mask_loss(self, feats: list[Tensor], samples: list[dict], targets: list[dict]) -> Tensor:
        fg_boxes, fg_targets, fg_labels = [], [], []
        for s, t in zip(samples, targets):
            fg = torch.nonzero(s["labels"] > 0).squeeze(1)
            boxes = s["boxes"][fg]
            fg_boxes.append(boxes)
            fg_labels.append(s["labels"][fg])
            if fg.numel() == 0:
                fg_targets.append(boxes.new_zeros((0, self.mask_output_size(), self.mask_output_size())))
                continue
            # Mask targets: RoIAlign of the matched GT mask over the proposal box (Mask R-CNN's target). The
            # RoI's batch index is its matched GT, so the M masks are converted once, not copied per RoI.
            gt = t["masks"][:, None].to(boxes.dtype)  # [M, 1, H, W]
            rois = torch.cat((s["matched_idx"][fg].to(boxes.dtype)[:, None], boxes), 1)  # [Fi, 5]
            size = self.mask_output_size()
            m = self.mask_pooler._roi_align(gt, rois, (size, size), spatial_scale=1.0, sampling_ratio=0,
                                             aligned=self.mask_aligned)
            fg_targets.append(m[:, 0] if self.mask_soft_targets else (m[:, 0] >= 0.5).to(boxes.dtype))
        logits = self.mask_head(self.mask_pooler(feats, fg_boxes))  # [F, K+1, M, M]
        labels = torch.cat(fg_labels)
        if labels.numel() == 0:
            return logits.sum() * 0  # keeps the graph connected for DDP/AMP, value 0
        logits = logits[torch.arange(labels.numel(), device=labels.device), labels]  # [F, M, M]
        return F.binary_cross_entropy_with_logits(logits.float(), torch.cat(fg_targets).float())

    def mask_output_size(self) -> int:
        return 2 * self.mask_pooler.output_size

    # ------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def inference(self, feats: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
                  ) -> list[dict[str, Tensor]]:
        scores, deltas = self.box_head(self.box_pooler(feats, proposals))
        probs = F.softmax(scores.float(), dim=-1)[:, 1:]  # [R, K], background dropped
        boxes = self.box_coder.decode(deltas, torch.cat(proposals))  # [R, 4(K+1)]
        boxes = boxes.view(-1, self.num_classes + 1, 4)[:, 1:]  # [R, K, 4]
        k = self.num_classes
        results = []
        for i, (p, probs_i, boxes_i) in enumerate(zip(proposals, probs.split([len(p) for p in proposals]),
                                                      boxes.split([len(p) for p in proposals]))):
            b = clip_boxes(boxes_i, image_sizes[i]).reshape(-1, 4)  # [Ri*K, 4], class-major inside each RoI
            s = probs_i.reshape(-1)
            labels = torch.arange(1, k + 1, device=b.device).repeat(len(p))
            keep = (s > self.score_thresh) & nonempty(b, self.min_box_size)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_image]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
        if self.mask_on:
            det_boxes = [r["boxes"] for r in results]
            logits = self.mask_head(self.mask_pooler(feats, det_boxes))  # [D, K+1, M, M]
            labels = torch.cat([r["labels"] for r in results])
            probs_m = logits[torch.arange(labels.numel(), device=labels.device), labels].float().sigmoid()
            for r, m in zip(results, probs_m.split([len(b) for b in det_boxes])):
                r["masks"] = m[:, None]  # [Di, 1, M, M], pasted into the image by the model's postprocess
        return results
