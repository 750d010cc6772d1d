"""The mask head: num_convs x (3x3 conv, ReLU), a 2x2 stride-2 deconv, a 1x1 conv giving one mask logit map
per class; with its own targets, loss and inference.

Shapes: F foreground RoIs over the batch; K classes; Sm mask-pool size (14); M mask size (28, whatever the
layers make of Sm: it is read from the logits, never assumed).
  features [F, C, Sm, Sm] -> convs -> deconv -> logits [F, K+1, M, M]
  targets [F, M, M]: the matched ground-truth mask RoIAligned over each RoI box (Mask R-CNN's target,
  mask_targets.py)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mask_targets import mask_targets


class MaskHead(nn.Module):
    def __init__(self, *, in_channels: int, conv_dim: int, num_convs: int, num_classes: int,
                 aligned: bool = True, soft_targets: bool = False):
        super().__init__()
        self.aligned = aligned  # RoIAlign's half-pixel rule when cutting targets from the ground-truth masks
        self.soft_targets = soft_targets  # torchvision: RoIAligned ground-truth masks are not thresholded
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
        """[F, C, Sm, Sm] pooled features -> logits [F, K+1, M, M]."""
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)  # in place: a conv's backward does not need its output
        return self.predictor(F.relu(self.deconv(x), inplace=True))

    @torch.no_grad()
    def targets(self, boxes: list[Tensor], matched_idx: list[Tensor], gt_masks: list[Tensor], size: int
                ) -> Tensor:
        """[F, size, size] float targets: per image, each RoI box [Fi, 4] cut from its matched ground-truth
        mask (gt_masks [Mi, H, W], index matched_idx [Fi]) as RoIAlign would (mask_targets.py computes it
        inside each box only); thresholded at 0.5 unless soft."""
        return torch.cat([mask_targets(masks, idx, b, size, self.aligned, self.soft_targets)
                          for b, idx, masks in zip(boxes, matched_idx, gt_masks)])

    def loss(self, logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
        """Per-pixel binary cross-entropy on the logits of each RoI's ground-truth class. logits [F, K+1, M, M],
        labels [F] 1..K, targets [F, M, M]."""
        if labels.numel() == 0:
            return logits.sum() * 0  # keeps the graph connected for DDP/AMP, value 0
        logits = logits[torch.arange(labels.numel(), device=labels.device), labels]  # [F, M, M]
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    @torch.no_grad()
    def inference(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mask probabilities [D, 1, M, M] of each detection's class (labels [D])."""
        probs = logits[torch.arange(labels.numel(), device=labels.device), labels].float().sigmoid()
        return probs[:, None]

    def extra_repr(self) -> str:
        return f"aligned={self.aligned}, soft_targets={self.soft_targets}"
