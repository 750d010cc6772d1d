"""COCO-format instance segmentation dataset with up-front validation.

:func:`load_coco_json` checks a file record by record by the rules of
:mod:`maskrcnn.data.rules` and raises a :class:`DatasetError` whose message is
ONE line naming the file, the record and the problem, e.g.::

    instances_train.json: annotation id 17 (image 3): bbox [10, 5, -4, 8] has negative width

Checks that need pixels (image size on disk, masks that decode empty) happen
lazily in :meth:`CocoInstances.__getitem__`, by the same rules and with the
same kind of message; ``python -m maskrcnn.data.check`` applies them all up front.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools.coco import COCO

# DatasetError, read_coco_json, read_image, decode_segmentation and instance_box are re-exported: the API of
# the dataset that converters, tools and drawings use.
from .rules import (ERROR, DatasetError, Problem, all_degenerate_problem, check_image_file, decode_instance,
                    decode_segmentation, instance_box, mask_problem, read_coco_json, read_image, scan_coco,
                    segmentation_area, training_box, trains_as_instance)

__all__ = [
    "DatasetError",
    "CocoInstances",
    "read_coco_json",
    "load_coco_json",
    "validate_coco",
    "instance_box",
    "decode_segmentation",
    "read_image",
]

Target = dict[str, Any]
Box = tuple[float, float, float, float]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def _stop_on(problem: Problem | None) -> None:
    """Training stops on an error: raise it as a :class:`DatasetError` (a warning or None passes)."""
    if problem is not None and problem.severity == ERROR:
        raise DatasetError(problem.message)


def validate_coco(data: Any, source: str) -> None:
    """Raise :class:`DatasetError` on the first error :func:`~maskrcnn.data.rules.scan_coco` finds in a loaded
    COCO dict."""
    for problem in scan_coco(data, source).problems:
        _stop_on(problem)


def load_coco_json(ann_file: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a COCO instances file; fill optional fields pycocotools needs.

    Missing ``iscrowd`` defaults to 0 and missing ``area`` is computed from the
    segmentation (COCOeval crashes without them); the file itself is not changed.
    """
    data = read_coco_json(ann_file)
    validate_coco(data, os.fspath(ann_file))
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            h, w = sizes[ann["image_id"]]
            ann["area"] = segmentation_area(ann["segmentation"], h, w)
    return data


def _kept_categories(records: list[dict[str, Any]], names: list[str] | None, source: str) -> list[dict[str, Any]]:
    """The category records of ``names`` (None: all), sorted by id; an unknown name is an error."""
    cats = sorted(records, key=lambda c: c["id"])
    if names is not None:
        by_name = {c["name"]: c["id"] for c in cats}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DatasetError(
                f"{source}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(map(repr, unknown))}; valid names: {', '.join(c['name'] for c in cats)}"
            )
        wanted = {by_name[n] for n in names}
        cats = [c for c in cats if c["id"] in wanted]
    if not cats:
        raise DatasetError(f"{source}: no categories to train on")
    return cats


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #
class CocoInstances(torch.utils.data.Dataset):
    """COCO instance segmentation dataset returning ``(image, target)``.

    ``image`` is float32 ``[3, H, W]`` RGB in 0..1.  ``target`` has

    * ``boxes``: float32 ``[N, 4]`` xyxy pixels (COCO ``bbox`` clipped to the image);
    * ``labels``: int64 ``[N]`` contiguous ids ``1..K`` (0 is background);
    * ``masks``: uint8 ``[N, H, W]`` with values 0/1;
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
            this (pixels, > 0) are removed; detectron2 keeps every box over 1e-5.
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
        if not self.min_box_size > 0:  # a zero-width box has no regression target (log of 0)
            raise ValueError(f"min_box_size must be > 0 px, got {min_box_size}")
        self._source = os.fspath(ann_file)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{os.fspath(image_dir)}: image directory not found (for {self._source})")

        data = load_coco_json(ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        all_cats = _kept_categories(data["categories"], categories, self._source)
        self.cat_ids: list[int] = [c["id"] for c in all_cats]
        self.cat_id_to_contiguous: dict[int, int] = {cid: k + 1 for k, cid in enumerate(self.cat_ids)}
        self.contiguous_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_contiguous.items()}
        self.class_names: list[str] = ["__background__"] + [c["name"] for c in all_cats]
        self.num_classes: int = len(all_cats)

        image_ids = sorted(self.coco.imgs)
        if remove_images_without_annotations:
            image_ids = [i for i in image_ids if any(self._is_target(a) for a in self.coco.imgToAnns.get(i, ()))]
            kept_anns = [a for a in data["annotations"] if trains_as_instance(a, self.cat_id_to_contiguous)]
            sizes = {i: (info["height"], info["width"]) for i, info in self.coco.imgs.items()}
            _stop_on(all_degenerate_problem(self._source, kept_anns, sizes, self.min_box_size))
        self.image_ids: list[int] = image_ids

    # ------------------------------------------------------------------ #
    def _is_target(self, ann: dict[str, Any]) -> bool:
        """Whether an annotation becomes a training instance (kept class, not crowd, box big enough)."""
        info = self.coco.imgs[ann["image_id"]]
        return training_box(ann, info["width"], info["height"], self.min_box_size, self.cat_id_to_contiguous) \
            is not None

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict[str, Any]:
        """The COCO image record of item ``index``."""
        return self.coco.imgs[self.image_ids[index]]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.image_info(index)["file_name"]

    def _load_image(self, info: dict[str, Any]) -> np.ndarray:
        image, problem = check_image_file(self.image_dir / info["file_name"], info, self._source)
        _stop_on(problem)
        return image

    def _instances(self, image_id: int, h: int, w: int) -> tuple[list[Box], list[int], list[np.ndarray]]:
        """Boxes, contiguous labels and masks of the training instances of an image (crowd regions, other
        categories, degenerate boxes and sub-pixel slivers left out); raises on a mask that cannot be one."""
        boxes: list[Box] = []
        labels: list[int] = []
        masks: list[np.ndarray] = []
        for ann in self.coco.imgToAnns.get(image_id, ()):
            box = training_box(ann, w, h, self.min_box_size, self.cat_id_to_contiguous)
            if box is None:
                continue
            mask, problem = decode_instance(ann, h, w, self._source)
            _stop_on(problem)
            problem = mask_problem(ann, mask, box, self._source)
            _stop_on(problem)
            if problem is not None:
                continue  # a warning: a sub-pixel sliver
            boxes.append(box)
            labels.append(self.cat_id_to_contiguous[ann["category_id"]])
            masks.append(mask)
        return boxes, labels, masks

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.image_ids[index]
        image = self._load_image(self.coco.imgs[image_id])
        h, w = image.shape[:2]
        boxes, labels, masks = self._instances(image_id, h, w)
        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)),
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
