"""Synthetic "shapes" instance-segmentation dataset written in real COCO format.

The generator draws geometric shapes (circles, rectangles, triangles, stars,
ellipses) with random colours on textured backgrounds and writes::

    root/train/000000.png ...
    root/val/000000.png ...
    root/annotations/instances_train.json
    root/annotations/instances_val.json
    root/meta.json                     # generation parameters (cache key)

Properties that make it a useful end-to-end test of a Mask R-CNN:

* object sizes are log-uniform from ~10 px up to ~75% of the image side, so
  every FPN level gets objects;
* shapes overlap; later shapes occlude earlier ones, an instance's mask is its
  *visible* part and instances that end up mostly hidden are removed from the
  image altogether (no unlabeled fragments remain);
* segmentations are polygons when the visible region is one simple region and
  compressed RLE otherwise, so both COCO encodings are exercised;
* everything is a pure function of ``seed``: same seed -> byte-identical files.

CLI::

    python -m maskrcnn.data.shapes --root datasets/shapes --num-train 300 --num-val 50 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "SHAPE_KINDS",
    "DEFAULT_CLASSES",
    "generate_shapes",
    "ensure_shapes",
]

#: Every shape kind the renderer knows.
SHAPE_KINDS: tuple[str, ...] = ("circle", "rectangle", "triangle", "star", "ellipse")
#: Classes used unless told otherwise (category ids 1..K in this order).
DEFAULT_CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "star")

# Bump when the rendering changes so that cached datasets get regenerated.
_GENERATOR_VERSION = 1
_SPLIT_CODES = {"train": 0, "val": 1}

# Instance filtering thresholds (see module docstring).
_MIN_VISIBLE_FRACTION = 0.3
_MIN_VISIBLE_PIXELS = 20


# --------------------------------------------------------------------------- #
# Rendering helpers
# --------------------------------------------------------------------------- #
def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A float32 RGB background in 0..255 (gradient, stripes or smooth blotches) and its mean colour."""
    kind = rng.integers(3)
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    theta = rng.uniform(0, math.pi)
    # Coordinate along a random direction (broadcast instead of a full meshgrid).
    proj = (np.arange(w, dtype=np.float32)[None, :] * math.cos(theta)
            + np.arange(h, dtype=np.float32)[:, None] * math.sin(theta))
    if kind == 0:  # linear gradient
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == 1:  # soft or hard stripes
        period = rng.uniform(6.0, 40.0)
        t = 0.5 + 0.5 * np.sin(proj * (2 * math.pi / period))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    else:  # low-frequency colour blotches, upsampled from a coarse grid
        gh, gw = max(2, h // 24), max(2, w // 24)
        coarse = rng.uniform(0, 1, (gh, gw)).astype(np.float32)
        t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    # Blend c0 -> c1 through a 256-entry palette: one gather instead of
    # several full-image float passes (this is the hot path).
    levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
    palette = c0[None, :] * (1 - levels) + c1[None, :] * levels
    idx = np.clip(t * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return palette[idx], (c0 + c1) / 2


def _regular_polygon(
    cx: float, cy: float, radii: Sequence[float], angle: float
) -> np.ndarray:
    """Vertices at equally spaced angles with the given (cycled) radii."""
    n = len(radii)
    a = angle + np.arange(n) * (2 * math.pi / n)
    r = np.asarray(radii, dtype=np.float64)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _draw_shape(
    kind: str, rng: np.random.Generator, h: int, w: int, cx: float, cy: float, size: float
) -> np.ndarray:
    """Rasterise one shape of extent ``size`` px centred at (cx, cy) into a 0/1 mask."""
    mask = np.zeros((h, w), np.uint8)
    angle = rng.uniform(0, 2 * math.pi)
    r = size / 2.0
    # Sub-pixel precision for polygon vertices (cv2 fixed-point "shift").
    shift = 4
    scale = 1 << shift
    if kind == "circle":
        cv2.circle(mask, (round(cx * scale), round(cy * scale)), round(r * scale), 1, -1, cv2.LINE_8, shift)
        return mask
    if kind == "ellipse":
        # Clearly elongated so ellipses are distinguishable from circles.
        axes = (round(r * scale), round(r * rng.uniform(0.35, 0.65) * scale))
        cv2.ellipse(
            mask, (round(cx * scale), round(cy * scale)), axes,
            math.degrees(angle), 0, 360, 1, -1, cv2.LINE_8, shift,
        )
        return mask
    if kind == "rectangle":
        hw, hh = r, r * rng.uniform(0.4, 1.0)  # includes near-squares
        local = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = local @ rot.T + np.array([cx, cy])
    elif kind == "triangle":
        # Jittered equilateral triangle: keeps it clearly triangular, never a sliver.
        base = _regular_polygon(0, 0, [r] * 3, angle)
        pts = base + rng.uniform(-0.15 * r, 0.15 * r, base.shape) + np.array([cx, cy])
    elif kind == "star":
        inner = r * rng.uniform(0.38, 0.55)
        pts = _regular_polygon(cx, cy, [r, inner] * 5, angle)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(SHAPE_KINDS)}")
    cv2.fillPoly(mask, [np.round(pts * scale).astype(np.int32)], 1, cv2.LINE_8, shift)
    return mask


def _pick_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random RGB colour that is not too close to ``avoid`` (the background mean)."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(8):  # bounded retries keep this deterministic and cheap
        if np.abs(colour - avoid).sum() > 90:
            break
        colour = rng.uniform(0, 255, 3)
    return colour.astype(np.float32)


# --------------------------------------------------------------------------- #
# Annotation encoding
# --------------------------------------------------------------------------- #
def _polygon_if_exact(mask: np.ndarray, bbox: Sequence[int]) -> list[list[float]] | None:
    """Polygon whose COCO rasterisation equals ``mask`` exactly, or None.

    Contours traced on the 2x nearest-upsampled mask, mapped back with
    ``(c + 0.5) / 2``, run along pixel *edges* (at quarter-pixel offsets), which
    pycocotools rasterises back to exactly the same pixels.  Only a single
    region without holes becomes a polygon; anything else stays RLE.
    """
    h, w = mask.shape
    x, y, bw, bh = bbox
    crop = np.zeros((bh + 2, bw + 2), np.uint8)  # 1 px empty border around the object
    crop[1:-1, 1:-1] = mask[y:y + bh, x:x + bw]
    up = cv2.resize(crop, (2 * crop.shape[1], 2 * crop.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) != 1 or hierarchy[0][0][2] != -1 or len(contours[0]) < 3:
        return None
    pts = (contours[0].reshape(-1, 2).astype(np.float64) + 0.5) / 2.0 + np.array([x - 1, y - 1])
    poly = pts.ravel().tolist()
    with warnings.catch_warnings():  # pycocotools' harmless NumPy 2 DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w)))
    if not np.array_equal(decoded, mask):
        return None
    return [poly]


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """COCO annotation for a visible 0/1 mask (polygon when exact, else compressed RLE)."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    x, y, bw, bh = (int(v) for v in mask_utils.toBbox(rle))
    poly = _polygon_if_exact(mask, (x, y, bw, bh))
    if poly is not None:
        segmentation: Any = poly
    else:
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": int(mask_utils.area(rle)),
        "bbox": [x, y, bw, bh],
        "iscrowd": 0,
    }


# --------------------------------------------------------------------------- #
# Image generation
# --------------------------------------------------------------------------- #
def _image_size(rng: np.random.Generator, image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    lo, hi = image_size
    h, w = rng.integers(lo, hi + 1, 2)
    return int(h), int(w)


def _render_image(
    rng: np.random.Generator,
    image_size: int | tuple[int, int],
    class_kinds: Sequence[str],
    max_objects: int,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render one RGB uint8 image; returns it with (class index, visible mask) pairs."""
    h, w = _image_size(rng, image_size)
    side = min(h, w)
    n = int(rng.integers(2, max_objects + 1))
    # Log-uniform sizes give roughly equal numbers of objects per FPN level.
    sizes = np.exp(rng.uniform(math.log(10.0), math.log(0.75 * side), n))
    # Mostly big-to-small so small objects are not always buried, with noise so
    # small ones do get occluded sometimes.
    order = np.argsort(-(np.log(sizes) + rng.normal(0.0, 0.6, n)), kind="stable")

    shapes: list[tuple[int, np.ndarray]] = []
    for i in order:
        size = float(sizes[i])
        cls = int(rng.integers(len(class_kinds)))
        # Centres stay >= 0.3 * size from the border: shapes may be truncated a
        # little (as in real photos) but never mostly outside the image.
        margin = 0.3 * size
        cx = rng.uniform(margin, w - margin)
        cy = rng.uniform(margin, h - margin)
        mask = _draw_shape(class_kinds[cls], rng, h, w, float(cx), float(cy), size)
        if np.count_nonzero(mask) >= _MIN_VISIBLE_PIXELS:
            shapes.append((cls, mask))

    def visible(masks: list[np.ndarray]) -> list[np.ndarray]:
        owner = np.full((h, w), -1, np.int16)
        for k, mk in enumerate(masks):
            np.copyto(owner, np.int16(k), where=mk.view(bool))  # later shapes paint over earlier ones
        return [(owner == k).view(np.uint8) for k in range(len(masks))]

    # Drop mostly-hidden shapes.  Removing a shape can only *increase* what the
    # others show, so one recomputation is enough for the survivors.
    vis = visible([mk for _, mk in shapes])
    keep = [
        k for k, (_, mk) in enumerate(shapes)
        if np.count_nonzero(vis[k]) >= max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * np.count_nonzero(mk))
    ]
    shapes = [shapes[k] for k in keep]
    vis = visible([mk for _, mk in shapes])

    img, bg_mean = _background(rng, h, w)
    for _cls, mk in shapes:
        colour = _pick_colour(rng, bg_mean)
        # Mild linear shading inside the shape so fills are not perfectly flat.
        gx, gy = rng.uniform(-0.6, 0.6, 2) / side
        yy, xx = np.nonzero(mk)
        shade = 1.0 + (xx - w / 2) * gx + (yy - h / 2) * gy
        img[yy, xx] = colour[None, :] * shade[:, None].astype(np.float32)
    # Mild uniform sensor-like noise (+-6); stronger noise mostly bloats the PNGs.
    img += rng.random(img.shape, dtype=np.float32) * 12.0 - 6.0
    img_u8 = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return img_u8, [(cls, v) for (cls, _), v in zip(shapes, vis)]


def _write_split(
    root: Path,
    split: str,
    num_images: int,
    image_size: int | tuple[int, int],
    seed: int,
    classes: Sequence[str],
    max_objects: int,
) -> Path:
    img_dir = root / split
    if img_dir.exists():
        shutil.rmtree(img_dir)  # stale images from another configuration
    img_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for idx in range(num_images):
        # Independent stream per (seed, split, index): images do not depend on
        # how many other images are generated.
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], idx])
        img, instances = _render_image(rng, image_size, classes, max_objects)
        file_name = f"{idx:06d}.png"
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"failed to encode {file_name}")
        (img_dir / file_name).write_bytes(buf.tobytes())
        image_id = idx + 1  # COCO ids are conventionally positive
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
        for cls, vis in instances:
            annotations.append(_annotation(vis, len(annotations) + 1, image_id, cls + 1))
    dataset = {
        "info": {"description": f"synthetic shapes ({split}), seed {seed}", "version": str(_GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)],
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(dataset, separators=(",", ":")))
    return ann_file


def _paths(root: Path) -> dict[str, Path]:
    return {
        "root": root,
        "train_images": root / "train",
        "val_images": root / "val",
        "train_ann": root / "annotations" / "instances_train.json",
        "val_ann": root / "annotations" / "instances_val.json",
        "meta": root / "meta.json",
    }


def _params(
    num_train: int,
    num_val: int,
    image_size: int | tuple[int, int],
    seed: int,
    classes: Sequence[str],
    max_objects: int,
) -> dict[str, Any]:
    if not isinstance(image_size, int):
        lo, hi = (int(v) for v in image_size)
        if not 32 <= lo <= hi:
            raise ValueError(f"image_size must be (min, max) with 32 <= min <= max, got {image_size}")
        image_size = (lo, hi)
    elif image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    unknown = [c for c in classes if c not in SHAPE_KINDS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {SHAPE_KINDS}, got {list(classes)}")
    if max_objects < 2:
        raise ValueError(f"max_objects must be >= 2, got {max_objects}")
    return {
        "version": _GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": list(image_size) if isinstance(image_size, tuple) else image_size,
        "seed": int(seed),
        "classes": list(classes),
        "max_objects": int(max_objects),
    }


def generate_shapes(
    root: str | Path,
    num_train: int = 300,
    num_val: int = 50,
    image_size: int | tuple[int, int] = (256, 320),
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    max_objects: int = 8,
) -> dict[str, Path]:
    """Generate the dataset under ``root`` (overwriting it); return its paths.

    Args:
        root: output directory.
        num_train, num_val: number of images per split.
        image_size: side length, or ``(min, max)``; height and width are then
            drawn independently per image.
        seed: everything is a deterministic function of it.
        classes: shape kinds, category ids are ``1..K`` in this order.
        max_objects: shapes drawn per image is uniform in ``[2, max_objects]``
            (fewer survive occlusion filtering).

    Returns:
        ``{"root", "train_images", "val_images", "train_ann", "val_ann", "meta"}``.
    """
    params = _params(num_train, num_val, image_size, seed, classes, max_objects)
    root = Path(root)
    paths = _paths(root)
    root.mkdir(parents=True, exist_ok=True)
    paths["meta"].unlink(missing_ok=True)  # marker is invalid until we finish
    size = tuple(params["image_size"]) if isinstance(params["image_size"], list) else params["image_size"]
    for split, n in (("train", num_train), ("val", num_val)):
        _write_split(root, split, n, size, seed, list(classes), max_objects)  # type: ignore[arg-type]
    # Written last: its presence means the dataset is complete.
    paths["meta"].write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return paths


def ensure_shapes(root: str | Path, **kwargs: Any) -> dict[str, Path]:
    """Like :func:`generate_shapes`, but reuse ``root`` if it was generated with the same parameters."""
    defaults = {
        "num_train": 300, "num_val": 50, "image_size": (256, 320), "seed": 0,
        "classes": DEFAULT_CLASSES, "max_objects": 8,
    }
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_shapes() got unexpected arguments: {sorted(unknown)}")
    cfg = {**defaults, **kwargs}
    params = _params(**cfg)
    paths = _paths(Path(root))
    try:
        recorded = json.loads(paths["meta"].read_text())
    except (OSError, ValueError):
        recorded = None
    complete = recorded == params and all(
        paths[k].exists() for k in ("train_ann", "val_ann", "train_images", "val_images")
    )
    if complete:
        return paths
    return generate_shapes(root, **cfg)


def _main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m maskrcnn.data.shapes",
                                description="Generate the synthetic COCO-format shapes dataset.")
    p.add_argument("--root", required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=300)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--min-size", type=int, default=256, help="minimum image side")
    p.add_argument("--max-size", type=int, default=320, help="maximum image side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=8)
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), choices=SHAPE_KINDS)
    p.add_argument("--force", action="store_true", help="regenerate even if up to date")
    a = p.parse_args(argv)
    kw = dict(
        num_train=a.num_train, num_val=a.num_val, image_size=(a.min_size, a.max_size),
        seed=a.seed, classes=tuple(a.classes), max_objects=a.max_objects,
    )
    t0 = time.perf_counter()
    paths = generate_shapes(a.root, **kw) if a.force else ensure_shapes(a.root, **kw)
    n_ann = {s: len(json.loads(paths[f"{s}_ann"].read_text())["annotations"]) for s in ("train", "val")}
    print(
        f"shapes dataset at {paths['root']}: {a.num_train} train / {a.num_val} val images, "
        f"{n_ann['train']} / {n_ann['val']} instances ({time.perf_counter() - t0:.1f} s)"
    )


if __name__ == "__main__":
    _main()
