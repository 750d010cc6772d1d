"""The rules a COCO-format instance segmentation dataset must follow, all in one place.

Users bring their own data, and a malformed annotation file usually does not
crash training: it silently produces empty or wrong masks and an AP of 0.0.
So every record is checked, and each finding is a :class:`Problem` whose
message is ONE line naming the file, the record and the problem, e.g.::

    instances_train.json: annotation id 17 (image 3): bbox [10, 5, -4, 8] has negative width

The dataset (:mod:`maskrcnn.data.coco`) raises a :class:`DatasetError` on the
first error; the checker (``python -m maskrcnn.data.check``) collects them all.
Both apply these functions, so the check reports exactly what training would
stop on. One function per kind of record:

    structure_problems      the file's top level                   -> Problems
    category_problems       a category record                      -> Problems
    image_problems          an image record                        -> Problems, its (height, width)
    annotation_problems     an annotation record: ids, category, iscrowd, bbox (bbox_problem),
                            segmentation polygons / RLE (segmentation_problem), area, and what
                            training repairs in its box (box_warning) -> Problems, its image id if it trains
    scan_coco               a whole loaded file: all of the above   -> CocoScan
    trains_as_instance, training_box, instance_box
                            which annotations train, with which box (degenerate boxes are dropped)
    all_degenerate_problem  every box too small (a unit mistake)   -> Problem or None
    check_image_file        an image file against its record       -> pixels, Problem
    decode_instance         a segmentation decoded to a mask       -> mask, Problem
    mask_problem            a mask against its box                 -> Problem (a warning means: skip it)

An error is something training stops on; a warning is something it repairs
silently (drops or clips), counted by the checker so nothing is lost unseen.
What the rules read (the JSON file, an image as displayed, a segmentation as a
mask) is read here too: :func:`read_coco_json`, :func:`read_image`,
:func:`decode_segmentation`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Mapping, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .exif import apply_orientation, exif_orientation

_REQUIRED_KEYS = ("images", "annotations", "categories")
ERROR = "error"
WARNING = "warning"
Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------- #
# Problems: what a rule finds
# --------------------------------------------------------------------------- #
class DatasetError(ValueError):
    """A problem with a dataset, described in a single line naming file and record."""

    def __init__(self, message: str) -> None:
        # Keep it one line even if a user-provided value contains newlines.
        super().__init__(" ".join(message.split("\n")))


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` is a stable slug, ``message`` one line naming file, record and problem."""

    kind: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        return self.message


class Problems:
    """`errors` and `warnings` of a `problems` list (a mixin of the scan and of the checker's report)."""

    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]


@dataclass
class CocoScan(Problems):
    """What :func:`scan_coco` found, plus what the pixel checks need.

    ``images`` holds the well-formed image records by id (the first of a repeated id), ``sizes`` their
    ``(height, width)``; ``bad_annotations`` the indices (in ``data["annotations"]``) of records with an error.
    """

    problems: list[Problem] = field(default_factory=list)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    images: dict[int, dict[str, Any]] = field(default_factory=dict)
    bad_annotations: set[int] = field(default_factory=set)


def _problem(kind: str, source: str, where: str, text: str, severity: str = ERROR) -> Problem:
    return Problem(kind, f"{source}: {where}: {text}", severity)


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #
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


def _finite_numbers(values: list[Any]) -> bool:
    """All ints/floats (no bools, strings, None) and finite: one C-level sum instead of a per-value check."""
    try:
        total = sum(values)
    except TypeError:
        return False
    return math.isfinite(total) and {type(v) for v in values} <= {int, float}


# --------------------------------------------------------------------------- #
# Reading: the JSON file, an image as displayed, a segmentation as a mask
# --------------------------------------------------------------------------- #
def read_coco_json(ann_file: str | os.PathLike[str]) -> Any:
    """Parse a JSON file, or raise :class:`DatasetError` (not found, not JSON); nothing is validated."""
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
    return data


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


def segmentation_area(segm: Any, height: int, width: int) -> float:
    """The pixel area of a COCO segmentation: what a record without ``area`` gets (COCOeval needs it)."""
    return float(mask_utils.area(_to_rle(segm, height, width)))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as uint8 RGB HxWx3 as displayed (EXIF orientation applied), or raise DatasetError.

    Grayscale, RGBA and 16-bit files are handled.  Annotation tools (VIA, labelme) and detectron2 work on the
    image as displayed, so a photo stored sideways with an EXIF Orientation tag is turned here, and COCO's
    ``width``/``height`` refer to the turned image.
    """
    return _read_image(path)[0]


def _read_image(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """:func:`read_image` and the file's EXIF orientation (1: none)."""
    # imdecode(fromfile) instead of imread: works with non-ASCII paths everywhere.
    try:
        buf = np.fromfile(os.fspath(path), dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{os.fspath(path)}: cannot read image ({e.strerror})") from None
    # IMREAD_UNCHANGED (-1) includes IMREAD_IGNORE_ORIENTATION: pixels come as stored (TIFF aside, see
    # exif.py), and the orientation is applied below by one rule for every OpenCV build.
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
        rgb = cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)  # alpha dropped
    else:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    orientation = exif_orientation(buf)
    return apply_orientation(rgb, orientation), orientation


# --------------------------------------------------------------------------- #
# Records: the file's top level, categories, images
# --------------------------------------------------------------------------- #
def structure_problems(data: Any, source: str) -> list[Problem]:
    """The rules for the file's top level: an object whose 'images', 'annotations' and 'categories' are lists."""
    if not isinstance(data, dict):
        return [Problem("json-structure", f"{source}: top level is a {type(data).__name__}; expected an object "
                                          "with keys 'images', 'annotations' and 'categories'")]
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        return [Problem("json-structure", f"{source}: missing top-level key(s) {', '.join(map(repr, missing))}")]
    return [Problem("json-structure", f"{source}: top-level '{key}' is a {type(data[key]).__name__}, expected a list")
            for key in _REQUIRED_KEYS if not isinstance(data[key], list)]


def _record_id(section: str, k: int, record: Any, kind: str, source: str) -> tuple[int | None, Problem | None]:
    """The id of record ``k`` of ``section`` (every kind of record has one), or why it has none."""
    if not isinstance(record, dict):
        return None, _problem(kind, source, f"{section}[{k}]", "not an object")
    rid = record.get("id")
    if not _is_int(rid):
        return None, _problem(kind, source, f"{section}[{k}]", f"'id' must be an integer, got {_short(rid)}")
    return rid, None


def category_problems(k: int, cat: Any, ids: set[int], names: set[str], source: str) -> list[Problem]:
    """The rules for category record ``k``; ``ids`` and ``names`` are those of the records before it (this
    record's are added to them)."""
    cid, problem = _record_id("categories", k, cat, "category-malformed", source)
    if problem is not None:
        return [problem]
    problems = []
    where = f"category id {cid}"
    name = cat.get("name")
    if not isinstance(name, str):
        problems.append(_problem("category-malformed", source, where, f"'name' must be a string, got {_short(name)}"))
    if cid in ids:
        problems.append(_problem("duplicate-category-id", source, where, "duplicate category id"))
    elif isinstance(name, str) and name in names:
        problems.append(_problem("duplicate-category-name", source, where, f"duplicate category name {name!r}"))
    ids.add(cid)
    if isinstance(name, str):
        names.add(name)
    return problems


def image_problems(k: int, img: Any, ids: set[int], file_names: dict[str, int],
                   source: str) -> tuple[list[Problem], tuple[int, int] | None]:
    """The rules for image record ``k``: its problems, and its ``(height, width)`` when it is well-formed.

    ``ids`` and ``file_names`` (name -> image id) are those of the records before it (this record's are added).
    """
    iid, problem = _record_id("images", k, img, "image-record-malformed", source)
    if problem is not None:
        return [problem], None
    where = f"image id {iid}"
    if iid in ids:
        return [_problem("duplicate-image-id", source, where, "duplicate image id")], None
    ids.add(iid)
    file_name = img.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        return [_problem("image-record-malformed", source, where,
                         f"'file_name' must be a non-empty string, got {_short(file_name)}")], None
    where = f"image id {iid} ({file_name!r})"
    problems = []
    for key in ("height", "width"):
        if key not in img:
            problems.append(_problem("image-record-malformed", source, where,
                                     f"missing '{key}' (needed to decode masks)"))
        elif not _is_int(img[key]) or img[key] <= 0:
            problems.append(_problem("image-record-malformed", source, where,
                                     f"'{key}' must be a positive integer, got {_short(img[key])}"))
    size = None if problems else (img["height"], img["width"])
    if file_name in file_names:
        problems.append(_problem("duplicate-file-name", source, where, f"same file as image id {file_names[file_name]}",
                                 WARNING))
    else:
        file_names[file_name] = iid
    return problems, size


# --------------------------------------------------------------------------- #
# Annotation records: segmentation, bbox, the box training uses, the whole record
# --------------------------------------------------------------------------- #
def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """The rule for an annotation's ``segmentation`` on a ``height`` x ``width`` image: what is wrong, or None."""
    if isinstance(segm, list):
        return _polygons_problem(segm)
    if isinstance(segm, dict):
        return _rle_problem(segm, height, width)
    return (f"segmentation is a {type(segm).__name__}; expected a list of polygons "
            "or an RLE dict {'size': [h, w], 'counts': ...}")


def _polygons_problem(segm: list[Any]) -> str | None:
    if not segm:
        return "segmentation is an empty list"
    if _is_number(segm[0]):
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


def _rle_problem(segm: dict[str, Any], height: int, width: int) -> str | None:
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


def bbox_problem(bbox: Any) -> tuple[str, str] | None:
    """The rule for an annotation's ``bbox`` (``[x, y, width, height]``): ``(kind, what is wrong)``, or None."""
    if bbox is None:
        return "bbox-malformed", "missing 'bbox' ([x, y, width, height] in pixels)"
    if not (type(bbox) is list and len(bbox) == 4 and _finite_numbers(bbox)):
        return "bbox-malformed", f"bbox {_short(bbox)} is not 4 finite numbers [x, y, width, height]"
    if bbox[2] < 0:
        return "bbox-negative-size", f"bbox {_short(bbox)} has negative width"
    if bbox[3] < 0:
        return "bbox-negative-size", f"bbox {_short(bbox)} has negative height"
    return None


def instance_box(bbox: Sequence[float], width: int, height: int, min_box_size: float) -> Box | None:
    """The rule for a usable box: COCO ``bbox`` clipped to the image, or None when it is degenerate.

    Degenerate boxes (narrower or shorter than ``min_box_size`` after clipping,
    e.g. entirely outside the image) are dropped from training, not errors.
    """
    x0, y0, x1, y1 = _clipped_xyxy(bbox, width, height)
    if x1 - x0 < min_box_size or y1 - y0 < min_box_size:
        return None
    return x0, y0, x1, y1


def _clipped_xyxy(bbox: Sequence[float], width: int, height: int) -> Box:
    x, y, w, h = bbox
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


def trains_as_instance(ann: dict[str, Any], cat_ids: Container[int] | None = None) -> bool:
    """Whether a valid annotation is an instance to train on: not a crowd region and (with ``cat_ids``) of a
    category trained on.  Crowd regions train as background, as in detectron2, whose mapper drops them too
    (COCO evaluation reads iscrowd from the JSON itself)."""
    return not ann.get("iscrowd", 0) and (cat_ids is None or ann["category_id"] in cat_ids)


def training_box(ann: dict[str, Any], width: int, height: int, min_box_size: float,
                 cat_ids: Container[int] | None = None) -> Box | None:
    """The box a valid annotation trains with (:func:`instance_box`), or None when training leaves it out."""
    if not trains_as_instance(ann, cat_ids):
        return None
    return instance_box(ann["bbox"], width, height, min_box_size)


def box_warning(bbox: Sequence[float], width: int, height: int, min_box_size: float) -> tuple[str, str] | None:
    """What training repairs in a valid box without telling: ``(kind, what)`` of a box dropped as degenerate
    (``"degenerate-box"``) or clipped to the image (``"bbox-clipped"``), or None."""
    x, y, w, h = bbox
    if instance_box(bbox, width, height, min_box_size) is None:
        inside = x < width and y < height and x + w > 0 and y + h > 0
        return "degenerate-box", (
            f"bbox {_short(bbox)} is smaller than min_box_size={min_box_size} px after clipping to the "
            f"{width}x{height} image (dropped from training)" if inside else
            f"bbox {_short(bbox)} lies outside the {width}x{height} image (dropped from training)")
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        return "bbox-clipped", f"bbox {_short(bbox)} extends outside the {width}x{height} image (clipped to it)"
    return None


@dataclass(frozen=True)
class _AnnContext:
    source: str
    image_ids: set[int]
    sizes: dict[int, tuple[int, int]]
    cat_ids: set[int]
    valid_cats: str
    min_box_size: float


def annotation_problems(k: int, ann: Any, duplicate: bool,
                        ctx: _AnnContext) -> tuple[list[Problem], int | None]:
    """The rules for annotation record ``k`` (``duplicate``: a record before it has its id): its problems, and
    its image id if it is a training instance.

    A record's later checks are skipped once they cannot mean anything.
    """
    aid, problem = _record_id("annotations", k, ann, "annotation-malformed", ctx.source)
    if problem is not None:
        return [problem], None
    problems: list[Problem] = []

    def add(kind: str, where: str, text: str, severity: str = ERROR) -> None:
        problems.append(_problem(kind, ctx.source, where, text, severity))

    if duplicate:
        add("duplicate-annotation-id", f"annotation id {aid}", "duplicate annotation id")
    image_id = ann.get("image_id")
    if not _is_int(image_id) or image_id not in ctx.image_ids:
        add("unknown-image-id", f"annotation id {aid}", f"image_id {_short(image_id)} not found in 'images'")
    where = f"annotation id {aid} (image {image_id})"
    category_id = ann.get("category_id")
    if not _is_int(category_id) or category_id not in ctx.cat_ids:
        add("unknown-category-id", where, f"category_id {_short(category_id)} not found in 'categories' "
                                          f"(valid ids: {ctx.valid_cats})")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or type(iscrowd) not in (int, bool):
        add("annotation-malformed", where, f"'iscrowd' must be 0 or 1, got {_short(iscrowd)}")
    bbox = ann.get("bbox")
    bbox_wrong = bbox_problem(bbox)
    if bbox_wrong is not None:
        add(bbox_wrong[0], where, bbox_wrong[1])
    size = ctx.sizes.get(image_id) if _is_int(image_id) else None
    if "segmentation" not in ann:
        add("segmentation-malformed", where, "missing 'segmentation' (instance masks are required)")
    elif size is not None and (segm_wrong := segmentation_problem(ann["segmentation"], *size)) is not None:
        add("segmentation-malformed", where, segm_wrong)
    if "area" in ann and not _is_number(ann["area"]):
        add("annotation-malformed", where, f"'area' must be a number, got {_short(ann['area'])}")
    if problems or bbox_wrong is not None or size is None or iscrowd:
        return problems, None
    warning = box_warning(bbox, size[1], size[0], ctx.min_box_size)  # what training repairs without telling
    if warning is None:
        return problems, image_id
    add(warning[0], where, warning[1], WARNING)
    return problems, None if warning[0] == "degenerate-box" else image_id


# --------------------------------------------------------------------------- #
# The whole file
# --------------------------------------------------------------------------- #
def _screen_annotations(anns: list[Any], ctx: _AnnContext) -> tuple[list[tuple[int, bool]], set[int]] | None:
    """Vectorised pre-pass: ``([(index, duplicate id)] of records that may break a rule, image ids with
    a clean training instance)``, or None when value types are too mixed to screen.

    It flags a superset of what :func:`annotation_problems` reports (errors and
    warnings), so screened and unscreened scans agree; ~5x faster on COCO-sized files.
    """
    n = len(anns)
    if n == 0:
        return [], set()
    if set(map(type, anns)) != {dict}:
        return None
    ids = [a.get("id") for a in anns]
    image_ids = [a.get("image_id") for a in anns]
    cat_ids = [a.get("category_id") for a in anns]
    crowd = [a.get("iscrowd", 0) for a in anns]
    bboxes = [a.get("bbox") for a in anns]
    areas = [a.get("area", 0) for a in anns]
    if not (set(map(type, ids)) == set(map(type, image_ids)) == set(map(type, cat_ids)) == {int}
            and set(map(type, crowd)) <= {int, bool} and set(map(type, areas)) <= {int, float}
            and set(map(type, bboxes)) == {list} and set(map(len, bboxes)) == {4}
            and set(map(type, itertools.chain.from_iterable(bboxes))) <= {int, float}):
        return None
    id_arr = np.fromiter(ids, np.int64, n)
    iid = np.fromiter(image_ids, np.int64, n)
    box = np.fromiter(itertools.chain.from_iterable(bboxes), np.float64, 4 * n).reshape(n, 4)
    crowd_arr = np.fromiter(crowd, np.int64, n)

    duplicate = np.ones(n, bool)
    duplicate[np.unique(id_arr, return_index=True)[1]] = False  # first occurrence is not a duplicate
    # Image size per record by a sorted lookup (0 x 0 for an unknown image: flagged below anyway).
    sized = np.array(sorted(ctx.sizes), np.int64)
    sized_hw = np.array([ctx.sizes[i] for i in sized.tolist()], np.float64).reshape(-1, 2)
    pos = np.clip(np.searchsorted(sized, iid), 0, max(len(sized) - 1, 0))
    known = (sized[pos] == iid) if len(sized) else np.zeros(n, bool)
    hw = np.zeros((n, 2))
    hw[known] = sized_hw[pos[known]]
    # The segmentation rule itself is as fast as any screen of it (one C-level sum per polygon).
    segm_bad = np.fromiter((k and segmentation_problem(a.get("segmentation"), *ctx.sizes[i]) is not None
                            for a, i, k in zip(anns, image_ids, known.tolist())), bool, n)
    with np.errstate(invalid="ignore", over="ignore"):
        x0, y0 = box[:, 0], box[:, 1]
        x1, y1 = x0 + box[:, 2], y0 + box[:, 3]
        h, w = hw[:, 0], hw[:, 1]
        cw = np.clip(x1, 0, w) - np.clip(x0, 0, w)
        ch = np.clip(y1, 0, h) - np.clip(y0, 0, h)
        suspect = (duplicate | ~known | ~np.isin(np.fromiter(cat_ids, np.int64, n), list(ctx.cat_ids))
                   | ((crowd_arr != 0) & (crowd_arr != 1)) | ~np.isfinite(box).all(1)
                   | (box[:, 2] < 0) | (box[:, 3] < 0) | segm_bad
                   | ~np.isfinite(np.fromiter(areas, np.float64, n)))
        warn = ((crowd_arr == 0) & ((cw < ctx.min_box_size) | (ch < ctx.min_box_size)
                                     | (x0 < -1) | (y0 < -1) | (x1 > w + 1) | (y1 > h + 1)))
    flagged = np.flatnonzero(suspect | warn)
    clean = ~suspect & ~warn & (crowd_arr == 0)
    return [(int(k), bool(duplicate[k])) for k in flagged], set(np.unique(iid[clean]).tolist())


def scan_coco(data: Any, source: str, min_box_size: float = 1.0, _slow: bool = False) -> CocoScan:
    """Check a loaded COCO dict record by record and return every problem found.

    Errors are what training stops on (:func:`maskrcnn.data.coco.validate_coco` raises the first one);
    warnings are what training repairs silently: boxes dropped as degenerate (``min_box_size``)
    or clipped to the image, images left without a usable instance, repeated file names.
    ``_slow`` skips the vectorised screen (tests check both paths agree).
    """
    scan = CocoScan(structure_problems(data, source))
    if scan.problems:
        return scan
    cat_ids: set[int] = set()
    cat_names: set[str] = set()
    for k, cat in enumerate(data["categories"]):
        scan.problems.extend(category_problems(k, cat, cat_ids, cat_names, source))
    image_ids: set[int] = set()
    file_names: dict[str, int] = {}
    for k, img in enumerate(data["images"]):
        found, size = image_problems(k, img, image_ids, file_names, source)
        scan.problems.extend(found)
        if size is not None:
            scan.sizes[img["id"]] = size
            scan.images[img["id"]] = img
    ctx = _AnnContext(source, image_ids, scan.sizes, cat_ids, ", ".join(str(c) for c in sorted(cat_ids)),
                      min_box_size)
    with_instances = _scan_annotations(data["annotations"], ctx, scan, _slow)
    for img in data["images"]:
        if isinstance(img, dict) and _is_int(img.get("id")) and img["id"] in scan.sizes \
                and img["id"] not in with_instances:
            scan.problems.append(_problem("image-without-instances", source,
                                          f"image id {img['id']} ({img['file_name']!r})",
                                          "no usable instance (dropped from training, kept for evaluation)", WARNING))
    return scan


def _scan_annotations(anns: list[Any], ctx: _AnnContext, scan: CocoScan, slow: bool) -> set[int]:
    """Every annotation record that may break a rule through :func:`annotation_problems` (a vectorised screen
    finds them unless ``slow``), into ``scan``; returns the ids of the images with a training instance."""
    screened = None if slow else _screen_annotations(anns, ctx)
    if screened is None:  # unusual value types somewhere: every record through the rules
        seen: set[Any] = set()
        suspects, with_instances = [], set()
        for k, ann in enumerate(anns):
            aid = ann.get("id") if isinstance(ann, dict) else None
            aid = aid if _is_int(aid) else None  # other ids are reported as malformed (and may be unhashable)
            suspects.append((k, aid is not None and aid in seen))
            seen.add(aid)
    else:
        suspects, with_instances = screened
    for k, duplicate in suspects:
        found, image_id = annotation_problems(k, anns[k], duplicate, ctx)
        if any(p.severity == ERROR for p in found):
            scan.bad_annotations.add(k)
        scan.problems.extend(found)
        if image_id is not None:
            with_instances.add(image_id)
    return with_instances


def all_degenerate_problem(source: str, candidates: Sequence[dict[str, Any]], sizes: Mapping[int, tuple[int, int]],
                           min_box_size: float) -> Problem | None:
    """Every non-crowd box is degenerate: a unit mistake (normalised coordinates), not an empty dataset.

    ``candidates``: the non-crowd annotations of kept categories; ``sizes``: image id -> (height, width).
    Boxes are measured against ``min_box_size`` or 1 px, whichever is larger: boxes all under a pixel are
    the mistake's signature even where a smaller ``min_box_size`` (detectron2's 1e-5) would keep them.
    """
    floor = max(min_box_size, 1.0)
    for ann in candidates:  # stops at the first usable box: one step on a sound dataset
        h, w = sizes[ann["image_id"]]
        if instance_box(ann["bbox"], w, h, floor) is not None:
            return None
    if not candidates:
        return None
    first = candidates[0]
    limit = f"min_box_size={min_box_size}" if min_box_size >= 1.0 else "1"
    return Problem("all-boxes-degenerate",
                   f"{source}: all {len(candidates)} annotations have boxes smaller than {limit} px (e.g. "
                   f"annotation id {first['id']} bbox {_short(first['bbox'])}); are coordinates normalised to "
                   "0..1 instead of pixels?")


# --------------------------------------------------------------------------- #
# Pixels: an image file against its record, a mask against its box
# --------------------------------------------------------------------------- #
def check_image_file(path: str | os.PathLike[str], info: dict[str, Any],
                     source: str) -> tuple[np.ndarray | None, Problem | None]:
    """Read the image of record ``info``: ``(RGB pixels or None, problem or None)``.

    Problems: the file is missing, cannot be decoded, or its size differs from the record's.
    """
    where = f"image id {info['id']}"
    if not Path(path).is_file():
        return None, Problem("image-missing", f"{source}: {where}: image file {os.fspath(path)!r} not found")
    try:
        image, orientation = _read_image(path)
    except DatasetError as e:
        return None, Problem("image-unreadable", f"{source}: {where}: {e}")
    h, w = image.shape[:2]
    if (h, w) != (info["height"], info["width"]):
        # A JSON written from the stored pixels of a photo that is displayed turned by 90 degrees.
        hint = (f"; its EXIF orientation {orientation} turns it by 90 degrees: the JSON's size and "
                "annotations must refer to the image as displayed"
                if orientation >= 5 and (w, h) == (info["height"], info["width"]) else "")
        return image, Problem("image-size-mismatch",
                              f"{source}: {where} ({info['file_name']!r}): image on disk is {w}x{h} (width x "
                              f"height) but the JSON says width={info['width']}, height={info['height']}{hint}")
    return image, None


def decode_instance(ann: dict[str, Any], height: int, width: int,
                    source: str) -> tuple[np.ndarray | None, Problem | None]:
    """Decode an annotation's segmentation, turning a pycocotools failure (bad RLE string) into a Problem."""
    try:
        return decode_segmentation(ann["segmentation"], height, width), None
    except Exception as e:  # pycocotools raises assorted types on corrupt counts
        return None, Problem("segmentation-undecodable",
                             f"{source}: annotation id {ann['id']} (image {ann['image_id']}): segmentation "
                             f"cannot be decoded ({type(e).__name__}: {e})")


def mask_problem(ann: dict[str, Any], mask: np.ndarray, box: Sequence[float], source: str) -> Problem | None:
    """Catch masks that cannot belong to their box (almost always a format error).

    A legitimately empty mask (a polygon sliver thinner than a pixel, inside
    its box) is a warning: the instance is then skipped.
    """
    h, w = mask.shape
    where = f"{source}: annotation id {ann['id']} (image {ann['image_id']})"
    n = int(np.count_nonzero(mask))
    x0, y0, x1, y1 = box
    if n == 0:
        segm = ann["segmentation"]
        if isinstance(segm, list):
            xs = [v for poly in segm for v in poly[0::2]]
            ys = [v for poly in segm for v in poly[1::2]]
            if x0 - 1 <= min(xs) and max(xs) <= x1 + 1 and y0 - 1 <= min(ys) and max(ys) <= y1 + 1:
                return Problem("mask-sliver", f"{where}: segmentation covers no pixel centre (sub-pixel sliver; "
                                              "dropped from training)", WARNING)
        return Problem("mask-empty", f"{where}: segmentation decodes to an empty mask although bbox "
                                     f"{_short(ann['bbox'])} is not empty (coordinates normalised to 0..1 "
                                     "instead of pixels?)")
    if n == h * w and (x1 - x0) * (y1 - y0) < 0.9 * h * w:
        return Problem("mask-full-image", f"{where}: segmentation decodes to a mask covering the whole image but "
                                          f"bbox is {_short(ann['bbox'])} (inverted mask or wrong RLE encoding?)")
    # Generous margin: COCO boxes come from polygons and may differ by a pixel or two.
    mx, my = 2 + 0.1 * (x1 - x0), 2 + 0.1 * (y1 - y0)
    ix0, iy0 = max(int(x0 - mx), 0), max(int(y0 - my), 0)
    ix1, iy1 = int(math.ceil(x1 + mx)), int(math.ceil(y1 + my))
    inside = int(np.count_nonzero(mask[iy0:iy1, ix0:ix1]))
    if inside < 0.5 * n:
        return Problem("mask-outside-box", f"{where}: only {inside} of the {n} mask pixels lie inside bbox "
                                           f"{_short(ann['bbox'])} (x/y swapped, or bbox not [x, y, width, height]?)")
    return None
