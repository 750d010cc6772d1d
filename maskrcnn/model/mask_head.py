"""The mask head: num_convs x (3x3 conv, ReLU), a 2x2 stride-2 deconv, a 1x1 conv giving one mask logit map
per class; with its own choice of RoIs (the foreground ones), targets, loss and inference: a RoIHead.

Shapes: F foreground RoIs over the batch; K classes; Sm mask-pool size (14); M mask size (28, whatever the
layers make of Sm: it is read from the logits, never assumed).
  features [F, C, Sm, Sm] -> convs -> deconv -> logits [F, K+1, M, M]
  targets [F, M, M]: the matched ground-truth mask RoIAligned over each RoI box (Mask R-CNN's target,
  mask_targets.py)
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fuse import inference_channels_last
from .losses import ratio
from .mask_targets import mask_targets
from .roi_heads import RoIHead, Samples


class MaskFeatures(NamedTuple):
    """What the mask head's forward gives in inference: the deconvolution's features [F, C, M, M], before the
    per-class 1x1 predictor. A detection needs the mask of its own class only, and the predictor is a dot
    product per pixel, so `MaskHead.class_logits` computes that one map instead of K + 1 and dropping K (with 91
    maps the predictor was ~12% of the head's time, 200 RoIs on an AVX2 CPU)."""
    features: Tensor


class MaskHead(RoIHead):
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

    def forward(self, x: Tensor) -> Union[Tensor, MaskFeatures]:
        """[F, C, Sm, Sm] pooled features -> logits [F, K+1, M, M] in training; in inference MaskFeatures (the
        features the predictor reads: `class_logits` gives each detection's class). On a CPU the head runs in
        channels-last memory format where that gains (fuse.inference_channels_last: AVX2 and AVX-512 CPUs): on many
        small RoIs oneDNN's convolutions are faster so (the 3x3 convs 1.2x, the deconvolution 1.9x, 200 RoIs of
        14x14 on an AVX2 CPU); elsewhere in the standard layout (with ATen's scalar kernels the channels-last head
        took 1.14x torchvision's, 2 x 100 detections). On CUDA it keeps the pooler's layout."""
        if x.device.type == "cpu":
            cl = inference_channels_last("auto", x.device)
            x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)  # in place: a conv's backward does not need its output
        x = F.relu(self.deconv(x), inplace=True)
        return self.predictor(x) if self.training else MaskFeatures(x)

    def class_logits(self, predictions: Union[Tensor, MaskFeatures], labels: Tensor) -> Tensor:
        """The logits [F, M, M] of class labels[i] for RoI i: indexed from every class's logits [F, K+1, M, M], or
        computed from MaskFeatures for that class only (the 1x1 predictor's row of that class)."""
        if isinstance(predictions, MaskFeatures):
            h = predictions.features
            w = self.predictor.weight[labels].flatten(1).to(h.dtype)  # [F, C]
            return torch.einsum("fchw,fc->fhw", h, w) + self.predictor.bias[labels].to(h.dtype)[:, None, None]
        return predictions[torch.arange(labels.numel(), device=labels.device), labels]

    def select(self, samples: Samples) -> Samples:
        """The foreground RoIs of each image (a mask is learnt only where there is an object)."""
        return [{k: v[s["labels"] > 0] for k, v in s.items()} for s in samples]

    @torch.no_grad()
    def targets(self, samples: Samples, targets: list[dict], size: int = 28) -> Tensor:
        """[F, size, size] float targets: per image, each foreground RoI box cut from its matched ground-truth
        mask (targets[i]["masks"] [Mi, H, W]) as RoIAlign would (mask_targets.py computes it inside each box
        only); thresholded at 0.5 unless soft."""
        return torch.cat([mask_targets(t["masks"], s["matched_idx"], s["boxes"], size, self.aligned,
                                       self.soft_targets) for s, t in zip(samples, targets)])

    def losses(self, predictions: Tensor, samples: Samples, targets: list[dict], stats: Optional[dict] = None
               ) -> dict[str, Tensor]:
        """{"loss_mask": per-pixel binary cross-entropy on the logits [F, K+1, M, M] of each foreground RoI's
        ground-truth class}, against targets of the logits' own size M. `stats` receives mask_accuracy: the
        fraction of those pixels whose logit > 0 agrees with target >= 0.5."""
        logits = predictions
        labels = torch.cat([s["labels"] for s in samples])  # [F] 1..K
        if labels.numel() == 0:
            if stats is not None:
                stats["mask_accuracy"] = ratio(logits.new_zeros(()), 0)
            return {"loss_mask": logits.sum() * 0}  # keeps the graph connected for DDP/AMP, value 0
        target_masks = self.targets(samples, targets, logits.shape[-1])
        logits = logits[torch.arange(labels.numel(), device=labels.device), labels]  # [F, M, M]
        if stats is not None:
            stats["mask_accuracy"] = ratio(((logits.detach() > 0) == (target_masks >= 0.5)).sum(),
                                           target_masks.numel())
        return {"loss_mask": F.binary_cross_entropy_with_logits(logits.float(), target_masks.float())}

    def inference_rois(self, results: list[dict]) -> list[Tensor]:
        """The detected boxes."""
        return [r["boxes"] for r in results]

    @torch.no_grad()
    def inference(self, predictions: Union[Tensor, MaskFeatures], results: list[dict], record: Optional[dict] = None
                  ) -> list[dict]:
        """Each detection gets "masks" [Di, 1, M, M]: the mask probabilities of its class (pasted into the image
        by the model's postprocess). `record` receives "mask_logits": per image [Di, M, M], the logits of each
        detection's class before the sigmoid."""
        labels = torch.cat([r["labels"] for r in results])
        return self.attach_masks(self.class_logits(predictions, labels), results, record)

    def attach_masks(self, class_logits: Tensor, results: list[dict], record: Optional[dict] = None) -> list[dict]:
        """inference's second half: each detection's "masks" from the logits of its class [D, M, M]."""
        logits = class_logits.float()
        probs = logits.sigmoid()[:, None]
        counts = [len(r["boxes"]) for r in results]
        for r, m in zip(results, probs.split(counts)):
            r["masks"] = m
        if record is not None:
            record["mask_logits"] = list(logits.split(counts))
        return results

    def extra_repr(self) -> str:
        return f"aligned={self.aligned}, soft_targets={self.soft_targets}"
