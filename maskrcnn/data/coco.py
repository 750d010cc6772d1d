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
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO

# DatasetError, read_coco_json, read_image and decode_segmentation are re-exported: the dataset's reading API.
from .rules import (ERROR, WARNING, DatasetError, all_degenerate_problem, check_image_file, decode_instance,
                    decode_segmentation, instance_box, mask_problem, read_coco_json, read_image, scan_coco,
                    segmentation_area)

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
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def validate_coco(data: Any, source: str) -> None:
    """Raise :class:`DatasetError` on the first error :func:`scan_coco` finds in a loaded COCO dict."""
    for problem in scan_coco(data, source).problems:
        if problem.severity == ERROR:
            raise DatasetError(problem.message)


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
            sizes = {i: (info["height"], info["width"]) for i, info in self.coco.imgs.items()}
            problem = all_degenerate_problem(self._source, kept_anns, sizes, self.min_box_size)
            if problem is not None:
                raise DatasetError(problem.message)
        self.image_ids: list[int] = image_ids

    # ------------------------------------------------------------------ #
    def _is_target(self, ann: dict[str, Any]) -> bool:
        """Whether an annotation becomes a training instance (kept class, not crowd, box big enough)."""
        if ann["category_id"] not in self.cat_id_to_contiguous or ann.get("iscrowd", 0):
            return False
        info = self.coco.imgs[ann["image_id"]]
        return instance_box(ann["bbox"], info["width"], info["height"], self.min_box_size) is not None

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict[str, Any]:
        """The COCO image record of item ``index``."""
        return self.coco.imgs[self.image_ids[index]]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.image_info(index)["file_name"]

    def _load_image(self, info: dict[str, Any]) -> np.ndarray:
        image, problem = check_image_file(self.image_dir / info["file_name"], info, self._source)
        if problem is not None:
            raise DatasetError(problem.message)
        return image

    def _check_mask(self, ann: dict[str, Any], mask: np.ndarray, box: Sequence[float]) -> bool:
        """Raise on a mask that cannot belong to its box; False for a sub-pixel sliver (skipped)."""
        problem = mask_problem(ann, mask, box, self._source)
        if problem is None:
            return True
        if problem.severity == WARNING:
            return False
        raise DatasetError(problem.message)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)
        h, w = image.shape[:2]

        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        masks: list[np.ndarray] = []
        for ann in self.coco.imgToAnns.get(image_id, ()):
            # Crowd annotations are no targets: their regions train as background, as in detectron2, whose
            # mapper drops them too (COCO evaluation reads iscrowd from the JSON itself).
            if ann["category_id"] not in self.cat_id_to_contiguous or ann.get("iscrowd", 0):
                continue
            box = instance_box(ann["bbox"], w, h, self.min_box_size)
            if box is None:
                continue  # degenerate (or entirely outside the image)
            mask, problem = decode_instance(ann, h, w, self._source)
            if problem is not None:
                raise DatasetError(problem.message)
            if not self._check_mask(ann, mask, box):
                continue
            boxes.append(box)
            labels.append(self.cat_id_to_contiguous[ann["category_id"]])
            masks.append(mask)

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
