"""How well the anchors fit the ground truth, over a whole split, and anchors that would fit better.

    gt = ground_truth(train_set, model.transform)          # every GT box in model-input pixels (test resize)
    grids = anchor_grids(model, gt)                        # one probe per padded input size: feature sizes
    fit = anchor_fit(gt, grids, model.rpn.anchor_generator, model.rpn.matcher, model.rpn.in_features)
    summary = summarise(fit, model.rpn.anchor_generator.sizes, model.rpn.in_features)
    sizes, ratios = suggest_anchors(gt.wh, num_sizes=5, num_ratios=3)   # k-means, 1 - IoU of centred boxes

Shapes: G ground-truth boxes over the split; A anchors of one image (all levels); L anchor levels.
Boxes are read from the annotations (no image is decoded) and resized as the model's test-time transform
resizes its input; the anchors are the model's (its AnchorGenerator on the feature sizes that the model's own
probe reports for that input size) and positives are what the model's Matcher makes of them, so the
low-quality rule and its ties are the RPN's own. A loop over images is the only loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data.coco import instance_box
from ..model.box_ops import box_iou
from ..model.transform import resize_boxes, resized_size

# COCO's object-size buckets (area in px^2), here in model-input pixels
SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))
# aspect ratio h / w (the anchors' convention)
RATIO_BUCKETS = (("h/w < 1/3", 0.0, 1 / 3), ("h/w 1/3 - 2/3", 1 / 3, 2 / 3), ("h/w 2/3 - 3/2", 2 / 3, 1.5),
                 ("h/w 3/2 - 3", 1.5, 3.0), ("h/w > 3", 3.0, math.inf))


@dataclass
class GroundTruth:
    """Every ground-truth box of a split in model-input pixels (after the test-time resize)."""
    boxes: Tensor  # [G, 4] xyxy
    image: Tensor  # [G] index of the box's image
    original_sizes: list[tuple[int, int]]  # (h, w) per image, as stored
    input_sizes: list[tuple[int, int]]  # (h, w) per image after the resize
    padded_sizes: list[tuple[int, int]]  # (Hp, Wp) of the image alone in a batch

    @property
    def wh(self) -> np.ndarray:
        """[G, 2] widths and heights."""
        b = self.boxes.double().numpy()
        return np.stack((b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1)

    @property
    def per_image(self) -> np.ndarray:
        """[num images] number of boxes in each image."""
        return np.bincount(self.image.numpy(), minlength=len(self.input_sizes))


def ground_truth(dataset, transform, max_images: int = 0) -> GroundTruth:
    """GT boxes of a CocoInstances split as the model receives them at test time: crowd regions, other
    categories and degenerate boxes left out (as the dataset does), resized by `transform`'s test size."""
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    boxes, owner, orig, sizes, padded = [], [], [], [], []
    d = transform.size_divisibility
    for i in range(n):  # a loop over images; their annotations only, no pixels
        info = dataset.image_info(i)
        h, w = int(info["height"]), int(info["width"])
        kept = []
        for ann in dataset.coco.imgToAnns.get(info["id"], ()):
            if ann["category_id"] not in dataset.cat_id_to_contiguous or ann.get("iscrowd", 0):
                continue
            box = instance_box(ann["bbox"], w, h, dataset.min_box_size)
            if box is not None:
                kept.append(box)
        new = resized_size(h, w, transform.min_size_test, transform.max_size_test, transform.resize_rounding)
        b = torch.tensor(kept, dtype=torch.float32).reshape(-1, 4)
        boxes.append(resize_boxes(b, (h, w), new))
        owner.append(torch.full((len(b),), i, dtype=torch.int64))
        orig.append((h, w))
        sizes.append(new)
        padded.append((int(math.ceil(new[0] / d) * d), int(math.ceil(new[1] / d) * d)))
    return GroundTruth(torch.cat(boxes) if boxes else torch.zeros((0, 4)),
                       torch.cat(owner) if owner else torch.zeros((0,), dtype=torch.int64), orig, sizes, padded)


@dataclass
class Grid:
    """What the anchors of one padded input size need: the feature size of each anchor level."""
    padded_size: tuple[int, int]
    feature_sizes: list[tuple[int, int]]


@torch.no_grad()
def anchor_grids(model, gt: GroundTruth) -> dict[tuple[int, int], Grid]:
    """{padded size: Grid} from one probe of the model per distinct padded input size (a blank image of the
    original size of one image of that group, so the model's own resize and padding decide)."""
    grids: dict[tuple[int, int], Grid] = {}
    device = next(model.parameters()).device
    for i, padded in enumerate(gt.padded_sizes):
        if padded in grids:
            continue
        h, w = gt.original_sizes[i]
        record = model.probe([torch.zeros((3, h, w), device=device)], heads=False)
        if tuple(record["padded_size"]) != padded:
            raise ValueError(f"the model pads a {w}x{h} image to {record['padded_size']}, not {padded} "
                             "as its transform's settings say")
        grids[padded] = Grid(padded, [tuple(record["fpn"][n].shape[-2:]) for n in model.rpn.in_features])
    return grids


@dataclass
class AnchorFit:
    """Per ground-truth box (G of them): how the anchors of its image fit it."""
    wh: np.ndarray  # [G, 2] box width, height (model-input px)
    best_iou: np.ndarray  # [G] IoU of the best anchor
    best_level: np.ndarray  # [G] level index of the best anchor
    positives: np.ndarray  # [G] anchors the matcher makes positive for this box
    by_threshold: np.ndarray  # [G] of those, anchors with IoU >= the matcher's high threshold
    positives_per_level: np.ndarray  # [G, L]
    threshold: float  # the matcher's high threshold (fg_iou)
    low_quality: bool  # the matcher's allow_low_quality_matches
    anchors_per_level: list[int] = field(default_factory=list)  # anchors of the first image, per level


@torch.no_grad()
def anchor_fit(gt: GroundTruth, grids: dict[tuple[int, int], Grid], generator, matcher,
               progress=None) -> AnchorFit:
    """Match every image's GT boxes against its anchors with the RPN's matcher. `generator`: an
    AnchorGenerator (the model's, or one to try); `progress`: called once per image (e.g. tqdm.update)."""
    g = len(gt.boxes)
    num_levels = len(generator.sizes)
    best_iou, best_level = np.zeros(g), np.zeros(g, np.int64)
    positives, by_thr = np.zeros(g, np.int64), np.zeros(g, np.int64)
    per_level = np.zeros((g, num_levels), np.int64)
    order = torch.argsort(gt.image, stable=True)
    counts = torch.bincount(gt.image, minlength=len(gt.input_sizes)).tolist()
    starts = np.concatenate([[0], np.cumsum(counts)])
    first_sizes: list[int] = []
    level_of: dict[tuple[int, int], Tensor] = {}
    for i, padded in enumerate(gt.padded_sizes):  # a loop over images
        if progress is not None:
            progress()
        idx = order[starts[i] : starts[i + 1]]
        grid = grids[padded]
        anchors = generator(grid.feature_sizes, grid.padded_size)
        if padded not in level_of:
            level_of[padded] = torch.repeat_interleave(torch.arange(num_levels), torch.tensor([len(a) for a in anchors]))
        if not first_sizes:
            first_sizes = [len(a) for a in anchors]
        if len(idx) == 0:
            continue
        levels, m = level_of[padded], len(idx)
        iou = box_iou(gt.boxes[idx], torch.cat(anchors).cpu())  # [M, A]
        matches = matcher(iou)  # [A]: the GT index an anchor is positive for, or a negative constant
        best, arg = iou.max(1)
        pos = (matches >= 0).nonzero().squeeze(1)  # the positive anchors
        owner = matches[pos]
        high = iou[:, pos].max(0).values >= matcher.high  # positive by the threshold, not the low-quality rule
        j = idx.numpy()
        best_iou[j], best_level[j] = best.double().numpy(), levels[arg].numpy()
        positives[j] = torch.bincount(owner, minlength=m).numpy()
        by_thr[j] = torch.bincount(owner[high], minlength=m).numpy()
        per_level[j] = torch.bincount(owner * num_levels + levels[pos], minlength=m * num_levels).view(m, -1).numpy()
    return AnchorFit(gt.wh, best_iou, best_level, positives, by_thr, per_level, float(matcher.high),
                     bool(matcher.allow_low_quality_matches), first_sizes)


# ----------------------------------------------------------------------------------------------- buckets
def size_bucket(wh: np.ndarray) -> np.ndarray:
    """[G] index into SIZE_BUCKETS by box area."""
    area = wh[:, 0] * wh[:, 1]
    return np.searchsorted([b[2] for b in SIZE_BUCKETS[:-1]], area, side="right")


def ratio_bucket(wh: np.ndarray) -> np.ndarray:
    """[G] index into RATIO_BUCKETS by h / w."""
    ratio = wh[:, 1] / np.maximum(wh[:, 0], 1e-9)
    return np.searchsorted([b[2] for b in RATIO_BUCKETS[:-1]], ratio, side="right")


def level_bucket(wh: np.ndarray, anchor_sizes: Sequence[float]) -> np.ndarray:
    """[G] the anchor level a box maps to: the one whose anchor size is nearest to sqrt(w h) (log scale)."""
    side = np.sqrt(np.maximum(wh[:, 0] * wh[:, 1], 1e-9))
    return np.abs(np.log2(side)[:, None] - np.log2(np.asarray(anchor_sizes, np.float64))[None]).argmin(1)


def fit_numbers(fit: AnchorFit, keep: np.ndarray, level_names: Sequence[str]) -> dict:
    """The fit of the boxes selected by the boolean mask `keep`, as JSON-able numbers."""
    n = int(keep.sum())
    out = {"objects": n}
    if n == 0:
        return out
    best = fit.best_iou[keep]
    thr = fit.by_threshold[keep] > 0
    pos = fit.positives[keep] > 0
    out.update(mean_best_iou=float(best.mean()), median_best_iou=float(np.median(best)),
               positive_at_threshold=float(thr.mean()), low_quality_only=float((pos & ~thr).mean()),
               no_positive=float((~pos).mean()), positives_per_object=float(fit.positives[keep].mean()),
               positives_per_level={name: float(v) for name, v in
                                    zip(level_names, fit.positives_per_level[keep].mean(0))})
    return out


def summarise(fit: AnchorFit, anchor_sizes: Sequence[float], level_names: Sequence[str]) -> dict:
    """Overall, by size, by level and by ratio bucket; positive anchors per level over the split."""
    everything = np.ones(len(fit.best_iou), bool)
    sizes, levels, ratios = size_bucket(fit.wh), level_bucket(fit.wh, anchor_sizes), ratio_bucket(fit.wh)
    return {
        "threshold": fit.threshold, "low_quality_rule": fit.low_quality,
        "all": fit_numbers(fit, everything, level_names),
        "by_size": {name: fit_numbers(fit, sizes == k, level_names) for k, (name, _, _) in enumerate(SIZE_BUCKETS)},
        "by_level": {name: fit_numbers(fit, levels == k, level_names) for k, name in enumerate(level_names)},
        "by_ratio": {name: fit_numbers(fit, ratios == k, level_names) for k, (name, _, _) in enumerate(RATIO_BUCKETS)},
        "positives_per_level": {name: int(v) for name, v in zip(level_names, fit.positives_per_level.sum(0))},
        "best_anchor_level": {name: int(v) for name, v in
                              zip(level_names, np.bincount(fit.best_level, minlength=len(level_names)))},
    }


# ----------------------------------------------------------------------------------------------- k-means
def iou_wh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of centred boxes: [N, 2] and [K, 2] (w, h) -> [N, K]."""
    inter = np.minimum(a[:, None, 0], b[None, :, 0]) * np.minimum(a[:, None, 1], b[None, :, 1])
    union = (a[:, 0] * a[:, 1])[:, None] + (b[:, 0] * b[:, 1])[None] - inter
    return inter / np.maximum(union, 1e-12)


def kmeans_iou(wh: np.ndarray, k: int, seed: int = 0, restarts: int = 3, iters: int = 100) -> np.ndarray:
    """k centroid shapes [k, 2] (w, h), sorted by area, of k-means with the distance 1 - IoU of centred boxes
    (YOLOv2's anchor clustering): k-means++ seeding, median update, the best of `restarts` by mean IoU."""
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    if len(wh) == 0:
        raise ValueError("k-means needs at least one box")
    rng = np.random.default_rng(seed)
    best, best_score = None, -1.0
    for _ in range(restarts):
        centres = wh[rng.integers(len(wh))][None]
        while len(centres) < k:  # k-means++: the next centre far (in 1 - IoU) from those chosen
            d = 1 - iou_wh(wh, centres).max(1)
            p = d / d.sum() if d.sum() > 0 else np.full(len(wh), 1 / len(wh))
            centres = np.concatenate([centres, wh[rng.choice(len(wh), p=p)][None]])
        assign = None
        for _ in range(iters):
            new = iou_wh(wh, centres).argmax(1)
            if assign is not None and (new == assign).all():
                break
            assign = new
            for c in range(k):  # a loop over the k clusters
                members = wh[assign == c]
                if len(members):
                    centres[c] = np.median(members, 0)
                else:  # an empty cluster restarts at the box its centres fit worst
                    centres[c] = wh[(iou_wh(wh, centres).max(1)).argmin()]
        score = float(iou_wh(wh, centres).max(1).mean())
        if score > best_score:
            best, best_score = centres.copy(), score
    return best[np.argsort(best[:, 0] * best[:, 1], kind="stable")]


def suggest_anchors(wh: np.ndarray, num_sizes: int, num_ratios: int, seed: int = 0
                    ) -> tuple[list[float], list[float]]:
    """(sizes, ratios) for an anchor generator of `num_sizes` levels x `num_ratios` ratios, by k-means with
    the IoU distance on the box shapes, factored as the generator is: sizes from the boxes made square
    (side sqrt(w h)), ratios from the boxes scaled to unit area (IoU there depends on h / w only)."""
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    wh = wh[(wh > 0).all(1)]
    side = np.sqrt(wh[:, 0] * wh[:, 1])
    sizes = kmeans_iou(np.stack((side, side), 1), num_sizes, seed)[:, 0]
    ratios = kmeans_iou(wh / side[:, None], num_ratios, seed)
    return ([float(max(1.0, round(s))) for s in sizes],
            sorted(float(round(r, 2)) for r in ratios[:, 1] / ratios[:, 0]))


def set_line(sizes: Sequence[float], ratios: Sequence[float]) -> str:
    """The command-line override that tries these anchors."""
    def num(x: float) -> str:
        return f"{x:g}"
    return (f"--set model.anchors.sizes=[{','.join(num(s) for s in sizes)}] "
            f"model.anchors.ratios=[{','.join(num(r) for r in ratios)}]")


def coverage_curve(best_iou: np.ndarray, thresholds: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of boxes whose best anchor IoU is >= each threshold."""
    t = np.linspace(0, 1, 101) if thresholds is None else thresholds
    if len(best_iou) == 0:
        return t, np.zeros_like(t)
    return t, (best_iou[None] >= t[:, None]).mean(1)
