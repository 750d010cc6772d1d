"""COCO-format instance segmentation dataset with up-front validation.

Users bring their own data, and a malformed annotation file usually does not
crash training: it silently produces empty or wrong masks and an AP of 0.0.
So :func:`load_coco_json` checks the file record by record and raises a
:class:`DatasetError` whose message is ONE line naming the file, the record and
the problem, e.g.::

    instances_train.json: annotation id 17 (image 3): bbox [10, 5, -4, 8] has negative width

Checks that need pixels (image size on disk, masks that decode empty) happen
lazily in :meth:`CocoInstances.__getitem__` with the same kind of message.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

__all__ = [
    "DatasetError",
    "CocoInstances",
    "load_coco_json",
    "validate_coco",
    "decode_segmentation",
    "read_image",
    "check_dataset",
]

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]

_REQUIRED_KEYS = ("images", "annotations", "categories")


class DatasetError(ValueError):
    """A problem with a dataset, described in a single line naming file and record."""

    def __init__(self, message: str) -> None:
        # Keep it one line even if a user-provided value contains newlines.
        super().__init__(" ".join(message.split("\n")))


def _short(value: Any, limit: int = 80) -> str:
    """Compact JSON-ish rendering of a value for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _check_segmentation(segm: Any, height: int, width: int) -> str | None:
    """Return a description of what is wrong with ``segm``, or None if it is valid."""
    if isinstance(segm, list):
        if not segm:
            return "segmentation is an empty list"
        if all(_is_number(v) for v in segm[:8]):
            return ("segmentation is a flat list of numbers; expected a list of polygons "
                    "[[x1, y1, x2, y2, ...], ...]")
        for k, poly in enumerate(segm):
            if not isinstance(poly, list):
                return f"segmentation polygon {k} is a {type(poly).__name__}, expected a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return (f"segmentation polygon {k} has {len(poly)} coordinates; a polygon needs "
                        "an even number >= 6 (x, y pairs of at least 3 points)")
            try:
                # sum() runs in C: much faster than a per-coordinate check on big files.
                ok = math.isfinite(sum(poly))
            except TypeError:
                ok = False
            if not ok:
                return f"segmentation polygon {k} contains non-numeric or non-finite values: {_short(poly)}"
        return None
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return f"RLE segmentation needs 'counts' and 'size', got keys {sorted(segm)}"
        size = segm["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"RLE 'size' must be [height, width], got {_short(size)}"
        if size != [height, width]:
            return (f"RLE size {_short(size)} (height, width) disagrees with the image's "
                    f"height={height}, width={width}")
        counts = segm["counts"]
        if isinstance(counts, list):
            try:
                total = sum(counts)
            except TypeError:
                return "uncompressed RLE 'counts' must be a list of integers"
            if total != height * width:
                return (f"uncompressed RLE counts sum to {total} but the image has "
                        f"{height}x{width}={height * width} pixels")
        elif not isinstance(counts, (str, bytes)):
            return f"RLE 'counts' must be a string (compressed) or a list of integers, got {type(counts).__name__}"
        return None
    return (f"segmentation is a {type(segm).__name__}; expected a list of polygons "
            "or an RLE dict {'size': [h, w], 'counts': ...}")


def validate_coco(data: Any, source: str) -> None:
    """Raise :class:`DatasetError` on the first problem found in a loaded COCO dict."""

    def fail(where: str, problem: str) -> None:
        raise DatasetError(f"{source}: {where}: {problem}")

    if not isinstance(data, dict):
        raise DatasetError(
            f"{source}: top level is a {type(data).__name__}; expected an object with keys "
            "'images', 'annotations' and 'categories'"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(f"{source}: missing top-level key(s) {', '.join(map(repr, missing))}")
    for key in _REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DatasetError(f"{source}: top-level '{key}' is a {type(data[key]).__name__}, expected a list")

    # Categories.
    cat_ids: set[int] = set()
    cat_names: set[str] = set()
    for k, cat in enumerate(data["categories"]):
        where = f"categories[{k}]"
        if not isinstance(cat, dict):
            fail(where, "not an object")
        if not _is_int(cat.get("id")):
            fail(where, f"'id' must be an integer, got {_short(cat.get('id'))}")
        where = f"category id {cat['id']}"
        if not isinstance(cat.get("name"), str):
            fail(where, f"'name' must be a string, got {_short(cat.get('name'))}")
        if cat["id"] in cat_ids:
            fail(where, "duplicate category id")
        if cat["name"] in cat_names:
            fail(where, f"duplicate category name {cat['name']!r}")
        cat_ids.add(cat["id"])
        cat_names.add(cat["name"])

    # Images.
    sizes: dict[int, tuple[int, int]] = {}
    for k, img in enumerate(data["images"]):
        where = f"images[{k}]"
        if not isinstance(img, dict):
            fail(where, "not an object")
        if not _is_int(img.get("id")):
            fail(where, f"'id' must be an integer, got {_short(img.get('id'))}")
        where = f"image id {img['id']}"
        if img["id"] in sizes:
            fail(where, "duplicate image id")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            fail(where, f"'file_name' must be a non-empty string, got {_short(img.get('file_name'))}")
        where = f"image id {img['id']} ({img['file_name']!r})"
        for key in ("height", "width"):
            if key not in img:
                fail(where, f"missing '{key}' (needed to decode masks)")
            if not _is_int(img[key]) or img[key] <= 0:
                fail(where, f"'{key}' must be a positive integer, got {_short(img[key])}")
        sizes[img["id"]] = (img["height"], img["width"])

    # Annotations.
    ann_ids: set[int] = set()
    valid_cats = ", ".join(str(c) for c in sorted(cat_ids))
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        if not isinstance(ann, dict):
            fail(where, "not an object")
        if not _is_int(ann.get("id")):
            fail(where, f"'id' must be an integer, got {_short(ann.get('id'))}")
        aid = ann["id"]
        where = f"annotation id {aid}"
        if aid in ann_ids:
            fail(where, "duplicate annotation id")
        ann_ids.add(aid)
        image_id = ann.get("image_id")
        if not _is_int(image_id) or image_id not in sizes:
            fail(where, f"image_id {_short(image_id)} not found in 'images'")
        where = f"annotation id {aid} (image {image_id})"
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            fail(where, f"category_id {_short(ann.get('category_id'))} not found in 'categories' "
                        f"(valid ids: {valid_cats})")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, float):
            fail(where, f"'iscrowd' must be 0 or 1, got {_short(iscrowd)}")
        bbox = ann.get("bbox")
        if bbox is None:
            fail(where, "missing 'bbox' ([x, y, width, height] in pixels)")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            fail(where, f"bbox {_short(bbox)} is not 4 finite numbers [x, y, width, height]")
        if bbox[2] < 0:
            fail(where, f"bbox {_short(bbox)} has negative width")
        if bbox[3] < 0:
            fail(where, f"bbox {_short(bbox)} has negative height")
        if "segmentation" not in ann:
            fail(where, "missing 'segmentation' (instance masks are required)")
        height, width = sizes[image_id]
        problem = _check_segmentation(ann["segmentation"], height, width)
        if problem is not None:
            fail(where, problem)
        if "area" in ann and not _is_number(ann["area"]):
            fail(where, f"'area' must be a number, got {_short(ann['area'])}")


def load_coco_json(ann_file: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a COCO instances file; fill optional fields pycocotools needs.

    Missing ``iscrowd`` defaults to 0 and missing ``area`` is computed from the
    segmentation (COCOeval crashes without them); the file itself is not changed.
    """
    source = os.fspath(ann_file)
    path = Path(ann_file)
    if not path.is_file():
        raise DatasetError(f"{source}: annotation file not found")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{source}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{source}: not valid JSON (not UTF-8 text: {e.reason})") from None
    validate_coco(data, source)
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            h, w = sizes[ann["image_id"]]
            ann["area"] = float(mask_utils.area(_to_rle(ann["segmentation"], h, w)))
    return data


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #
def _to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segm, list):  # polygons: one RLE per part, merged
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm  # compressed RLE (str or bytes counts)


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list / uncompressed RLE / compressed RLE to a uint8 HxW 0/1 mask."""
    rle = _to_rle(segm, height, width)
    # pycocotools' decode emits a harmless NumPy 2 DeprecationWarning (its
    # __array__ lacks copy=) on every call, which would flood training logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as uint8 RGB HxWx3 (grayscale, RGBA and 16-bit handled), or raise DatasetError.

    Pixels are read as stored, without applying EXIF orientation, which is the
    frame COCO's ``width``/``height`` and annotations refer to.
    """
    # imdecode(fromfile) instead of imread: works with non-ASCII paths everywhere.
    try:
        buf = np.fromfile(os.fspath(path), dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{os.fspath(path)}: cannot read image ({e.strerror})") from None
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise DatasetError(f"{os.fspath(path)}: cannot decode image (corrupt or unsupported format)")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DatasetError(f"{os.fspath(path)}: unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 2:  # grey + alpha
        img = img[:, :, 0]
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)  # alpha dropped
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _clipped_xyxy(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #
class CocoInstances(torch.utils.data.Dataset):
    """COCO instance segmentation dataset returning ``(image, target)``.

    ``image`` is float32 ``[3, H, W]`` RGB in 0..1.  ``target`` has

    * ``boxes``: float32 ``[N, 4]`` xyxy pixels (COCO ``bbox`` clipped to the image);
    * ``labels``: int64 ``[N]`` contiguous ids ``1..K`` (0 is background);
    * ``masks``: uint8 ``[N, H, W]`` with values 0/1;
    * ``crowd_boxes``: float32 ``[M, 4]`` boxes of ``iscrowd=1`` regions
      (not training targets, exposed e.g. to ignore proposals inside them);
    * ``image_id``: the COCO image id (int); ``orig_size``: ``(H, W)``.

    Contiguous labels follow the order of the sorted COCO ids of the kept
    categories, so ids like 1, 7, 90 become 1, 2, 3.

    Args:
        image_dir: folder that image ``file_name`` entries are relative to.
        ann_file: COCO instances JSON.
        categories: keep only these category names (None: all).
        remove_images_without_annotations: drop images with no usable
            (kept-category, non-crowd, non-degenerate) instance; use True for
            training and False for evaluation.
        transforms: callable ``(image, target) -> (image, target)``.
        min_box_size: instances whose clipped box is narrower or shorter than
            this (pixels) are removed.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        categories: list[str] | None = None,
        remove_images_without_annotations: bool = True,
        transforms: Transform | None = None,
        min_box_size: float = 1.0,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.min_box_size = float(min_box_size)
        self._source = os.fspath(ann_file)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{os.fspath(image_dir)}: image directory not found (for {self._source})")

        data = load_coco_json(ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        all_cats = sorted(data["categories"], key=lambda c: c["id"])
        if categories is not None:
            by_name = {c["name"]: c["id"] for c in all_cats}
            unknown = [n for n in categories if n not in by_name]
            if unknown:
                raise DatasetError(
                    f"{self._source}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                    f"{', '.join(map(repr, unknown))}; valid names: {', '.join(c['name'] for c in all_cats)}"
                )
            wanted = {by_name[n] for n in categories}
            all_cats = [c for c in all_cats if c["id"] in wanted]
        if not all_cats:
            raise DatasetError(f"{self._source}: no categories to train on")

        self.cat_ids: list[int] = [c["id"] for c in all_cats]
        self.cat_id_to_contiguous: dict[int, int] = {cid: k + 1 for k, cid in enumerate(self.cat_ids)}
        self.contiguous_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_contiguous.items()}
        self.class_names: list[str] = ["__background__"] + [c["name"] for c in all_cats]
        self.num_classes: int = len(all_cats)

        image_ids = sorted(self.coco.imgs)
        if remove_images_without_annotations:
            image_ids = [i for i in image_ids if any(self._is_target(a) for a in self.coco.imgToAnns.get(i, ()))]
            kept_anns = [a for a in data["annotations"] if a["category_id"] in self.cat_id_to_contiguous
                         and not a.get("iscrowd", 0)]
            if not image_ids and kept_anns:
                # Every box is degenerate: a unit mistake (normalised coordinates), not an empty dataset.
                raise DatasetError(
                    f"{self._source}: all {len(kept_anns)} annotations have boxes smaller than "
                    f"min_box_size={self.min_box_size} px (e.g. annotation id {kept_anns[0]['id']} bbox "
                    f"{_short(kept_anns[0]['bbox'])}); are coordinates normalised to 0..1 instead of pixels?"
                )
        self.image_ids: list[int] = image_ids

    # ------------------------------------------------------------------ #
    def _is_target(self, ann: dict[str, Any]) -> bool:
        """Whether an annotation becomes a training instance (kept class, not crowd, box big enough)."""
        if ann["category_id"] not in self.cat_id_to_contiguous or ann.get("iscrowd", 0):
            return False
        info = self.coco.imgs[ann["image_id"]]
        x0, y0, x1, y1 = _clipped_xyxy(ann["bbox"], info["width"], info["height"])
        return x1 - x0 >= self.min_box_size and y1 - y0 >= self.min_box_size

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict[str, Any]:
        """The COCO image record of item ``index``."""
        return self.coco.imgs[self.image_ids[index]]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.image_info(index)["file_name"]

    def _fail(self, where: str, problem: str) -> DatasetError:
        return DatasetError(f"{self._source}: {where}: {problem}")

    def _load_image(self, info: dict[str, Any]) -> np.ndarray:
        path = self.image_dir / info["file_name"]
        where = f"image id {info['id']}"
        if not path.is_file():
            raise self._fail(where, f"image file {os.fspath(path)!r} not found")
        try:
            image = read_image(path)
        except DatasetError as e:
            raise self._fail(where, str(e)) from None
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise self._fail(
                f"{where} ({info['file_name']!r})",
                f"image on disk is {w}x{h} (width x height) but the JSON says "
                f"width={info['width']}, height={info['height']}",
            )
        return image

    def _check_mask(self, ann: dict[str, Any], mask: np.ndarray, box: Sequence[float]) -> bool:
        """Catch masks that cannot belong to their box (almost always a format error).

        Returns False for a legitimately empty mask (a polygon sliver thinner
        than a pixel, inside its box): the instance is then skipped.
        """
        h, w = mask.shape
        where = f"annotation id {ann['id']} (image {ann['image_id']})"
        n = int(np.count_nonzero(mask))
        x0, y0, x1, y1 = box
        if n == 0:
            segm = ann["segmentation"]
            if isinstance(segm, list):
                xs = [v for poly in segm for v in poly[0::2]]
                ys = [v for poly in segm for v in poly[1::2]]
                if x0 - 1 <= min(xs) and max(xs) <= x1 + 1 and y0 - 1 <= min(ys) and max(ys) <= y1 + 1:
                    return False  # sub-pixel sliver: nothing to learn from, not an error
            raise self._fail(where, f"segmentation decodes to an empty mask although bbox {_short(ann['bbox'])} "
                                    "is not empty (coordinates normalised to 0..1 instead of pixels?)")
        if n == h * w and (x1 - x0) * (y1 - y0) < 0.9 * h * w:
            raise self._fail(where, f"segmentation decodes to a mask covering the whole image but bbox is "
                                    f"{_short(ann['bbox'])} (inverted mask or wrong RLE encoding?)")
        # Generous margin: COCO boxes come from polygons and may differ by a pixel or two.
        mx, my = 2 + 0.1 * (x1 - x0), 2 + 0.1 * (y1 - y0)
        ix0, iy0 = max(int(x0 - mx), 0), max(int(y0 - my), 0)
        ix1, iy1 = int(math.ceil(x1 + mx)), int(math.ceil(y1 + my))
        inside = int(np.count_nonzero(mask[iy0:iy1, ix0:ix1]))
        if inside < 0.5 * n:
            raise self._fail(where, f"only {inside} of the {n} mask pixels lie inside bbox {_short(ann['bbox'])} "
                                    "(x/y swapped, or bbox not [x, y, width, height]?)")
        return True

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)
        h, w = image.shape[:2]

        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        masks: list[np.ndarray] = []
        crowd_boxes: list[tuple[float, float, float, float]] = []
        for ann in self.coco.imgToAnns.get(image_id, ()):
            if ann["category_id"] not in self.cat_id_to_contiguous:
                continue
            box = _clipped_xyxy(ann["bbox"], w, h)
            if box[2] - box[0] < self.min_box_size or box[3] - box[1] < self.min_box_size:
                continue  # degenerate (or entirely outside the image)
            if ann.get("iscrowd", 0):
                crowd_boxes.append(box)
                continue
            mask = decode_segmentation(ann["segmentation"], h, w)
            if not self._check_mask(ann, mask, box):
                continue
            boxes.append(box)
            labels.append(self.cat_id_to_contiguous[ann["category_id"]])
            masks.append(mask)

        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)),
            "crowd_boxes": torch.tensor(crowd_boxes, dtype=torch.float32).reshape(-1, 4),
            "image_id": int(image_id),
            "orig_size": (h, w),
        }
        # HWC uint8 -> contiguous CHW float 0..1.  Done in numpy: small torch ops
        # in the main process pay thread-pool overhead (10x slower under load).
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        chw /= 255.0
        tensor = torch.from_numpy(chw)
        if self.transforms is not None:
            tensor, target = self.transforms(tensor, target)
        return tensor, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.num_classes} classes "
                f"{self.class_names[1:]}, ann_file={self._source!r})")


def check_dataset(dataset: CocoInstances, max_errors: int = 20) -> list[str]:
    """Load every item once and collect the per-image errors (slow: decodes all images and masks).

    Construction already validated the JSON; this finds the lazily-detected
    problems (missing files, size mismatches, masks that decode empty).
    """
    errors: list[str] = []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except DatasetError as e:
            errors.append(str(e))
            if len(errors) >= max_errors:
                break
    return errors
