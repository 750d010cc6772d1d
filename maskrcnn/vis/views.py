"""The seven views of the model, each drawn from one record of the model's probe (`MaskRCNN.probe`), never
from a copy of the model's chain: dataset (ground truth as the model receives it), anchors, anchor labels,
proposals, sampled RoIs, detections and features. Each returns a View: the picture and the same facts in
words (printed by visualize.py, listed in reports).

    record = model.probe([image], [target]);  view = proposals_view(record, 0, model, top=50)

Pictures are in the frame of the model's input (the resized image), except detections (the image as given).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .panels import (anchors_at, draw_anchor_grid, draw_anchor_labels, draw_anchors_at, draw_detections, draw_ground_truth,
                     draw_proposals, draw_sampled_rois, feature_grid, label_counts, objectness, relative_change)
from .primitives import GT_COLOUR, caption, class_name, draw_boxes, header, side_by_side, to_uint8_image


@dataclass
class View:
    picture: np.ndarray  # [H, W, 3] uint8 RGB
    lines: list[str] = field(default_factory=list)  # what the picture shows, in words


def input_image(record: dict, i: int = 0) -> np.ndarray:
    """Image i as the model sees it (resized, unpadded), uint8 RGB."""
    return to_uint8_image(record["images"][i])


def anchor_levels(anchors: Sequence[Tensor]) -> Tensor:
    """Level index [Atot] of each anchor of the concatenated per-level list."""
    sizes = torch.tensor([len(a) for a in anchors])
    return torch.repeat_interleave(torch.arange(len(anchors)), sizes).to(anchors[0].device)


def _needs(record: dict, key: str, what: str) -> None:
    if record.get(key) is None:
        raise ValueError(f"the {what} view needs {key} in the probe record (probe with targets"
                         f"{'' if key != 'roi_samples' else ', a full-stage model'})")


def dataset_view(record: dict, i: int, class_names: Optional[Sequence[str]] = None) -> View:
    """Ground-truth boxes, names and masks in the model-input frame, and where each mask lies."""
    _needs(record, "targets", "dataset")
    target = record["targets"][i]
    h, w = record["image_sizes"][i]
    lines = [f"model input {w}x{h}, {len(target['boxes'])} objects"]
    masks = target["masks"].bool()
    for k, (box, label, mask) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist(), masks)):
        x0, y0, x1, y1 = box
        n = int(mask.sum())
        inside = int(mask[max(int(y0), 0) : int(y1) + 1, max(int(x0), 0) : int(x1) + 1].sum())
        lines.append(f"{k}: {class_name(class_names, label)} box [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}] "
                     f"mask {n} px, {100 * inside / max(n, 1):.0f}% inside its box")
    return View(draw_ground_truth(input_image(record, i), target, class_names), lines)


def anchors_view(record: dict, i: int, model, at: Optional[tuple[float, float]] = None,
                 level: Optional[str] = None) -> View:
    """Every anchor (size x ratio) of the location nearest to `at` (default: the centre), and one level's
    grid (default: the second anchor level)."""
    gen, names = model.rpn.anchor_generator, model.rpn.in_features
    anchors = record["anchors"]
    h, w = record["image_sizes"][i]
    x, y = at if at is not None else (w / 2, h / 2)
    if not (0 <= x <= w and 0 <= y <= h):
        raise ValueError(f"--at {x:g} {y:g} is outside the model input ({w}x{h} px, after resizing)")
    level = level or names[min(1, len(names) - 1)]
    if level not in names:
        raise ValueError(f"--level {level} is not an anchor level {names}")
    li = names.index(level)
    image = input_image(record, i)
    if record.get("targets") is not None:
        image = draw_boxes(image, record["targets"][i]["boxes"], GT_COLOUR)  # for scale
    per_level = anchors_at(anchors, gen.num_anchors, x, y)
    sizes = [tuple(record["fpn"][n].shape[-2:]) for n in names]
    desc = [f"{n}: stride {s}, size {z:g}, ratios {'/'.join(f'{r:g}' for r in gen.ratios)}"
            for n, s, z in zip(names, gen.strides, gen.sizes)]
    left = draw_anchors_at(image, per_level, names, (x, y), desc)
    right = draw_anchor_grid(image, anchors[li], gen.num_anchors, gen.ratios, per_level[li], level,
                             gen.strides[li], sizes[li])
    lines = [f"model input {w}x{h}; anchors at ({x:.0f}, {y:.0f}):"]
    for n, s, z, a, (fh, fw), lvl in zip(names, gen.strides, gen.sizes, anchors, sizes, per_level):
        centre = ((lvl[0, :2] + lvl[0, 2:]) / 2).tolist()
        lines.append(f"  {n}: stride {s}, size {z:g}, {fh}x{fw} cells x {gen.num_anchors} ratios = {len(a)} "
                     f"anchors; nearest centre ({centre[0]:.0f}, {centre[1]:.0f})")
    lines.append(f"  total {sum(len(a) for a in anchors)} anchors")
    return View(side_by_side([left, right]), lines)


def anchor_labels_view(record: dict, i: int, model) -> View:
    """Positive / negative / ignored anchors before sampling, and the sampled ones, with counts per level."""
    _needs(record, "anchor_labels", "anchor-labels")
    rpn = model.rpn
    anchors = torch.cat(record["anchors"])
    levels = anchor_levels(record["anchors"])
    labels, sampled = record["anchor_labels"][i], record["sampled_anchor_labels"][i]
    gt = record["targets"][i]["boxes"]
    image = input_image(record, i)
    before, after = label_counts(labels), label_counts(sampled)
    left = draw_anchor_labels(image, anchors, labels, gt, f"before sampling ({len(anchors)} anchors)")
    right = draw_anchor_labels(image, anchors, sampled, gt,
                               f"after sampling ({rpn.sampler.batch_size_per_image} per image)", sampled=True)
    h, w = record["image_sizes"][i]
    lines = [f"model input {w}x{h}, {len(gt)} ground-truth boxes",
             f"anchors: {len(anchors)} total, {before['positive']} positive, {before['negative']} negative, "
             f"{before['ignored']} ignored",
             f"sampled: {after['positive']} positive, {after['negative']} negative "
             f"(batch {rpn.sampler.batch_size_per_image}, positive fraction {rpn.sampler.positive_fraction:g})"]
    for k, name in enumerate(rpn.in_features):
        on = levels == k
        c, s = label_counts(labels[on]), label_counts(sampled[on])
        lines.append(f"  {name}: {int(on.sum())} anchors, {c['positive']} positive, {c['negative']} negative, "
                     f"{c['ignored']} ignored; sampled {s['positive']} positive, {s['negative']} negative")
    return View(side_by_side([left, right]), lines)


def proposals_view(record: dict, i: int, model, top: int = 50, levels: Optional[Sequence[str]] = None) -> View:
    """The top proposals coloured by objectness (optionally from some levels only), with the ground truth."""
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    names = model.rpn.in_features
    unknown = [lv for lv in (levels or []) if lv not in names]
    if unknown:
        raise ValueError(f"--levels {unknown[0]} is not an anchor level {names}")
    p = record["proposals"][i]
    boxes, scores, lvl = p["boxes"], p["scores"], p["levels"]
    if levels:
        keep = torch.isin(lvl, torch.tensor([names.index(n) for n in levels], device=lvl.device))
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
    boxes, scores, lvl = boxes[:top], scores[:top], lvl[:top]  # sorted by score
    image = input_image(record, i)
    if record.get("targets") is not None:
        image = draw_boxes(image, record["targets"][i]["boxes"], GT_COLOUR, thickness=2, outline=True)
    logits = not model.rpn.sigmoid_scores
    picture = draw_proposals(image, boxes, scores, thickness=2 if top <= 100 else 1, logits=logits)
    per_level = {n: int((lvl == k).sum()) for k, n in enumerate(names)}
    which = "" if not levels else f" from {' '.join(levels)}"
    picture = caption(picture, [f"top {len(boxes)} of {len(p['boxes'])} proposals{which}",
                                " ".join(f"{n}:{c}" for n, c in per_level.items() if c)])
    prob = objectness(scores, logits)
    line = (f"{len(p['boxes'])} proposals; drawn the top {len(boxes)}{which}: "
            + ", ".join(f"{n} {c}" for n, c in per_level.items())
            + (f"; objectness {float(prob.max()):.3f} .. {float(prob.min()):.3f}" if len(prob) else ""))
    return View(picture, [line])


def rois_view(record: dict, i: int, model, class_names: Optional[Sequence[str]] = None) -> View:
    """The RoIs sampled for the box head: positives in their ground truth's colour, negatives red."""
    if model.roi_heads is None:
        raise ValueError("rois needs a full-stage model (this is the RPN stage); use a full-stage checkpoint "
                         "or config")
    _needs(record, "roi_samples", "rois")
    heads = model.roi_heads
    s, target = record["roi_samples"][i], record["targets"][i]
    pos, neg = int((s["labels"] > 0).sum()), int((s["labels"] == 0).sum())
    n_prop = len(record["proposals"][i]["boxes"])
    added = " + GT" if heads.add_gt_as_proposals else ""
    picture = draw_sampled_rois(input_image(record, i), s["boxes"], s["labels"], s["matched_idx"],
                                target["boxes"], class_names, target["labels"])
    picture = header(picture, [f"{n_prop} proposals{added}",
                               f"sampled {pos} positive (GT colour), {neg} negative (red)"])
    line = (f"{n_prop} proposals{' + ' + str(len(target['boxes'])) + ' ground-truth boxes' if added else ''}; "
            f"sampled {pos} positive, {neg} negative (batch {heads.sampler.batch_size_per_image}, positive "
            f"fraction {heads.sampler.positive_fraction:g}, IoU {heads.matcher.high:g})")
    return View(picture, [line])


def detections_view(image: np.ndarray, det: dict, class_names: Optional[Sequence[str]] = None,
                    score_thresh: float = 0.5, mask_thresh: float = 0.5) -> View:
    """Final boxes, classes, scores and masks with score >= score_thresh, on the image as given (uint8 RGB)."""
    shown = int((det["scores"] >= score_thresh).sum())
    picture = header(draw_detections(image, det, class_names, score_thresh, mask_thresh),
                     f"{shown} detections, score >= {score_thresh:g}")
    lines = [f"{len(det['scores'])} detections, {shown} with score >= {score_thresh:g}"]
    for b, lab, sc in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
        if sc >= score_thresh:
            lines.append(f"  {class_name(class_names, lab)} {sc:.3f} [{b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f}]")
    return View(picture, lines)


def noise_text(model) -> str:
    """The configured LatentNoise and its site, in words: what probe(noise=True) switches on."""
    return f"at {model.noise_site}: {model.noise.describe()}"


def features_view(clean: dict, noisy: dict, i: int = 0, noise_text: str = "") -> View:
    """Mean activation of c2..c5 and p2..p6 (as the next stage sees them) from a probe without noise and one
    with it (same image). Noise at the fpn site leaves c2..c5 as they are; at the roi site it perturbs the pooled
    RoI features only, so every map is unchanged and the lines give the pooled features' relative change."""
    maps_clean = {**clean["bottom_up"], **clean["fpn"]}
    maps_noisy = {**noisy["noisy"], **noisy["fpn"]}
    one = {k: v[i : i + 1] for k, v in maps_clean.items()}
    two = {k: v[i : i + 1] for k, v in maps_noisy.items()}
    picture = feature_grid(input_image(clean, i), one, two, clean["image_sizes"][i], clean["padded_size"],
                           noise_text=noise_text)
    lines = [f"noise: {noise_text}",
             "relative change ||noisy - clean|| / ||clean||: "
             + ", ".join(f"{k} {relative_change(one[k], two[k]):.3f}" for k in one)]
    site = noisy.get("noise")
    if site is not None and site["site"] == "roi":  # pooled RoI features of the whole batch, per head
        lines.append("pooled RoI features, relative change: " + ", ".join(
            f"{k} {relative_change(site['before'][k], site['after'][k]):.3f} ({len(site['before'][k])} RoIs)"
            for k in site["before"]))
    return View(picture, lines)
