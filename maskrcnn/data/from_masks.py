"""Convert "one binary mask file per instance" into a COCO instances JSON.

Expected layout (both mask layouts may be mixed)::

    IMAGES_DIR/<stem>.<ext>                 # .png .jpg .jpeg .bmp .tif .tiff .webp
    MASKS_DIR/<stem>_<k>.png                # flat: instance k of image <stem>
    MASKS_DIR/<stem>/<k>.png                # or one folder per image

Optionally the class name follows the instance number::

    MASKS_DIR/<stem>_<k>_<classname>.png    or    MASKS_DIR/<stem>/<k>_<classname>.png

Masks without a class name get ``category`` (default "object").  Category ids
are 1..K in alphabetical order of the names.  When image stems are prefixes of
each other (``a`` and ``a_1``), a flat mask name is matched to the longest stem.

Each mask must be a single-channel binary image with values {0, 1} or {0, 255}
(a 3-channel file whose channels are identical is accepted).  Colour-coded or
anti-aliased / JPEG masks are rejected with a one-line error naming the file:
training on them silently yields garbage instances and an AP of 0.0.

Segmentations are written as compressed RLE (exact, any topology).

CLI::

    python -m maskrcnn.data.from_masks --images DIR --masks DIR --category NAME --out ann.json
    python -m maskrcnn.data.convert masks --images DIR --masks DIR --category NAME --out ann.json  # the same
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .coco import DatasetError, read_image
from .exif import apply_orientation, exif_orientation

__all__ = ["IMAGE_EXTENSIONS", "masks_to_coco", "read_binary_mask"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# "<k>" or "<k>_<classname>" after the stem.
_INSTANCE_RE = re.compile(r"^(\d+)(?:_(.+))?$")


def read_binary_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a per-instance mask as uint8 0/1, or raise DatasetError saying what was found.

    An EXIF orientation is applied, as to the photos (:func:`~maskrcnn.data.coco.read_image`).
    """
    name = os.fspath(path)
    buf = np.fromfile(name, dtype=np.uint8)
    m = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if m is None:
        raise DatasetError(f"{name}: cannot decode mask image")
    if m.ndim == 3:
        channels = m.shape[2]
        colour = m[:, :, :3] if channels >= 3 else m
        if channels >= 3 and not (np.array_equal(colour[..., 0], colour[..., 1])
                                  and np.array_equal(colour[..., 0], colour[..., 2])):
            colours = np.unique(colour.reshape(-1, 3)[:, ::-1], axis=0)  # BGR -> RGB for the message
            examples = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:4])
            raise DatasetError(
                f"{name}: mask is a {channels}-channel colour image with {len(colours)} distinct colours "
                f"(e.g. RGB {examples}); expected one single-channel binary mask (0/1 or 0/255) per instance"
            )
        m = m[..., 0]
    values = np.unique(m)
    if len(values) > 2 or not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(str(int(v)) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DatasetError(
            f"{name}: mask has {len(values)} distinct values ({shown}); expected a binary mask with values "
            "{0, 1} or {0, 255} (anti-aliased, JPEG-compressed or label-map masks are not binary)"
        )
    return apply_orientation((m > 0).astype(np.uint8), exif_orientation(buf))


def _list_images(images_dir: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for p in sorted(images_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in images:
                raise DatasetError(f"{p}: two images share the stem {p.stem!r} ({images[p.stem].name}, {p.name})")
            images[p.stem] = p
    return images


def _collect_masks(masks_dir: Path, stems: Sequence[str]) -> dict[str, list[tuple[int, str | None, Path]]]:
    """Map image stem -> [(instance number, class name or None, mask path)]."""
    found: dict[str, list[tuple[int, str | None, Path]]] = {s: [] for s in stems}
    by_length = sorted(stems, key=len, reverse=True)  # longest stem wins
    for p in sorted(masks_dir.iterdir()):
        if p.is_dir():
            if p.name not in found:
                raise DatasetError(f"{p}: mask folder does not match any image stem in the images folder")
            for q in sorted(p.iterdir()):
                if q.suffix.lower() != ".png":
                    continue
                m = _INSTANCE_RE.match(q.stem)
                if m is None:
                    raise DatasetError(f"{q}: expected a name like '<k>.png' or '<k>_<classname>.png'")
                found[p.name].append((int(m.group(1)), m.group(2), q))
            continue
        if p.suffix.lower() != ".png":
            continue  # e.g. .DS_Store, README
        for stem in by_length:
            if p.stem.startswith(stem + "_"):
                m = _INSTANCE_RE.match(p.stem[len(stem) + 1:])
                if m is not None:
                    found[stem].append((int(m.group(1)), m.group(2), p))
                    break
        else:
            raise DatasetError(
                f"{p}: mask name does not match any image as '<stem>_<k>.png' or '<stem>_<k>_<classname>.png'"
            )
    for stem, items in found.items():
        numbers = [k for k, _, _ in items]
        if len(set(numbers)) != len(numbers):
            dup = sorted({k for k in numbers if numbers.count(k) > 1})
            raise DatasetError(f"{masks_dir}: image {stem!r} has several masks numbered {dup}")
        items.sort(key=lambda t: t[0])
    return found


def masks_to_coco(
    images_dir: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str],
    category: str = "object",
    out_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build (and optionally write) a COCO instances dict from per-instance mask files.

    Images without masks are kept (with a warning) as images without objects.
    File names in the JSON are relative to ``images_dir``.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DatasetError(f"{d}: directory not found")
    images = _list_images(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    masks = _collect_masks(masks_dir, list(images))

    names = sorted({cls or category for items in masks.values() for _, cls, _ in items} or {category})
    cat_ids = {name: k + 1 for k, name in enumerate(names)}

    image_records: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (stem, path) in enumerate(sorted(images.items()), start=1):
        h, w = read_image(path).shape[:2]
        image_records.append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        if not masks[stem]:
            warnings.warn(f"{path}: no masks found; kept as an image without objects", stacklevel=2)
        for _k, cls, mpath in masks[stem]:
            m = read_binary_mask(mpath)
            if m.shape != (h, w):
                raise DatasetError(
                    f"{mpath}: mask is {m.shape[1]}x{m.shape[0]} (width x height) but image "
                    f"{path.name} is {w}x{h}"
                )
            if not m.any():
                raise DatasetError(f"{mpath}: mask is empty (all zeros)")
            rle = mask_utils.encode(np.asfortranarray(m))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_ids[cls or category],
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [int(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
    dataset = {
        "info": {"description": f"converted from masks in {masks_dir.name}"},
        "licenses": [],
        "images": image_records,
        "annotations": annotations,
        "categories": [{"id": cat_ids[n], "name": n, "supercategory": ""} for n in names],
    }
    if out_file is not None:
        out = Path(out_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dataset))
    return dataset


def main(argv: Sequence[str] | None = None, prog: str = "python -m maskrcnn.data.from_masks") -> None:
    p = argparse.ArgumentParser(prog=prog, description="Convert per-instance binary masks to a COCO instances JSON.")
    p.add_argument("--images", required=True, help="folder with <stem>.<ext> images")
    p.add_argument("--masks", required=True, help="folder with <stem>_<k>.png or <stem>/<k>.png masks")
    p.add_argument("--category", default="object", help="class name for masks without one in the file name")
    p.add_argument("--out", required=True, help="output JSON path")
    a = p.parse_args(argv)
    try:
        data = masks_to_coco(a.images, a.masks, a.category, a.out)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {a.out}: {len(data['images'])} images, {len(data['annotations'])} instances, "
          f"categories {[c['name'] for c in data['categories']]}")


if __name__ == "__main__":
    main()
