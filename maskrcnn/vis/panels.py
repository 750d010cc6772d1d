"""Composite pictures of the model's quantities: ground truth, detections, proposals, sampled RoIs, anchor
labels, anchors of one location and one level's grid, and feature maps with and without noise. Each takes
arrays or tensors (as the model's probe returns them) and returns an image; none runs the model.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from .primitives import (CANVAS, GT_COLOUR, IGNORED_COLOUR, NEGATIVE_COLOUR, POINT_COLOUR, POSITIVE_COLOUR,
                         ArrayLike, to_numpy, caption, class_name, colour, colour_bar, colormap_colours, draw_boxes,
                         draw_lines, draw_masks, draw_points, heatmap, side_by_side, stack, wrap)

def draw_ground_truth(image: np.ndarray, target: dict, class_names: Optional[Sequence[str]] = None,
                      masks: bool = True, thickness: int = 2) -> np.ndarray:
    """Boxes (white on black) with class names, and masks in instance colours, of a target in this frame."""
    boxes = to_numpy(target["boxes"]).reshape(-1, 4)
    labels = to_numpy(target["labels"]).reshape(-1)
    cols = [colour(i) for i in range(len(boxes))]
    img = image
    if masks and "masks" in target and len(boxes):
        img = draw_masks(img, target["masks"], cols)
    return draw_boxes(img, boxes, GT_COLOUR, [class_name(class_names, lab) for lab in labels], thickness,
                      outline=True)


def draw_detections(image_uint8_rgb: np.ndarray, det: dict, class_names: Optional[Sequence[str]] = None,
                    score_thresh: float = 0.5, mask_thresh: float = 0.5) -> np.ndarray:
    """Final detections (boxes, class names and scores, mask overlays) with score >= score_thresh.

    det: one image's model output, dict(boxes [D, 4], labels [D], scores [D], optional masks [D, 1, H, W]
    probabilities or [D, H, W]) in the frame of `image_uint8_rgb`. Colours follow the class.
    """
    scores = to_numpy(det["scores"]).reshape(-1)
    keep = np.nonzero(scores >= score_thresh)[0]
    keep = keep[np.argsort(scores[keep], kind="stable")]  # the best drawn last, on top
    boxes = to_numpy(det["boxes"]).reshape(-1, 4)[keep]
    labels = to_numpy(det["labels"]).reshape(-1)[keep]
    cols = [colour(lab - 1) for lab in labels]
    img = image_uint8_rgb
    if "masks" in det and len(keep):
        masks = to_numpy(det["masks"])
        masks = masks[:, 0] if masks.ndim == 4 else masks
        img = draw_masks(img, masks[keep], cols, threshold=mask_thresh)
    texts = [f"{class_name(class_names, lab)} {s:.2f}" for lab, s in zip(labels, scores[keep])]
    return draw_boxes(img, boxes, cols, texts, thickness=2)


def draw_proposals(image: np.ndarray, boxes: ArrayLike, scores: ArrayLike, colormap: int = cv2.COLORMAP_TURBO,
                   thickness: int = 1, logits: bool = True) -> np.ndarray:
    """Proposals coloured by objectness through a colormap, the best drawn on top. `scores` are logits
    (sigmoid applied here) or, with `logits=False`, probabilities (an RPN with sigmoid_scores)."""
    prob = objectness(scores, logits)
    order = np.argsort(prob, kind="stable")
    b = to_numpy(boxes).reshape(-1, 4)[order]
    img = draw_boxes(image, b, colormap_colours(prob[order], colormap), thickness=thickness)
    return colour_bar(img, "0", "1", colormap, "objectness")


def objectness(scores: ArrayLike, logits: bool = True) -> np.ndarray:
    """Proposal scores as probabilities."""
    s = to_numpy(scores, np.float64).reshape(-1)
    return 1 / (1 + np.exp(-s)) if logits else s


def draw_sampled_rois(image: np.ndarray, rois: ArrayLike, labels: ArrayLike, matched_idx: ArrayLike,
                      gt_boxes: ArrayLike, class_names: Optional[Sequence[str]] = None,
                      gt_labels: Optional[ArrayLike] = None) -> np.ndarray:
    """Sampled RoIs: negatives (background) thin and translucent red; positives in the colour of their matched
    ground truth, with a line from the RoI centre to the GT centre; the GT boxes on top."""
    r = to_numpy(rois).reshape(-1, 4)
    lab = to_numpy(labels).reshape(-1)
    idx = to_numpy(matched_idx).reshape(-1)
    gt = to_numpy(gt_boxes).reshape(-1, 4)
    neg, pos = lab == 0, lab > 0
    img = draw_boxes(image, r[neg], NEGATIVE_COLOUR, alpha=0.45)
    cols = [colour(i) for i in idx[pos]]
    img = draw_boxes(img, r[pos], cols)
    if pos.any():
        centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
        img = draw_lines(img, centre(r[pos]), centre(gt[idx[pos]]), cols)
    names = None
    if gt_labels is not None:
        names = [class_name(class_names, g) for g in to_numpy(gt_labels).reshape(-1)]
    return draw_boxes(img, gt, [colour(i) for i in range(len(gt))], names, thickness=2, outline=True)


def label_counts(labels: Tensor) -> dict[str, int]:
    return {"positive": int((labels == 1).sum()), "negative": int((labels == 0).sum()),
            "ignored": int((labels == -1).sum())}


def draw_anchor_labels(image: np.ndarray, anchors: ArrayLike, labels: ArrayLike, gt_boxes: ArrayLike,
                       title: str = "", sampled: bool = False) -> np.ndarray:
    """Anchors by label, ground truth in white, counts in the legend. Before sampling (`sampled=False`):
    positives green boxes, ignored yellow translucent boxes, negatives red pixels at their centres (one per
    location: there are thousands). After sampling: the sampled positives and negatives as boxes, the rest
    (label -1: not sampled) not drawn."""
    a = to_numpy(anchors).reshape(-1, 4)
    lab = to_numpy(labels).reshape(-1)
    c = label_counts(torch.as_tensor(lab))
    if sampled:
        img = draw_boxes(image, a[lab == 0], NEGATIVE_COLOUR, alpha=0.5)
        rest = [f"negative {c['negative']}", f"not sampled {c['ignored']}"]
    else:
        centres = np.unique(np.round((a[lab == 0, :2] + a[lab == 0, 2:]) / 2), axis=0)
        img = draw_points(image, centres, NEGATIVE_COLOUR, radius=0, alpha=0.6)
        img = draw_boxes(img, a[lab == -1], IGNORED_COLOUR, alpha=0.35)
        rest = [f"negative {c['negative']} (centres)", f"ignored {c['ignored']}"]
    img = draw_boxes(img, gt_boxes, GT_COLOUR, thickness=1, outline=True)
    img = draw_boxes(img, a[lab == 1], POSITIVE_COLOUR, thickness=2)  # on top: they hug the GT
    lines = ([title] if title else []) + [f"positive {c['positive']}"] + rest
    cols = ([None] if title else []) + [POSITIVE_COLOUR, NEGATIVE_COLOUR, None if sampled else IGNORED_COLOUR]
    return caption(img, lines, colours=cols)


@torch.no_grad()
def mean_activation(x: Tensor, valid: tuple[int, int]) -> np.ndarray:
    """[1, C, H, W] -> [h, w] channel mean over the valid (unpadded) region."""
    return to_numpy(x[0, :, : valid[0], : valid[1]].float().mean(0))


def feature_grid(image: np.ndarray, clean: dict[str, Tensor], noisy: dict[str, Tensor],
                 image_size: tuple[int, int], padded_size: tuple[int, int], cell_width: int = 128,
                 noise_text: str = "") -> np.ndarray:
    """Rows: mean activation without noise, with noise (the same colour scale per level), and |difference|
    relative to the clean map's range (one scale for all levels, so the levels compare); one column per
    level, the input image first. image_size: (h, w) of the image in the padded batch of `padded_size`."""
    h_img, w_img = image_size
    cell_h = max(1, round(cell_width * h_img / w_img))
    size = (cell_width, cell_h)
    blank = np.full((cell_h, cell_width, 3), 255, np.uint8)
    rows: list[list[np.ndarray]] = [[caption(cv2.resize(image, size, interpolation=cv2.INTER_AREA), "input")],
                                    [caption(blank, ["with noise:"] + wrap(noise_text, 20))], []]
    maps = {}
    for name in clean:
        fh, fw = clean[name].shape[-2:]
        valid = (max(1, math.ceil(h_img * fh / padded_size[0])), max(1, math.ceil(w_img * fw / padded_size[1])))
        a, b = mean_activation(clean[name], valid), mean_activation(noisy[name], valid)
        span = float(a.max() - a.min())
        maps[name] = (a, b, np.abs(b - a) / span if span > 0 else np.zeros_like(a))
    top = max([float(d.max()) for _, _, d in maps.values()] + [1e-6])
    rows[2].append(caption(blank, ["|noisy - clean|", "/ range of clean", f"scale 0..{100 * top:.0f}%"]))
    for name, (a, b, d) in maps.items():
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        rows[0].append(caption(heatmap(a, size, lo, hi), f"{name} clean"))
        rows[1].append(caption(heatmap(b, size, lo, hi), f"{name} noisy"))
        rows[2].append(caption(heatmap(d, size, 0.0, top, cv2.COLORMAP_INFERNO),
                               f"{name} max {100 * float(d.max()):.0f}%"))
    return stack([side_by_side(r, gap=2) for r in rows], gap=2)


def pooled_grid(clean: dict[str, Tensor], noisy: dict[str, Tensor], count: int = 8, cell: int = 48) -> np.ndarray:
    """Pooled RoI features (the roi noise site: {"box": [R, C, S, S], "mask": [F, C, S, S]}): for the first `count`
    RoIs of each head, the channel mean without noise, with noise (one colour scale per RoI) and |difference|
    relative to the clean map's range, one row each."""
    rows: list[list[np.ndarray]] = [[], [], []]
    for name in clean:
        for k in range(min(count, len(clean[name]))):
            a, b = (to_numpy(t[name][k].float().mean(0)) for t in (clean, noisy))
            lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
            span = float(a.max() - a.min())
            d = np.abs(b - a) / span if span > 0 else np.zeros_like(a)
            rows[0].append(caption(heatmap(a, (cell, cell), lo, hi), f"{name} {k}"))
            rows[1].append(caption(heatmap(b, (cell, cell), lo, hi), "noisy"))
            rows[2].append(caption(heatmap(d, (cell, cell), 0.0, max(float(d.max()), 1e-6), cv2.COLORMAP_INFERNO),
                                   f"{100 * float(d.max()):.0f}%"))
    if not rows[0]:
        return caption(np.full((cell, 4 * cell, 3), 255, np.uint8), "no pooled RoIs")
    return stack([side_by_side(r, gap=2) for r in rows], gap=2)


def relative_change(clean: Tensor, noisy: Tensor) -> float:
    """||noisy - clean|| / ||clean|| over the whole tensor."""
    clean, noisy = clean.detach().float(), noisy.detach().float()
    return float((noisy - clean).norm() / clean.norm().clamp(min=1e-12))


# -------------------------------------------------------------------------------------------- anchors
def anchors_at(anchors: list[Tensor], num_anchors: int, x: float, y: float) -> list[Tensor]:
    """Per level, the A anchors [A, 4] of the location whose anchor centre is nearest to (x, y) (max-norm)."""
    out = []
    for a in anchors:
        cells = a.view(-1, num_anchors, 4)  # [Hi*Wi*A, 4] -> [Hi*Wi, A, 4]: location-major order
        centres = (cells[:, 0, :2] + cells[:, 0, 2:]) / 2
        d = (centres - centres.new_tensor([x, y])).abs().max(dim=1).values
        out.append(cells[int(d.argmin())])
    return out


def anchor_margin(boxes: Sequence[Tensor], image_size: tuple[int, int]) -> int:
    """Pixels to add around the image so that these boxes show, at most half the image's long side."""
    b = to_numpy(torch.cat(list(boxes))).reshape(-1, 4)
    h, w = image_size
    over = max(0.0, float(-b[:, 0].min()), float(-b[:, 1].min()), float(b[:, 2].max() - w),
               float(b[:, 3].max() - h))
    return int(min(math.ceil(over) + 2 if over > 0 else 0, max(h, w) // 2))


def draw_anchors_at(image: np.ndarray, per_level: Sequence[Tensor], level_names: Sequence[str],
                    point: tuple[float, float], descriptions: Optional[Sequence[str]] = None) -> np.ndarray:
    """All anchors of one location (every level's size, every ratio) in a colour per level, on a canvas that
    extends beyond the image (grey) as far as the anchors do (see anchor_margin)."""
    h, w = image.shape[:2]
    m = anchor_margin(per_level, (h, w))
    canvas = np.empty((h + 2 * m, w + 2 * m, 3), np.uint8)
    canvas[:] = CANVAS
    canvas[m : m + h, m : m + w] = image
    for i, boxes in enumerate(per_level):
        b = to_numpy(boxes).reshape(-1, 4) + m
        canvas = draw_boxes(canvas, b, colour(i), thickness=1)
        canvas = draw_points(canvas, (b[:1, :2] + b[:1, 2:]) / 2, colour(i), radius=2)
    px, py = int(round(point[0])) + m, int(round(point[1])) + m
    cv2.drawMarker(canvas, (px, py), (0, 0, 0), cv2.MARKER_CROSS, 9, 3)
    cv2.drawMarker(canvas, (px, py), (255, 255, 255), cv2.MARKER_CROSS, 9, 1)
    lines = list(descriptions) if descriptions is not None else list(level_names)
    return caption(canvas, [f"anchors at ({point[0]:.0f}, {point[1]:.0f})"] + lines,
                   colours=[None] + [colour(i) for i in range(len(lines))])


def draw_anchor_grid(image: np.ndarray, anchors: Tensor, num_anchors: int, ratios: Sequence[float],
                     highlight: Optional[Tensor] = None, name: str = "", stride: int = 0,
                     feature_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """One level's grid: every anchor centre as a dot, the ratio-closest-to-1 anchor of every cell drawn
    lightly, and (optionally) the `highlight` anchors of one cell in full colour."""
    cells = anchors.view(-1, num_anchors, 4)  # [Hi*Wi*A, 4] -> [Hi*Wi, A, 4]
    square = int(np.argmin(np.abs(np.log(np.asarray(ratios, np.float64)))))
    boxes = cells[:, square]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    img = draw_boxes(image, boxes, (255, 255, 255), alpha=0.25)
    img = draw_points(img, centres, POINT_COLOUR, radius=1)
    if highlight is not None:
        img = draw_boxes(img, highlight, POSITIVE_COLOUR, thickness=1)
    lines = [f"grid {name}: stride {stride}"]
    if feature_size is not None:
        lines.append(f"{feature_size[0]}x{feature_size[1]} cells x {num_anchors} = {len(anchors)} anchors")
    return caption(img, lines)
