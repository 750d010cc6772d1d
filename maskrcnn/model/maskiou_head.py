"""Mask Scoring R-CNN's mask head (Huang et al., "Mask Scoring R-CNN", CVPR 2019): the standard mask head plus a
MaskIoU branch that predicts, per class, the IoU of the predicted mask with its ground truth, learns it with its
own loss and rescores each detection's mask: mask score = detection score x predicted mask IoU. Chosen with
`model.roi_heads.mask_head: maskiou`; it subclasses MaskHead and changes nothing there.

Shapes: F foreground RoIs (training) or D detections (inference); K classes; C, Sm = 14 the mask pooler's
channels and size; M = 28 the mask size.
  pooled [F, C, Sm, Sm] -> MaskHead -> mask logits [F, K+1, M, M]
  MaskIoU branch: cat(pooled, maxpool2x2(sigmoid(mask logits of the class))) [F, C+1, Sm, Sm]
    -> 3 x (3x3 conv, ReLU) -> 3x3 conv stride 2, ReLU -> [F, conv_dim, 7, 7] (Sm = 14; others averaged to 7)
    -> fc 1024, ReLU -> fc 1024, ReLU -> fc K+1 -> predicted IoU [F, K+1] (the class's column is read)
  target: IoU of the predicted mask binarised at 0.5 with the RoI's ground-truth mask, in the RoI's M x M frame:
  the overlap with the mask target [F, M, M] over the union with the whole ground-truth mask, whose area there is
  the target's area divided by the fraction of the mask's pixels inside the RoI box (the official code's rule: a
  mask that sticks out of its RoI cannot be matched by a mask predicted inside it);
  loss_maskiou: L2 (mean squared error) over the foreground RoIs, weight 1.0.

One choice the paper leaves open: the predicted mask enters the branch detached (the MaskIoU loss trains the
branch and the shared RoI features, not the mask predictor).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mask_head import MaskHead
from .roi_heads import Samples


IOU_SIDE = 7  # the convs' output side for the standard 14x14 mask pool; another pool size is averaged to it


class MaskIoUHead(MaskHead):
    def __init__(self, *, in_channels: int, conv_dim: int, num_convs: int, num_classes: int,
                 aligned: bool = True, soft_targets: bool = False, iou_fc_dim: int = 1024):
        super().__init__(in_channels=in_channels, conv_dim=conv_dim, num_convs=num_convs, num_classes=num_classes,
                         aligned=aligned, soft_targets=soft_targets)
        # 4 convs as the mask head's, the last with stride 2 (the official implementation): 14 -> 7
        c, iou_convs = in_channels + 1, []
        for i in range(4):
            iou_convs.append(nn.Conv2d(c, conv_dim, 3, stride=2 if i == 3 else 1, padding=1))
            c = conv_dim
        self.iou_convs = nn.ModuleList(iou_convs)
        self.iou_fc1 = nn.Linear(conv_dim * IOU_SIDE * IOU_SIDE, iou_fc_dim)
        self.iou_fc2 = nn.Linear(iou_fc_dim, iou_fc_dim)
        self.iou_pred = nn.Linear(iou_fc_dim, num_classes + 1)  # column 0 (background) is unused
        for layer in self.iou_convs:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(layer.bias, 0)
        for fc in (self.iou_fc1, self.iou_fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.constant_(fc.bias, 0)
        self._reset_iou_predictor()

    def _reset_iou_predictor(self) -> None:
        nn.init.normal_(self.iou_pred.weight, std=0.01)
        nn.init.constant_(self.iou_pred.bias, 0)

    def reset_predictor(self) -> None:
        """Fresh per-class mask and mask-IoU predictors (also used when fine-tuning on other classes)."""
        super().reset_predictor()
        if hasattr(self, "iou_pred"):  # MaskHead.__init__ calls this before the branch exists
            self._reset_iou_predictor()

    def forward(self, x: Tensor) -> tuple[Any, Tensor]:
        """[F, C, Sm, Sm] pooled features -> (the mask head's predictions: logits [F, K+1, M, M] in training,
        MaskFeatures in inference; the pooled features for the MaskIoU branch, which needs each RoI's class: it
        runs in losses and inference)."""
        return super().forward(x), x

    def predict_iou(self, pooled: Tensor, class_logits: Tensor, labels: Tensor) -> Tensor:
        """pooled [F, C, Sm, Sm], the mask logits of each RoI's class [F, M, M], labels [F] -> predicted mask
        IoU [F] of that class."""
        mask = F.max_pool2d(class_logits.detach().sigmoid()[:, None], kernel_size=2, stride=2)  # [F, 1, Sm, Sm]
        x = torch.cat((pooled, mask.to(pooled.dtype)), 1)
        for conv in self.iou_convs:
            x = F.relu(conv(x))
        x = F.adaptive_avg_pool2d(x, IOU_SIDE)  # the identity for the standard 14x14 pool (7x7 here)
        x = F.relu(self.iou_fc1(x.flatten(1)))
        x = F.relu(self.iou_fc2(x))
        return self.iou_pred(x)[torch.arange(labels.numel(), device=labels.device), labels]

    @staticmethod
    @torch.no_grad()
    def iou_targets(class_logits: Tensor, target_masks: Tensor, inside: Optional[Tensor] = None) -> Tensor:
        """[F, M, M] mask logits and mask targets, [F] the fraction of each ground-truth mask inside its RoI
        (None: all of it) -> [F] IoU of the mask binarised at 0.5 (logit > 0) with the ground-truth mask: overlap
        with the target binarised at 0.5, over the predicted area + the target's area / inside - the overlap;
        0 where both are empty."""
        pred, gt = class_logits > 0, target_masks >= 0.5
        inter = (pred & gt).flatten(1).sum(1).float()
        gt_area = gt.flatten(1).sum(1).float()
        if inside is not None:
            gt_area = gt_area / inside.clamp(min=1e-6)
        union = pred.flatten(1).sum(1).float() + gt_area - inter
        return inter / union.clamp(min=1)

    @staticmethod
    @torch.no_grad()
    def fraction_inside(samples: Samples, targets: list[dict]) -> Tensor:
        """[F]: per RoI, the fraction of its matched ground-truth mask's pixels inside the RoI box (rounded to
        whole pixels), from a summed-area table of each image's masks (no loop over RoIs); 1 for an empty mask."""
        out = []
        for s, t in zip(samples, targets):
            masks = t["masks"]  # [Mi, H, W]
            h, w = masks.shape[-2:]
            table = F.pad(masks.to(torch.int32).cumsum(1).cumsum(2), (1, 0, 1, 0))  # [Mi, H+1, W+1]
            box = s["boxes"].round().long()
            x0, x1 = box[:, 0].clamp(0, w), box[:, 2].clamp(0, w)
            y0, y1 = box[:, 1].clamp(0, h), box[:, 3].clamp(0, h)
            x1, y1 = torch.maximum(x0, x1), torch.maximum(y0, y1)
            m = s["matched_idx"]
            inside = table[m, y1, x1] - table[m, y0, x1] - table[m, y1, x0] + table[m, y0, x0]
            total = table[m, h, w]
            out.append(torch.where(total > 0, inside.float() / total.clamp(min=1).float(), torch.ones_like(
                inside, dtype=torch.float32)))
        return torch.cat(out)

    def losses(self, predictions: tuple[Tensor, Tensor], samples: Samples, targets: list[dict],
               stats: Optional[dict] = None) -> dict[str, Tensor]:
        """The mask head's {"loss_mask"} and {"loss_maskiou"}: the mean squared error of the predicted IoU of
        each foreground RoI's ground-truth class against iou_targets."""
        logits, pooled = predictions
        losses = super().losses(logits, samples, targets, stats)
        labels = torch.cat([s["labels"] for s in samples])  # [F] 1..K
        if labels.numel() == 0:  # keeps the graph connected for DDP/AMP, value 0
            return {**losses, "loss_maskiou": sum(p.sum() * 0 for p in self._iou_parameters())}
        class_logits = logits[torch.arange(labels.numel(), device=labels.device), labels]  # [F, M, M]
        target_masks = self.targets(samples, targets, logits.shape[-1])
        iou = self.predict_iou(pooled, class_logits, labels)
        target = self.iou_targets(class_logits, target_masks, self.fraction_inside(samples, targets))
        return {**losses, "loss_maskiou": F.mse_loss(iou.float(), target)}

    def _iou_parameters(self):
        return [p for name, p in self.named_parameters() if name.startswith("iou_")]

    @torch.no_grad()
    def inference(self, predictions: tuple[Tensor, Tensor], results: list[dict], record: Optional[dict] = None
                  ) -> list[dict]:
        """The mask head's "masks", and per detection "mask_iou" [Di] (the predicted IoU of its mask) and
        "mask_scores" [Di] = scores x mask_iou, the score its mask is ranked by in mask AP."""
        logits, pooled = predictions
        labels = torch.cat([r["labels"] for r in results])
        class_logits = self.class_logits(logits, labels)  # once, for the masks and the MaskIoU branch
        results = self.attach_masks(class_logits, results, record)
        iou = self.predict_iou(pooled, class_logits, labels).float().clamp(0, 1)
        for r, v in zip(results, iou.split([len(r["boxes"]) for r in results])):
            r["mask_iou"] = v
            r["mask_scores"] = r["scores"] * v
        return results
