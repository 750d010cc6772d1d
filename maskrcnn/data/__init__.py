"""Data: COCO-format datasets, the synthetic shapes generator, converters, augmentation and loaders.

Public names are imported lazily (PEP 562) so that ``python -m
maskrcnn.data.shapes`` & co. do not import their own module twice (runpy
warns about that when the package ``__init__`` imports it eagerly).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # coco.py
    "DatasetError": "coco",
    "CocoInstances": "coco",
    "load_coco_json": "coco",
    "validate_coco": "coco",
    "decode_segmentation": "coco",
    "read_image": "coco",
    "check_dataset": "coco",
    # shapes.py
    "generate_shapes": "shapes",
    "ensure_shapes": "shapes",
    "SHAPE_KINDS": "shapes",
    "DEFAULT_CLASSES": "shapes",
    # from_masks.py
    "masks_to_coco": "from_masks",
    "read_binary_mask": "from_masks",
    # subset.py
    "make_subset": "subset",
    # transforms.py
    "Compose": "transforms",
    "RandomHorizontalFlip": "transforms",
    "hflip": "transforms",
    # loader.py
    "collate": "loader",
    "build_loader": "loader",
    "SeededLoader": "loader",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static analysers see the real imports
    from .coco import (CocoInstances, DatasetError, check_dataset, decode_segmentation, load_coco_json,
                       read_image, validate_coco)
    from .from_masks import masks_to_coco, read_binary_mask
    from .loader import SeededLoader, build_loader, collate
    from .shapes import DEFAULT_CLASSES, SHAPE_KINDS, ensure_shapes, generate_shapes
    from .subset import make_subset
    from .transforms import Compose, RandomHorizontalFlip, hflip


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
