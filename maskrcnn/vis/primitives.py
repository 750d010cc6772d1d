"""Drawing primitives: colours, text, boxes, masks, points, lines, panels, colour maps, PNG files.

Conventions: an image is np.ndarray [H, W, 3] uint8 RGB; boxes are [N, 4] xyxy pixels (tensor or array);
masks are [N, H, W] (bool, 0/1 or probabilities); colours are RGB tuples. Drawing functions return a new
image and never modify their input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
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


def to_numpy(x: ArrayLike, dtype=None) -> np.ndarray:
    """A tensor (any device; floats as float32) or array-like as a numpy array, optionally cast."""
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def to_uint8_image(image: Tensor) -> np.ndarray:
    """[3, H, W] float 0..1 RGB tensor -> [H, W, 3] uint8 RGB."""
    return np.ascontiguousarray((to_numpy(image).clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))


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


MIN_FONT_SCALE = 0.28  # the smallest text a word too wide for its picture is shrunk to (then cut)
HEADER_BACKGROUND: Colour = (40, 40, 40)


def _fit_lines(lines: Sequence[str], colours: Sequence[Optional[Colour]], width: int
               ) -> list[tuple[str, Optional[Colour], float]]:
    """(text, swatch colour, font scale) per drawn line: each line word-wrapped to `width` pixels (its swatch
    colour on the first piece only; the pieces keep its indent), a word wider than `width` alone drawn smaller
    (down to MIN_FONT_SCALE) and, if still too wide, cut with '..'."""
    def wide(text: str, scale: float = FONT_SCALE) -> int:
        return cv2.getTextSize(text, FONT, scale, 1)[0][0] + 2

    out: list[tuple[str, Optional[Colour], float]] = []
    for text, c in zip(lines, colours):
        pieces: list[str] = []
        for word in text.split(" "):
            if pieces and wide(f"{pieces[-1]} {word}") <= width:
                pieces[-1] = f"{pieces[-1]} {word}"
            else:
                pieces.append(word)
        for k, piece in enumerate(pieces):
            scale = FONT_SCALE
            while wide(piece, scale) > width and scale > MIN_FONT_SCALE:
                scale = max(MIN_FONT_SCALE, scale - 0.02)
            while wide(piece, scale) > width and len(piece) > 1:
                piece = piece[:-3] + ".." if len(piece) > 3 else piece[:-1]
            out.append((piece, c if k == 0 else None, scale))
    return out


def _draw_lines(img: np.ndarray, fitted: list[tuple[str, Optional[Colour], float]], x0: int, y0: int,
                swatch: int) -> None:
    """In place: fitted text lines from (x0, y0) down, white, each after its swatch (legend colour)."""
    for i, (t, c, scale) in enumerate(fitted):
        y = y0 + 2 + i * LINE_HEIGHT
        if c is not None:
            cv2.rectangle(img, (x0 + 3, y + 2), (x0 + swatch - 1, y + LINE_HEIGHT - 2), c, -1)
        if t:
            (_, h), _ = cv2.getTextSize(t, FONT, scale, 1)
            cv2.putText(img, t, (x0 + 3 + swatch, y + h + 1), FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def caption(image: np.ndarray, lines: Union[str, Sequence[str]], corner: str = "top-left",
            colours: Optional[Sequence[Optional[Colour]]] = None) -> np.ndarray:
    """Text lines over a translucent dark band at a corner (the image keeps its size), wrapped (or shrunk) to
    the image's width. `colours`: an optional swatch colour per line, drawn before its text (a legend). For the
    small panels and legends; a picture's header, which must not hide what is drawn, is `header`."""
    lines = [lines] if isinstance(lines, str) else list(lines)
    if not lines:
        return image.copy()
    img = image.copy()
    colours = list(colours) if colours is not None else [None] * len(lines)
    swatch = LINE_HEIGHT if any(c is not None for c in colours) else 0
    fitted = _fit_lines(lines, colours, max(img.shape[1] - swatch - 4, 1))
    width = min(max(cv2.getTextSize(t, FONT, sc, 1)[0][0] for t, _, sc in fitted) + swatch + 6, img.shape[1])
    height = LINE_HEIGHT * len(fitted) + 4
    x0 = 0 if corner.endswith("left") else max(img.shape[1] - width, 0)
    y0 = 0 if corner.startswith("top") else max(img.shape[0] - height, 0)
    band = img.copy()
    cv2.rectangle(band, (x0, y0), (x0 + width, y0 + height), (0, 0, 0), -1)
    img = _blend(img, band, 0.6)
    _draw_lines(img, fitted, x0, y0, swatch)
    return img


def header(image: np.ndarray, lines: Union[str, Sequence[str]],
           colours: Optional[Sequence[Optional[Colour]]] = None) -> np.ndarray:
    """The image under a dark band holding the text lines, wrapped (or shrunk) to the image's width: the
    picture grows by the band's height and the header covers nothing drawn on the image (labels of objects at
    its top edge stay visible). `colours`: an optional swatch colour per line (a legend)."""
    lines = [lines] if isinstance(lines, str) else list(lines)
    if not lines:
        return image.copy()
    colours = list(colours) if colours is not None else [None] * len(lines)
    swatch = LINE_HEIGHT if any(c is not None for c in colours) else 0
    fitted = _fit_lines(lines, colours, max(image.shape[1] - swatch - 4, 1))
    band = np.empty((LINE_HEIGHT * len(fitted) + 4, image.shape[1], 3), np.uint8)
    band[:] = HEADER_BACKGROUND
    _draw_lines(band, fitted, 0, 0, swatch)
    return np.concatenate([band, image], axis=0)


def draw_boxes(image: np.ndarray, boxes: ArrayLike, colours: Union[Colour, Sequence[Colour]] = GT_COLOUR,
               labels: Optional[Sequence[str]] = None, thickness: int = 1, alpha: float = 1.0,
               outline: bool = False) -> np.ndarray:
    """Rectangles (xyxy px), optionally translucent (`alpha`), with a black `outline` and text labels."""
    b = to_numpy(boxes, np.float64).reshape(-1, 4)
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
    m = to_numpy(masks)
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
    p = np.round(to_numpy(points, np.float64).reshape(-1, 2)).astype(np.int64)
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
    s = np.round(to_numpy(starts, np.float64).reshape(-1, 2)).astype(np.int64)
    e = np.round(to_numpy(ends, np.float64).reshape(-1, 2)).astype(np.int64)
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
    idx = (np.clip(to_numpy(values, np.float64).reshape(-1), 0, 1) * 255 + 0.5).astype(np.int64)
    lut = colormap_lut(colormap)
    return [tuple(int(v) for v in lut[i]) for i in idx]


def heatmap(values: ArrayLike, size: Optional[tuple[int, int]] = None, vmin: Optional[float] = None,
            vmax: Optional[float] = None, colormap: int = cv2.COLORMAP_VIRIDIS) -> np.ndarray:
    """A 2-D array as an RGB heat map, scaled to [vmin, vmax] (default: its own range), resized to
    `size` = (width, height) with nearest-neighbour interpolation so feature-map cells stay visible."""
    v = to_numpy(values, np.float64)
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



def wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])
