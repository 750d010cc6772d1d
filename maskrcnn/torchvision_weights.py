"""Weights from and to torchvision's Mask R-CNN (`torchvision.models.detection.maskrcnn_resnet50_fpn`).

    state = from_torchvision(tv_model.state_dict())        # torchvision names -> ours
    model.load_state_dict(state)                           # a model built from configs/torchvision_compat.yaml
    report = load_torchvision_coco(model, num_classes=4)   # --init torchvision: COCO weights, new predictors

The two models have the same tensors under different names:
  torchvision                                         ours
  backbone.body.{conv1,bn1,layer1..4}.*               bottom_up.{conv1,bn1,layer1..4}.*
  backbone.fpn.{inner,layer}_blocks.i.0.*             fpn.{inner,layer}_blocks.i.*            (plain Conv2d)
  rpn.head.conv.0.0.*                                 rpn.head.conv.*
  rpn.head.{cls_logits,bbox_pred}.*                   rpn.head.{cls_logits,bbox_pred}.*
  roi_heads.box_head.{fc6,fc7}.*                      roi_heads.box_head.{fc6,fc7}.*
  roi_heads.box_predictor.{cls_score,bbox_pred}.*     roi_heads.box_head.{cls_score,bbox_pred}.*
  roi_heads.mask_head.i.0.*                           roi_heads.mask_head.convs.i.*
  roi_heads.mask_predictor.conv5_mask.*               roi_heads.mask_head.deconv.*
  roi_heads.mask_predictor.mask_fcn_logits.*          roi_heads.mask_head.predictor.*
Older torchvision checkpoints (like the COCO_V1 file) use the version-1 names `backbone.fpn.inner_blocks.i.*`,
`rpn.head.conv.*` and `roi_heads.mask_head.mask_fcn{i+1}.*`; they are read too. BatchNorm's
`num_batches_tracked` counters have no counterpart in FrozenBatchNorm2d and are dropped.
Class indices are the same: torchvision's 91 outputs are background + 90 COCO category ids (our K = 90).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .model.backbone import FrozenBatchNorm2d, fetch_torchvision_weights
from .engine.checkpoint import LoadReport, partial_load

# (torchvision pattern, our name); the first pattern that matches a key wins.
_FROM_TV: list[tuple[str, str]] = [
    (r"backbone\.body\.(.+)", r"bottom_up.\1"),
    (r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.(weight|bias)", r"fpn.\1.\2.\3"),
    (r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)", r"fpn.\1.\2.\3"),  # version 1
    (r"rpn\.head\.conv\.0\.0\.(weight|bias)", r"rpn.head.conv.\1"),
    (r"rpn\.head\.conv\.(weight|bias)", r"rpn.head.conv.\1"),  # version 1
    (r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", r"rpn.head.\1.\2"),
    (r"roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)", r"roi_heads.box_head.\1.\2"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_head.\1.\2"),
    (r"roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)", r"roi_heads.mask_head.convs.\1.\2"),
    (r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)", r"roi_heads.mask_head.deconv.\1"),
    (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)", r"roi_heads.mask_head.predictor.\1"),
]
# Ours -> torchvision's current (version 2) names.
_TO_TV: list[tuple[str, str]] = [
    (r"bottom_up\.(.+)", r"backbone.body.\1"),
    (r"fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)", r"backbone.fpn.\1.\2.0.\3"),
    (r"rpn\.head\.conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
    (r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", r"rpn.head.\1.\2"),
    (r"roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)", r"roi_heads.box_head.\1.\2"),
    (r"roi_heads\.box_head\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_predictor.\1.\2"),
    (r"roi_heads\.mask_head\.convs\.(\d+)\.(weight|bias)", r"roi_heads.mask_head.\1.0.\2"),
    (r"roi_heads\.mask_head\.deconv\.(weight|bias)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"roi_heads\.mask_head\.predictor\.(weight|bias)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]
_LEGACY_MASK_CONV = re.compile(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)")  # 1-based in version 1

# The tensors that depend on the number of classes (our names).
PREDICTOR_KEYS = ("roi_heads.box_head.cls_score.", "roi_heads.box_head.bbox_pred.", "roi_heads.mask_head.predictor.")


class UnmappedKeysError(KeyError):
    """A state dict holds keys that have no counterpart in the other model."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _rename(key: str, rules: list[tuple[str, str]]) -> Optional[str]:
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _convert(state_dict: dict[str, Tensor], rules: list[tuple[str, str]], direction: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue  # BatchNorm's step counter: not part of the function the weights compute
        legacy = _LEGACY_MASK_CONV.fullmatch(key) if direction == "from" else None
        if legacy:
            key = f"roi_heads.mask_head.{int(legacy.group(1)) - 1}.0.{legacy.group(2)}"
        new = _rename(key, rules)
        if new is None:
            unmapped.append(key)
        elif new in out:
            raise UnmappedKeysError(f"two keys map onto {new} (mixed old and new torchvision names?)")
        else:
            out[new] = value
    if unmapped:
        source = "torchvision" if direction == "from" else "maskrcnn"
        raise UnmappedKeysError(f"{len(unmapped)} {source} keys have no counterpart: {', '.join(unmapped)}")
    return out


def from_torchvision(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision Mask R-CNN (R50-FPN) state dict under this project's module names. Raises
    UnmappedKeysError listing every key that does not map (e.g. a keypoint head, or a v2 model's conv
    box head)."""
    return _convert(state_dict, _FROM_TV, "from")


def to_torchvision(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of from_torchvision: our state dict under torchvision's (version 2) names. torchvision's
    BatchNorm layers restore their missing `num_batches_tracked` themselves."""
    return _convert(state_dict, _TO_TV, "to")


# ----------------------------------------------------------------------------------- COCO transfer
@dataclass
class TorchvisionInitReport:
    source: str
    load: LoadReport
    reinitialised: list[str] = field(default_factory=list)  # predictor tensors given a fresh init
    class_rows: Optional[list[int]] = None  # torchvision output index of each of our classes 0..K, if mapped
    frozen_bn_eps: float = 0.0

    def summary(self) -> str:
        lines = [self.load.summary().replace(f"init from {self.load.source}", f"init from {self.source}", 1)]
        if self.class_rows is not None:
            lines.append(f"  class predictors: rows {self.class_rows[1:]} of torchvision's 91 (by category name)")
        if self.reinitialised:
            lines.append("  re-initialised (number of classes differs): "
                         + ", ".join(sorted({k.rsplit('.', 1)[0] for k in self.reinitialised})))
        lines.append(f"  FrozenBatchNorm eps set to {self.frozen_bn_eps} (as torchvision does for these weights)")
        return "\n".join(lines)


def _select_classes(state: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """Keep the predictor outputs of torchvision's classes `rows` (background first), in that order."""
    idx = torch.tensor(rows)
    box_idx = (idx[:, None] * 4 + torch.arange(4)).reshape(-1)  # class c owns delta rows 4c..4c+3
    state = dict(state)
    for key in list(state):
        if key.startswith(("roi_heads.box_head.cls_score.", "roi_heads.mask_head.predictor.")):
            state[key] = state[key][idx]
        elif key.startswith("roi_heads.box_head.bbox_pred."):
            state[key] = state[key][box_idx]
    return state


def load_torchvision_coco(model: nn.Module, num_classes: int, class_names: Optional[Sequence[str]] = None,
                          cfg=None) -> TorchvisionInitReport:
    """Initialise `model` (built from a torchvision-compatible config: ResNet-50, 256-channel FPN, 3 anchors
    per location, 7x7 / 14x14 pooling, 1024-d box head) from torchvision's COCO Mask R-CNN weights
    (MaskRCNN_ResNet50_FPN_Weights.COCO_V1, 37.9 box / 34.6 mask AP).

    num_classes: K of the model (background excluded). With K = 90 the COCO predictors load as they are.
    Otherwise, when every name of `class_names` (our classes 1..K, or 0..K with "__background__" first)
    is a COCO category, the predictor rows of those categories are kept; else the class-score, box-delta
    and mask predictors keep a fresh initialisation (listed in the report).
    cfg: if given, cfg.model.backbone.frozen_bn_eps is set to 0.0 so that a saved config rebuilds the same
    model. Offline without a cached file it raises WeightsUnavailable naming the file and where to put it.
    """
    import torchvision  # local: only this function downloads anything

    weights = torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    tv_state, filename = fetch_torchvision_weights(weights, "torchvision's COCO Mask R-CNN weights")
    return load_torchvision_state(model, tv_state, num_classes, class_names, cfg,
                                  source=f"torchvision COCO_V1 ({filename})",
                                  categories=weights.meta["categories"])


def load_torchvision_state(model: nn.Module, tv_state: dict[str, Tensor], num_classes: int,
                           class_names: Optional[Sequence[str]] = None, cfg=None, source: str = "torchvision",
                           categories: Optional[Sequence[str]] = None, frozen_bn_eps: float = 0.0
                           ) -> TorchvisionInitReport:
    """The work of load_torchvision_coco on a state dict already in memory (also used by the tests)."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and roi_heads.box_head.num_classes != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model predicts {roi_heads.box_head.num_classes} classes")
    state = from_torchvision(tv_state)
    score = state.get("roi_heads.box_head.cls_score.weight")
    tv_classes = num_classes + 1 if score is None else score.shape[0]  # background included
    class_rows = None
    if num_classes + 1 != tv_classes:
        names = list(class_names or [])
        if names and names[0] == "__background__":
            names = names[1:]
        lookup = {name: i for i, name in enumerate(categories or [])}
        if len(names) == num_classes and all(n in lookup for n in names):
            class_rows = [0] + [lookup[n] for n in names]
            state = _select_classes(state, class_rows)
    reinitialised = []
    if num_classes + 1 != tv_classes and class_rows is None:
        reinitialised = [k for k in state if k.startswith(PREDICTOR_KEYS)]
        state = {k: v for k, v in state.items() if k not in reinitialised}
        if roi_heads is not None:
            roi_heads.box_head.reset_predictor()
            if roi_heads.mask_head is not None:
                roi_heads.mask_head.reset_predictor()
    report = partial_load(model, state)
    report.source = source
    if report.skipped:
        raise ValueError(f"{source} does not fit this model (is it built from configs/torchvision_compat.yaml?): "
                         + "; ".join(report.skipped[:5]))
    for module in model.modules():  # torchvision: overwrite_eps(model, 0.0) for these weights
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = frozen_bn_eps
    if cfg is not None:
        cfg.model.backbone.frozen_bn_eps = frozen_bn_eps
    return TorchvisionInitReport(source, report, reinitialised, class_rows, frozen_bn_eps)
