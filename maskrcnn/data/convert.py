"""Import instance annotations from other tools into a COCO instances JSON that trains directly.

::

    python -m maskrcnn.data.convert masks        --images DIR --masks DIR --category NAME --out ann.json
    python -m maskrcnn.data.convert label-images --images DIR --labels DIR --category NAME --out ann.json
    python -m maskrcnn.data.convert via          --ann via.json --images DIR [--class-key KEY] --out ann.json
    python -m maskrcnn.data.convert labelme      --input DIR [--images DIR] --out ann.json

* ``masks``: one binary mask per instance (:mod:`maskrcnn.data.from_masks`).
* ``label-images``: one single-channel label image per photo (PennFudan style):
  pixel value k is instance k, 0 is background.  ``<stem>.png`` or
  ``<stem><suffix>.png`` (``--label-suffix``, default ``_mask``) in the labels
  folder.  All instances get ``--category``, or ``--class-map map.json``
  (``{"<image stem>": {"<k>": "<class>"}}``) names them per image.
* ``via``: VGG Image Annotator JSON (project export, or its ``_via_img_metadata``):
  ``{key: {"filename", "regions": [{"shape_attributes": {"name": "polygon",
  "all_points_x", "all_points_y"}, "region_attributes": {KEY: class}}]}}``;
  ``rect`` regions are taken too.  KEY is ``--class-key``, by default the first
  region attribute found; with no attributes at all, ``--category`` is used.
* ``labelme``: one labelme JSON per image (``shapes`` with ``label``,
  ``points``, ``shape_type`` polygon / rectangle / circle; ``imagePath``
  relative to the JSON).  ``file_name`` in the output is relative to ``--images``
  (default: the input folder), which is the folder to train with.

Categories get ids 1..K in the order of ``--classes a,b,c`` when given (a
label outside it is an error), otherwise alphabetically.  Polygons are kept as
polygons (bbox from their points), label images become compressed RLE.
Problems are one-line :class:`~maskrcnn.data.coco.DatasetError` messages naming
the file, the record and the problem: a label image of another size than its
photo, an empty instance, an unknown class, a polygon with fewer than 3 points,
a missing image file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .coco import DatasetError, read_image
from .exif import apply_orientation, exif_orientation
from .from_masks import IMAGE_EXTENSIONS

__all__ = ["CocoWriter", "label_images_to_coco", "via_to_coco", "labelme_to_coco", "main"]


# --------------------------------------------------------------------------- #
# Shared: a COCO dict under construction
# --------------------------------------------------------------------------- #
class CocoWriter:
    """Collects images and instances; categories get contiguous ids from 1.

    Args:
        classes: fixed category names in id order; a name outside them is an error.
            None: names are collected and sorted alphabetically by :meth:`to_dict`.
    """

    def __init__(self, classes: Sequence[str] | None = None) -> None:
        self.classes = list(classes) if classes is not None else None
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self._names: set[str] = set()

    def add_image(self, file_name: str, height: int, width: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        return image_id

    def _check_class(self, name: Any, where: str) -> str:
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: class is {json.dumps(name)}; expected a non-empty name")
        if self.classes is not None and name not in self.classes:
            raise DatasetError(f"{where}: class {name!r} is not in --classes ({', '.join(self.classes)})")
        self._names.add(name)
        return name

    def add_polygon(self, image_id: int, name: Any, xs: Sequence[float], ys: Sequence[float], where: str) -> None:
        """One instance from polygon points; raises on < 3 points, non-numbers or no enclosed pixel."""
        name = self._check_class(name, where)
        if len(xs) != len(ys):
            raise DatasetError(f"{where}: polygon has {len(xs)} x but {len(ys)} y coordinates")
        if len(xs) < 3:
            raise DatasetError(f"{where}: polygon has {len(xs)} point(s); at least 3 are needed")
        try:
            xs, ys = [float(v) for v in xs], [float(v) for v in ys]
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: polygon coordinates are not all numbers") from None
        if not all(math.isfinite(v) for v in xs + ys):
            raise DatasetError(f"{where}: polygon coordinates are not all finite")
        info = self.images[image_id - 1]
        h, w = info["height"], info["width"]
        poly = [v for xy in zip(xs, ys) for v in xy]
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
        area = float(mask_utils.area(rle))
        if area == 0:
            raise DatasetError(f"{where}: empty instance (the polygon covers no pixel of the {w}x{h} image)")
        x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
        x1, y1 = min(max(xs), float(w)), min(max(ys), float(h))
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": name,
                                 "segmentation": [poly], "area": area, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                 "iscrowd": 0})

    def add_mask(self, image_id: int, name: Any, mask: np.ndarray, where: str) -> None:
        """One instance from a 0/1 HxW mask (stored as compressed RLE); raises if it is empty."""
        name = self._check_class(name, where)
        if not mask.any():
            raise DatasetError(f"{where}: empty instance (mask has no pixel)")
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": name,
                                 "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")},
                                 "area": int(mask_utils.area(rle)), "bbox": [int(v) for v in mask_utils.toBbox(rle)],
                                 "iscrowd": 0})

    def to_dict(self, description: str) -> dict[str, Any]:
        names = self.classes if self.classes is not None else sorted(self._names)
        ids = {n: k + 1 for k, n in enumerate(names)}
        annotations = [dict(a, category_id=ids[a["category_id"]]) for a in self.annotations]
        return {"info": {"description": description}, "licenses": [], "images": self.images,
                "annotations": annotations,
                "categories": [{"id": ids[n], "name": n, "supercategory": ""} for n in names]}


def _write(data: dict[str, Any], out_file: str | os.PathLike[str] | None) -> dict[str, Any]:
    if out_file is not None:
        out = Path(out_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data))
    return data


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """(height, width) of an image file, or a one-line error if it is missing or unreadable."""
    if not path.is_file():
        raise DatasetError(f"{where}: image file {os.fspath(path)!r} not found")
    return read_image(path).shape[:2]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- #
# Label images (PennFudan style)
# --------------------------------------------------------------------------- #
def read_label_image(path: Path) -> np.ndarray:
    """A label image as an integer HxW array (palette indices for palette PNGs), or a one-line error.

    An EXIF orientation is applied, as to the photos (:func:`~maskrcnn.data.coco.read_image`).
    """
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            arr = apply_orientation(np.array(im), exif_orientation(data))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read label image ({e})") from None
    if arr.ndim == 3:
        colour = arr[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise DatasetError(f"{path}: label image is a colour ({mode}) image; expected one channel where "
                               "pixel value k is instance k and 0 is background")
        arr = colour[..., 0]
    return arr.astype(np.int64)


def label_images_to_coco(
    images_dir: str | os.PathLike[str],
    labels_dir: str | os.PathLike[str],
    category: str = "object",
    class_map: dict[str, dict[str, str]] | None = None,
    classes: Sequence[str] | None = None,
    label_suffix: str = "_mask",
    out_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """COCO dict from one label image per photo (value k = instance k, 0 = background).

    ``class_map`` maps an image stem to ``{str(k): class}``; instances of images
    not in it get ``category``.  Photos without a label image are kept without
    objects (with a warning); a label image without a photo is an error.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DatasetError(f"{d}: directory not found")
    photos = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise DatasetError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = {p.stem: p for p in labels_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    stems = {p.stem for p in photos}
    for stem, path in sorted(labels.items()):
        if stem not in stems and not (label_suffix and stem.endswith(label_suffix)
                                      and stem[: -len(label_suffix)] in stems):
            raise DatasetError(f"{path}: label image matches no photo in {images_dir} "
                               f"(expected '<stem>.png' or '<stem>{label_suffix}.png')")
    class_map = class_map or {}
    writer = CocoWriter(classes)
    for photo in photos:
        h, w = _image_size(photo, os.fspath(photo))
        image_id = writer.add_image(photo.name, h, w)
        label_path = labels.get(photo.stem) or labels.get(photo.stem + label_suffix)
        if label_path is None:
            warnings.warn(f"{photo}: no label image found; kept as an image without objects", stacklevel=2)
            continue
        label = read_label_image(label_path)
        if label.shape != (h, w):
            raise DatasetError(f"{label_path}: label image is {label.shape[1]}x{label.shape[0]} (width x height) "
                               f"but image {photo.name} is {w}x{h}")
        if label.min() < 0:
            raise DatasetError(f"{label_path}: label image has negative values")
        values = np.unique(label)
        names = class_map.get(photo.stem)
        if names is not None:
            for k in sorted(names, key=lambda v: (len(v), v)):
                if not k.isdigit() or int(k) == 0 or int(k) not in values:
                    raise DatasetError(f"{label_path}: class map names instance {k!r} ({names[k]!r}) but the label "
                                       "image has no pixel of that value (empty instance)")
        for k in values[values > 0].tolist():
            where = f"{label_path}: instance {k}"
            if names is not None and str(k) not in names:
                raise DatasetError(f"{where}: has no class in the class map for {photo.stem!r}")
            writer.add_mask(image_id, names[str(k)] if names is not None else category, label == k, where)
    return _write(writer.to_dict(f"converted from label images in {labels_dir.name}"), out_file)


# --------------------------------------------------------------------------- #
# VIA (VGG Image Annotator)
# --------------------------------------------------------------------------- #
def _via_class(attrs: Any, key: str | None, where: str) -> str | None:
    if key is None:
        return None
    if not isinstance(attrs, dict) or key not in attrs:
        raise DatasetError(f"{where}: region has no {key!r} attribute (the class key; see --class-key)")
    value = attrs[key]
    if isinstance(value, dict):  # checkbox attributes: {"cat": true, "dog": false}
        chosen = [k for k, v in value.items() if v]
        if len(chosen) != 1:
            raise DatasetError(f"{where}: attribute {key!r} has {len(chosen)} options ticked; expected one class")
        value = chosen[0]
    return value if isinstance(value, str) else json.dumps(value)


def via_to_coco(
    via_file: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    class_key: str | None = None,
    category: str = "object",
    classes: Sequence[str] | None = None,
    out_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """COCO dict from a VIA export (polygon and rect regions).  Image sizes are read from the files."""
    via_file, images_dir = Path(via_file), Path(images_dir)
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: directory not found")
    data = _read_json(via_file)
    if isinstance(data, dict) and isinstance(data.get("_via_img_metadata"), dict):
        data = data["_via_img_metadata"]  # a full project file
    if not isinstance(data, dict):
        raise DatasetError(f"{via_file}: top level is a {type(data).__name__}; expected VIA's object of entries "
                           "{key: {'filename', 'regions'}}")
    entries = []
    for key, entry in data.items():
        where = f"{via_file}: entry {key!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DatasetError(f"{where}: expected an object with 'filename' and 'regions'")
        regions = entry.get("regions", [])
        if isinstance(regions, dict):  # VIA 1.x: {"0": region, "1": region}
            regions = [regions[k] for k in sorted(regions, key=lambda v: (len(v), v))]
        if not isinstance(regions, list):
            raise DatasetError(f"{where}: 'regions' is a {type(regions).__name__}; expected a list")
        entries.append((where, entry["filename"], regions))
    if class_key is None:  # the first attribute any region has
        class_key = next((k for _, _, regions in entries for r in regions
                          if isinstance(r, dict) and isinstance(r.get("region_attributes"), dict)
                          for k in r["region_attributes"]), None)
    writer = CocoWriter(classes)
    for where, filename, regions in entries:
        h, w = _image_size(images_dir / filename, where)
        image_id = writer.add_image(filename, h, w)
        for k, region in enumerate(regions):
            rwhere = f"{where} ({filename!r}): region {k}"
            shape = region.get("shape_attributes") if isinstance(region, dict) else None
            if not isinstance(shape, dict):
                raise DatasetError(f"{rwhere}: missing 'shape_attributes'")
            name = _via_class(region.get("region_attributes"), class_key, rwhere) or category
            kind = shape.get("name")
            if kind in ("polygon", "polyline"):
                xs, ys = shape.get("all_points_x", []), shape.get("all_points_y", [])
                if not isinstance(xs, list) or not isinstance(ys, list):
                    raise DatasetError(f"{rwhere}: 'all_points_x' and 'all_points_y' must be lists")
            elif kind == "rect":
                try:
                    x, y, rw, rh = (float(shape[k]) for k in ("x", "y", "width", "height"))
                except (KeyError, TypeError, ValueError):
                    raise DatasetError(f"{rwhere}: rect needs numbers 'x', 'y', 'width', 'height'") from None
                xs, ys = [x, x + rw, x + rw, x], [y, y, y + rh, y + rh]
            else:
                warnings.warn(f"{rwhere}: shape {kind!r} skipped (polygon and rect are converted)", stacklevel=2)
                continue
            writer.add_polygon(image_id, name, xs, ys, rwhere)
    return _write(writer.to_dict(f"converted from VIA {via_file.name}"), out_file)


# --------------------------------------------------------------------------- #
# labelme
# --------------------------------------------------------------------------- #
def labelme_to_coco(
    input_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    out_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """COCO dict from a folder of labelme JSON files (polygon, rectangle and circle shapes)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DatasetError(f"{input_dir}: directory not found")
    root = Path(images_dir) if images_dir is not None else input_dir
    files = sorted(input_dir.glob("*.json"))
    if not files:
        raise DatasetError(f"{input_dir}: no labelme .json files")
    writer = CocoWriter(classes)
    for path in files:
        doc = _read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("imagePath"), str) \
                or not isinstance(doc.get("shapes"), list):
            raise DatasetError(f"{path}: not a labelme file (expected 'imagePath' and a 'shapes' list)")
        image_path = (path.parent / doc["imagePath"].replace("\\", "/")).resolve()
        h, w = _image_size(image_path, f"{path}: imagePath")
        for key, actual in (("imageHeight", h), ("imageWidth", w)):
            if key in doc and doc[key] != actual:
                raise DatasetError(f"{path}: {key} is {doc[key]} but {image_path.name} is {w}x{h} (width x height)")
        try:
            file_name = image_path.relative_to(root.resolve()).as_posix()
        except ValueError:
            raise DatasetError(f"{path}: image {os.fspath(image_path)!r} is not inside the images folder "
                               f"{os.fspath(root)!r} (set --images to a folder holding every image)") from None
        image_id = writer.add_image(file_name, h, w)
        for k, shape in enumerate(doc["shapes"]):
            where = f"{path}: shape {k}"
            if not isinstance(shape, dict):
                raise DatasetError(f"{where}: not an object")
            points = shape.get("points")
            kind = shape.get("shape_type") or "polygon"
            if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
                raise DatasetError(f"{where}: 'points' must be a list of [x, y] pairs")
            where = f"{where} ({shape.get('label')!r}, {kind})"
            if kind == "rectangle":
                if len(points) != 2:
                    raise DatasetError(f"{where}: a rectangle needs 2 points, got {len(points)}")
                (xa, ya), (xb, yb) = points
                x0, x1, y0, y1 = min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb)
                points = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
            elif kind == "circle":
                if len(points) != 2:
                    raise DatasetError(f"{where}: a circle needs 2 points (centre, rim), got {len(points)}")
                (cx, cy), (px, py) = points
                r = math.hypot(px - cx, py - cy)
                n = max(12, int(2 * math.pi * r / 3))
                points = [[cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)]
                          for i in range(n)]
            elif kind != "polygon":
                warnings.warn(f"{where}: shape type {kind!r} skipped (polygon, rectangle and circle are converted)",
                              stacklevel=2)
                continue
            writer.add_polygon(image_id, shape.get("label"), [p[0] for p in points], [p[1] for p in points], where)
    return _write(writer.to_dict(f"converted from labelme files in {input_dir.name}"), out_file)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def _classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise DatasetError(f"--classes {text!r}: a class is named twice")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "masks":  # one converter, one set of options: from_masks owns them
        from .from_masks import main as masks_main

        masks_main(argv[1:], prog="python -m maskrcnn.data.convert masks")
        return 0
    p = argparse.ArgumentParser(prog="python -m maskrcnn.data.convert",
                                description="Convert instance annotations to a COCO instances JSON.")
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    sub.add_parser("masks", help="one binary mask per instance (see: convert masks --help)")
    lab = sub.add_parser("label-images", help="one label image per photo, pixel value k = instance k")
    lab.add_argument("--images", required=True, help="folder of photos")
    lab.add_argument("--labels", required=True, help="folder of label images <stem>.png or <stem><suffix>.png")
    lab.add_argument("--label-suffix", default="_mask", help="label image name suffix after the stem (default _mask)")
    lab.add_argument("--category", default="object", help="class of every instance (without --class-map)")
    lab.add_argument("--class-map", help='JSON {"<image stem>": {"<k>": "<class>"}} naming instances per image')
    via = sub.add_parser("via", help="VGG Image Annotator JSON export (polygon / rect regions)")
    via.add_argument("--ann", required=True, help="VIA JSON (annotations export or project file)")
    via.add_argument("--images", required=True, help="folder the entries' filenames are relative to")
    via.add_argument("--class-key", help="region attribute holding the class (default: the first one found)")
    via.add_argument("--category", default="object", help="class when regions have no attributes")
    lm = sub.add_parser("labelme", help="a folder of labelme JSON files")
    lm.add_argument("--input", required=True, help="folder of labelme .json files")
    lm.add_argument("--images", help="image root the output file names are relative to (default: --input)")
    for q in (lab, via, lm):
        q.add_argument("--classes", help="comma-separated class names, in id order; other labels are errors")
        q.add_argument("--out", required=True, help="output COCO JSON")
    a = p.parse_args(argv)
    try:
        classes = _classes(a.classes)
        if a.format == "label-images":
            class_map = None
            if a.class_map:
                class_map = _read_json(Path(a.class_map))
                if not isinstance(class_map, dict) or not all(isinstance(v, dict) for v in class_map.values()):
                    raise DatasetError(f"{a.class_map}: expected {{\"<image stem>\": {{\"<k>\": \"<class>\"}}}}")
            data = label_images_to_coco(a.images, a.labels, a.category, class_map, classes, a.label_suffix, a.out)
        elif a.format == "via":
            data = via_to_coco(a.ann, a.images, a.class_key, a.category, classes, a.out)
        else:
            data = labelme_to_coco(a.input, a.images, classes, a.out)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}: {len(data['images'])} images, {len(data['annotations'])} instances, "
          f"categories {[c['name'] for c in data['categories']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
