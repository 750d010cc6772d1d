"""Pictures of what the model sees and does: ground truth as the model receives it, anchors, anchor labels,
proposals, sampled RoIs, detections and feature maps; and the TensorBoard images of a training run
(`log_training_images`, called by the engine every `train.vis_period` iterations).

Conventions: an image is np.ndarray [H, W, 3] uint8 RGB; boxes are [N, 4] xyxy pixels (tensor or array);
masks are [N, H, W] (bool, 0/1 or probabilities); colours are RGB tuples. Drawing functions return a new
image and never modify their input. Model quantities are drawn in the frame of the model's input (the resized
image, `ImageList.image_sizes`); detections are in the frame of the image passed in, as the model returns them.

    panel = draw_detections(image_uint8_rgb, model([image])[0], class_names, score_thresh=0.5)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch
from torch import Tensor

Colour = tuple[int, int, int]
ArrayLike = Union[np.ndarray, Tensor, Sequence]

# A qualitative palette (Tableau 10, then a few more): instance / class colours.
PALETTE: list[Colour] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
]
GT_COLOUR: Colour = (255, 255, 255)  # drawn over a black outline: visible on any background
POSITIVE_COLOUR: Colour = (0, 220, 0)
NEGATIVE_COLOUR: Colour = (235, 50, 50)
IGNORED_COLOUR: Colour = (255, 210, 0)
POINT_COLOUR: Colour = (255, 0, 255)
BACKGROUND: Colour = (255, 255, 255)  # around panels
CANVAS: Colour = (96, 96, 96)  # beyond the image edge (anchors that stick out)
GAP = 6  # pixels between panels of side_by_side
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.4
LINE_HEIGHT = 13  # pixels per text line at FONT_SCALE


def colour(i: int) -> Colour:
    """The i-th palette colour (cycles)."""
    return PALETTE[int(i) % len(PALETTE)]


def _np(x: ArrayLike, dtype=None) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def to_uint8_image(image: Tensor) -> np.ndarray:
    """[3, H, W] float 0..1 RGB tensor -> [H, W, 3] uint8 RGB."""
    return np.ascontiguousarray((_np(image).clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))


def class_name(class_names: Optional[Sequence[str]], label: int) -> str:
    if class_names is not None and 0 <= int(label) < len(class_names):
        return class_names[int(label)]
    return f"class {int(label)}"


# --------------------------------------------------------------------------------------------- primitives
def _blend(base: np.ndarray, layer: np.ndarray, alpha: float) -> np.ndarray:
    return base if alpha <= 0 else layer if alpha >= 1 else cv2.addWeighted(layer, alpha, base, 1 - alpha, 0)


def _text(img: np.ndarray, text: str, x: int, y: int, fg: Colour = (255, 255, 255),
          bg: Optional[Colour] = (0, 0, 0)) -> None:
    """In place: `text` with its top-left corner at (x, y), on a filled background for legibility."""
    (w, h), base = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    x = int(min(max(x, 0), max(img.shape[1] - w - 2, 0)))
    y = int(min(max(y, 0), max(img.shape[0] - h - base - 2, 0)))
    if bg is not None:
        cv2.rectangle(img, (x, y), (x + w + 2, y + h + base + 1), bg, -1)
    cv2.putText(img, text, (x + 1, y + h + 1), FONT, FONT_SCALE, fg, 1, cv2.LINE_AA)


def caption(image: np.ndarray, lines: Union[str, Sequence[str]], corner: str = "top-left",
            colours: Optional[Sequence[Optional[Colour]]] = None) -> np.ndarray:
    """Text lines over a translucent dark band at a corner (the image keeps its size). `colours`: an
    optional swatch colour per line, drawn before its text (a legend)."""
    lines = [lines] if isinstance(lines, str) else list(lines)
    if not lines:
        return image.copy()
    img = image.copy()
    colours = list(colours) if colours is not None else [None] * len(lines)
    swatch = LINE_HEIGHT if any(c is not None for c in colours) else 0
    width = max(cv2.getTextSize(t, FONT, FONT_SCALE, 1)[0][0] for t in lines) + swatch + 6
    height = LINE_HEIGHT * len(lines) + 4
    x0 = 0 if corner.endswith("left") else max(img.shape[1] - width, 0)
    y0 = 0 if corner.startswith("top") else max(img.shape[0] - height, 0)
    band = img.copy()
    cv2.rectangle(band, (x0, y0), (x0 + width, y0 + height), (0, 0, 0), -1)
    img = _blend(img, band, 0.6)
    for i, (t, c) in enumerate(zip(lines, colours)):
        y = y0 + 2 + i * LINE_HEIGHT
        if c is not None:
            cv2.rectangle(img, (x0 + 3, y + 2), (x0 + swatch - 1, y + LINE_HEIGHT - 2), c, -1)
        _text(img, t, x0 + 2 + swatch, y, bg=None)
    return img


def draw_boxes(image: np.ndarray, boxes: ArrayLike, colours: Union[Colour, Sequence[Colour]] = GT_COLOUR,
               labels: Optional[Sequence[str]] = None, thickness: int = 1, alpha: float = 1.0,
               outline: bool = False) -> np.ndarray:
    """Rectangles (xyxy px), optionally translucent (`alpha`), with a black `outline` and text labels."""
    b = _np(boxes, np.float64).reshape(-1, 4)
    img = image.copy()
    if len(b) == 0:
        return img
    b = np.round(b).astype(np.int64).clip(-10**6, 10**6)
    single = isinstance(colours, tuple) and len(colours) == 3 and all(np.isscalar(c) for c in colours)
    layer = img.copy()
    if outline:
        polys = [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.int32) for x0, y0, x1, y1 in b]
        cv2.polylines(layer, polys, True, (0, 0, 0), thickness + 2, cv2.LINE_8)
    if single:  # one call for all boxes: fast for thousands of anchors
        polys = [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.int32) for x0, y0, x1, y1 in b]
        cv2.polylines(layer, polys, True, tuple(int(c) for c in colours), thickness, cv2.LINE_8)
    else:
        for (x0, y0, x1, y1), c in zip(b, colours):
            cv2.rectangle(layer, (int(x0), int(y0)), (int(x1), int(y1)), tuple(int(v) for v in c), thickness)
    img = _blend(img, layer, alpha)
    if labels is not None:
        for i, ((x0, y0, _, _), text) in enumerate(zip(b, labels)):
            if text:
                c = colours if single else colours[i]
                above = y0 - LINE_HEIGHT - 1
                _text(img, text, int(x0), int(above if above >= 0 else y0 + 1), fg=(0, 0, 0) if sum(c) > 450
                      else (255, 255, 255), bg=tuple(int(v) for v in c))
    return img


def draw_masks(image: np.ndarray, masks: ArrayLike, colours: Union[Colour, Sequence[Colour]], alpha: float = 0.45,
               threshold: float = 0.5, contours: bool = True) -> np.ndarray:
    """Translucent fills (and contours) of [N, H, W] masks (values > threshold) in the image's frame."""
    m = _np(masks)
    if m.ndim == 4:  # [N, 1, H, W] probabilities, as the model returns them
        m = m[:, 0]
    img = image.copy()
    if m.shape[0] == 0:
        return img
    if m.shape[1:] != img.shape[:2]:
        raise ValueError(f"masks of size {m.shape[1:]} do not fit an image of size {img.shape[:2]}")
    binary = m > threshold if m.dtype != np.bool_ else m
    single = isinstance(colours, tuple) and len(colours) == 3 and all(np.isscalar(c) for c in colours)
    fill = img.astype(np.float32)
    for i, mask in enumerate(binary):  # a loop over instances, for drawing only
        c = np.array(colours if single else colours[i], np.float32)
        fill[mask] = fill[mask] * (1 - alpha) + c * alpha
    img = fill.round().clip(0, 255).astype(np.uint8)
    if contours:
        for i, mask in enumerate(binary):
            c = colours if single else colours[i]
            found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, found, -1, tuple(int(v) for v in c), 1)
    return img


def draw_points(image: np.ndarray, points: ArrayLike, colour_: Colour = POINT_COLOUR, radius: int = 1,
                alpha: float = 1.0) -> np.ndarray:
    """Filled dots at [N, 2] (x, y) pixel positions."""
    p = np.round(_np(points, np.float64).reshape(-1, 2)).astype(np.int64)
    img = image.copy()
    layer = img.copy()
    inside = (p[:, 0] >= -radius) & (p[:, 1] >= -radius) & (p[:, 0] < img.shape[1] + radius) & \
             (p[:, 1] < img.shape[0] + radius)
    for x, y in p[inside]:
        cv2.circle(layer, (int(x), int(y)), radius, colour_, -1)
    return _blend(img, layer, alpha)


def draw_lines(image: np.ndarray, starts: ArrayLike, ends: ArrayLike, colours: Union[Colour, Sequence[Colour]],
               thickness: int = 1) -> np.ndarray:
    """Segments from [N, 2] starts to [N, 2] ends."""
    s = np.round(_np(starts, np.float64).reshape(-1, 2)).astype(np.int64)
    e = np.round(_np(ends, np.float64).reshape(-1, 2)).astype(np.int64)
    single = isinstance(colours, tuple) and len(colours) == 3 and all(np.isscalar(c) for c in colours)
    img = image.copy()
    for i, (a, b) in enumerate(zip(s, e)):
        c = colours if single else colours[i]
        cv2.line(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), tuple(int(v) for v in c), thickness,
                 cv2.LINE_AA)
    return img


def side_by_side(images: Sequence[np.ndarray], gap: int = GAP, background: Colour = BACKGROUND) -> np.ndarray:
    """Panels left to right, top-aligned; the shorter ones padded. Width = sum of widths + gap per join."""
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = np.empty((height, width, 3), np.uint8)
    out[:] = background
    x = 0
    for im in images:
        out[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    return out


def stack(images: Sequence[np.ndarray], gap: int = GAP, background: Colour = BACKGROUND) -> np.ndarray:
    """Panels top to bottom, left-aligned."""
    return side_by_side([im.transpose(1, 0, 2) for im in images], gap, background).transpose(1, 0, 2).copy()


def colormap_lut(colormap: int = cv2.COLORMAP_VIRIDIS) -> np.ndarray:
    """[256, 3] uint8 RGB lookup table of an OpenCV colormap."""
    grey = np.arange(256, dtype=np.uint8)[:, None]
    return cv2.cvtColor(cv2.applyColorMap(grey, colormap), cv2.COLOR_BGR2RGB)[:, 0]


def colormap_colours(values: ArrayLike, colormap: int = cv2.COLORMAP_VIRIDIS) -> list[Colour]:
    """Values in 0..1 -> RGB colours of the colormap."""
    idx = (np.clip(_np(values, np.float64).reshape(-1), 0, 1) * 255 + 0.5).astype(np.int64)
    lut = colormap_lut(colormap)
    return [tuple(int(v) for v in lut[i]) for i in idx]


def heatmap(values: ArrayLike, size: Optional[tuple[int, int]] = None, vmin: Optional[float] = None,
            vmax: Optional[float] = None, colormap: int = cv2.COLORMAP_VIRIDIS) -> np.ndarray:
    """A 2-D array as an RGB heat map, scaled to [vmin, vmax] (default: its own range), resized to
    `size` = (width, height) with nearest-neighbour interpolation so feature-map cells stay visible."""
    v = _np(values, np.float64)
    lo = float(v.min()) if vmin is None else vmin
    hi = float(v.max()) if vmax is None else vmax
    scaled = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
    grey = (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(grey, colormap), cv2.COLOR_BGR2RGB)
    if size is not None:
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST)
    return rgb


def colour_bar(image: np.ndarray, low: str = "0", high: str = "1", colormap: int = cv2.COLORMAP_VIRIDIS,
               title: str = "", length: int = 100) -> np.ndarray:
    """A small horizontal colour bar with end labels at the bottom-right corner."""
    img = image.copy()
    length = min(length, img.shape[1] - 8)
    bar = np.repeat(colormap_lut(colormap)[None], 8, axis=0)
    bar = cv2.resize(bar, (length, 8), interpolation=cv2.INTER_LINEAR)
    x0, y0 = img.shape[1] - length - 4, img.shape[0] - 12
    if x0 < 0 or y0 < LINE_HEIGHT:
        return img
    img[y0 : y0 + 8, x0 : x0 + length] = bar
    label = f"{low} {title} {high}" if title else f"{low} .. {high}"
    _text(img, label, x0, y0 - LINE_HEIGHT - 1)
    return img


def fit(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (area interpolation) so that the long side is at most `max_side`."""
    h, w = image.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def save_png(image: np.ndarray, path: Union[str, Path], palette: int = 0) -> None:
    """Write an RGB uint8 image as a maximally compressed PNG (folders created). `palette` > 0: an indexed PNG
    of at most that many colours (median cut, no dithering), several times smaller, for documentation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette > 0:
        from PIL import Image  # a torchvision dependency

        quantized = Image.fromarray(image).quantize(colors=min(palette, 256), method=Image.Quantize.MEDIANCUT,
                                                    dither=Image.Dither.NONE)
        quantized.save(path, optimize=True)
        return
    ok = cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise ValueError(f"cannot write {path}")


# ------------------------------------------------------------------------------------------ composites
def draw_ground_truth(image: np.ndarray, target: dict, class_names: Optional[Sequence[str]] = None,
                      masks: bool = True, thickness: int = 2) -> np.ndarray:
    """Boxes (white on black) with class names, and masks in instance colours, of a target in this frame."""
    boxes = _np(target["boxes"]).reshape(-1, 4)
    labels = _np(target["labels"]).reshape(-1)
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
    scores = _np(det["scores"]).reshape(-1)
    keep = np.nonzero(scores >= score_thresh)[0]
    keep = keep[np.argsort(scores[keep], kind="stable")]  # the best drawn last, on top
    boxes = _np(det["boxes"]).reshape(-1, 4)[keep]
    labels = _np(det["labels"]).reshape(-1)[keep]
    cols = [colour(lab - 1) for lab in labels]
    img = image_uint8_rgb
    if "masks" in det and len(keep):
        masks = _np(det["masks"])
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
    b = _np(boxes).reshape(-1, 4)[order]
    img = draw_boxes(image, b, colormap_colours(prob[order], colormap), thickness=thickness)
    return colour_bar(img, "0", "1", colormap, "objectness")


def objectness(scores: ArrayLike, logits: bool = True) -> np.ndarray:
    """Proposal scores as probabilities."""
    s = _np(scores, np.float64).reshape(-1)
    return 1 / (1 + np.exp(-s)) if logits else s


def rpn_scores_are_logits(model) -> bool:
    return not getattr(model.rpn, "sigmoid_scores", False)


def draw_sampled_rois(image: np.ndarray, rois: ArrayLike, labels: ArrayLike, matched_idx: ArrayLike,
                      gt_boxes: ArrayLike, class_names: Optional[Sequence[str]] = None,
                      gt_labels: Optional[ArrayLike] = None) -> np.ndarray:
    """Sampled RoIs: negatives (background) thin and translucent red; positives in the colour of their matched
    ground truth, with a line from the RoI centre to the GT centre; the GT boxes on top."""
    r = _np(rois).reshape(-1, 4)
    lab = _np(labels).reshape(-1)
    idx = _np(matched_idx).reshape(-1)
    gt = _np(gt_boxes).reshape(-1, 4)
    neg, pos = lab == 0, lab > 0
    img = draw_boxes(image, r[neg], NEGATIVE_COLOUR, alpha=0.45)
    cols = [colour(i) for i in idx[pos]]
    img = draw_boxes(img, r[pos], cols)
    if pos.any():
        centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
        img = draw_lines(img, centre(r[pos]), centre(gt[idx[pos]]), cols)
    names = None
    if gt_labels is not None:
        names = [class_name(class_names, g) for g in _np(gt_labels).reshape(-1)]
    return draw_boxes(img, gt, [colour(i) for i in range(len(gt))], names, thickness=2, outline=True)


# ----------------------------------------------------------------------------------- model quantities
def model_input_image(model, image_list, i: int = 0) -> np.ndarray:
    """The i-th image exactly as the model sees it (resized, before padding), un-normalised, uint8 RGB."""
    h, w = image_list.image_sizes[i]
    t = model.transform
    x = image_list.tensor[i, :, :h, :w].float() * t.pixel_std + t.pixel_mean
    return to_uint8_image(x)


def anchor_levels(anchors: list[Tensor]) -> Tensor:
    """Level index [Atot] of each anchor of the concatenated per-level list."""
    sizes = torch.tensor([len(a) for a in anchors])
    return torch.repeat_interleave(torch.arange(len(anchors)), sizes)


@torch.no_grad()
def label_and_sample_anchors(rpn, anchors: list[Tensor], gt_boxes: Tensor) -> dict[str, Tensor]:
    """The RPN's own labelling and sampling of one image's anchors: anchors [Atot, 4], levels [Atot],
    labels [Atot] (1 pos, 0 neg, -1 ignored) and sampled [Atot] (the same after sampling)."""
    all_anchors = torch.cat(anchors)
    labels, _ = rpn.label_anchors(all_anchors, gt_boxes.to(all_anchors))
    pos, neg = rpn.sampler(labels)
    sampled = torch.full_like(labels, -1)
    sampled[pos], sampled[neg] = 1, 0
    return {"anchors": all_anchors, "levels": anchor_levels(anchors).to(labels.device), "labels": labels,
            "sampled": sampled}


def label_counts(labels: Tensor) -> dict[str, int]:
    return {"positive": int((labels == 1).sum()), "negative": int((labels == 0).sum()),
            "ignored": int((labels == -1).sum())}


def draw_anchor_labels(image: np.ndarray, anchors: ArrayLike, labels: ArrayLike, gt_boxes: ArrayLike,
                       title: str = "", sampled: bool = False) -> np.ndarray:
    """Anchors by label, ground truth in white, counts in the legend. Before sampling (`sampled=False`):
    positives green boxes, ignored yellow translucent boxes, negatives red pixels at their centres (one per
    location: there are thousands). After sampling: the sampled positives and negatives as boxes, the rest
    (label -1: not sampled) not drawn."""
    a = _np(anchors).reshape(-1, 4)
    lab = _np(labels).reshape(-1)
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
def rpn_outputs(model, image_list, feats: dict[str, Tensor], targets: Optional[list[dict]] = None,
                training: bool = False) -> list[dict[str, Tensor]]:
    """Proposals of the RPN as in training (`training=True`: training top-k, needs targets) or inference,
    whatever mode the rest of the model is in; the RPN's mode is restored."""
    was = model.rpn.training
    try:
        model.rpn.train(training)
        proposals, _ = model.rpn(image_list, feats, targets if training else None)
    finally:
        model.rpn.train(was)
    return proposals


# ---------------------------------------------------------------------------------- during training
class _NoiseStreams:
    """Save and restore the latent-noise module's own seeded generators (so a visualisation pass does not
    shift the training noise)."""

    def __init__(self, noise):
        self.gens = getattr(noise, "_generators", None)
        self.saved = {} if self.gens is None else {d: g.get_state() for d, g in self.gens.items()}

    def restore(self) -> None:
        if self.gens is None:
            return
        for d in [d for d in self.gens if d not in self.saved]:
            del self.gens[d]
        for d, state in self.saved.items():
            self.gens[d].set_state(state)


@torch.no_grad()
def training_panels(model, images: list[Tensor], targets: list[dict], top: int = 20,
                    class_names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """The first image: {"gt_proposals": GT | top proposals, "rois": sampled RoIs (full stage)}.

    The model runs in eval mode (running BatchNorm statistics, test-size resize, no training noise), the RPN
    with its training settings (training top-k); the model's modes and every RNG stream are restored after.
    """
    modes = [(m, m.training) for m in model.modules()]  # restored exactly, whatever the engine set
    device = images[0].device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    noise_streams = _NoiseStreams(model.noise)
    with torch.random.fork_rng(devices=cuda):
        try:
            model.eval()
            image_list, tgts, feats = model.features(images[:1], targets[:1])
            proposals = rpn_outputs(model, image_list, feats, tgts, training=True)
            samples = None
            if model.roi_heads is not None:
                samples = model.roi_heads.sample_proposals([p["boxes"] for p in proposals], tgts)
        finally:
            for m, mode in modes:
                m.training = mode
            noise_streams.restore()
    image = model_input_image(model, image_list, 0)
    gt = draw_ground_truth(image, tgts[0], class_names)
    p = proposals[0]
    props = draw_proposals(draw_boxes(image, tgts[0]["boxes"], GT_COLOUR, outline=True),
                           p["boxes"][:top], p["scores"][:top], thickness=2, logits=rpn_scores_are_logits(model))
    panels = {"gt_proposals": side_by_side([caption(gt, "ground truth"),
                                            caption(props, f"top-{top} proposals")])}
    if samples is not None:
        s = samples[0]
        rois = draw_sampled_rois(image, s["boxes"], s["labels"], s["matched_idx"], tgts[0]["boxes"],
                                 class_names, tgts[0]["labels"])
        npos, nneg = int((s["labels"] > 0).sum()), int((s["labels"] == 0).sum())
        panels["rois"] = caption(rois, [f"sampled RoIs: {npos} positive, {nneg} negative"])
    return panels


@torch.no_grad()
def log_training_images(writer, model, images: list[Tensor], targets: list[dict], iteration: int,
                        top: int = 20, max_side: int = 640, class_names: Optional[Sequence[str]] = None) -> None:
    """TensorBoard images of the batch's first image (detectron2's VIS_PERIOD): "vis/gt_proposals" (ground
    truth next to the top-`top` proposals, both stages) and "vis/rois" (the RoIs sampled for the box head,
    full stage). Cheap: one image through the backbone and RPN; training mode and RNG state are untouched."""
    panels = training_panels(model, images, targets, top, class_names)
    for name, img in panels.items():
        writer.add_image(f"vis/{name}", fit(img, 2 * max_side if name == "gt_proposals" else max_side),
                         iteration, dataformats="HWC")


# ------------------------------------------------------------------------------------------- features
def mean_activation(x: Tensor, valid: tuple[int, int]) -> np.ndarray:
    """[1, C, H, W] -> [h, w] channel mean over the valid (unpadded) region."""
    return _np(x[0, :, : valid[0], : valid[1]].float().mean(0))


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
                                    [caption(blank, ["with noise:"] + _wrap(noise_text, 20))], []]
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


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def relative_change(clean: Tensor, noisy: Tensor) -> float:
    """||noisy - clean|| / ||clean|| over the whole tensor."""
    return float((noisy.float() - clean.float()).norm() / clean.float().norm().clamp(min=1e-12))


# -------------------------------------------------------------------------------------------- anchors
def anchor_grid_size(image_list) -> tuple[int, int]:
    """The padded batch size (Hp, Wp) that the anchor generator may need (torchvision-style strides)."""
    return tuple(image_list.tensor.shape[-2:])


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
    b = _np(torch.cat(list(boxes))).reshape(-1, 4)
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
        b = _np(boxes).reshape(-1, 4) + m
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
