"""Datasets from the config: the generated shapes set (made on first use) or any COCO-format dataset."""
from __future__ import annotations

from ..config import Config
from .coco import CocoInstances
from .shapes import ensure_shapes
from .transforms import Compose, RandomHorizontalFlip


def dataset_paths(cfg: Config) -> dict[str, str]:
    d = cfg.data
    if d.dataset == "shapes":
        s = d.shapes
        paths = ensure_shapes(d.root, num_train=s.num_train, num_val=s.num_val,
                              image_size=tuple(s.image_size), seed=s.seed)
        return {k: str(v) for k, v in paths.items()}
    if d.dataset == "coco":
        missing = [k for k in ("train_images", "train_ann", "val_images", "val_ann") if not getattr(d, k)]
        if missing:
            raise ValueError(f"data.dataset=coco needs data.{missing[0]} (set it in the config or with --set)")
        return {"train_images": d.train_images, "train_ann": d.train_ann, "val_images": d.val_images,
                "val_ann": d.val_ann}
    raise ValueError(f"unknown data.dataset '{d.dataset}' (shapes | coco)")


def build_eval_dataset(cfg: Config, split: str = "val", transforms=None) -> CocoInstances:
    """The `split` ("train" or "val") for evaluation: every image kept, no augmentation unless given."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got '{split}'")
    paths = dataset_paths(cfg)
    return CocoInstances(paths[f"{split}_images"], paths[f"{split}_ann"], categories=list(cfg.data.categories) or None,
                         remove_images_without_annotations=False, transforms=transforms,
                         min_box_size=cfg.data.min_box_size)


def build_datasets(cfg: Config, train: bool = True):
    """(train set with augmentation or None, val set)."""
    d = cfg.data
    paths = dataset_paths(cfg)
    categories = list(d.categories) or None
    train_set = None
    if train:
        train_set = CocoInstances(paths["train_images"], paths["train_ann"], categories=categories,
                                  remove_images_without_annotations=d.remove_images_without_annotations,
                                  transforms=Compose([RandomHorizontalFlip(d.flip_prob)]),
                                  min_box_size=d.min_box_size)
    return train_set, build_eval_dataset(cfg, "val")
