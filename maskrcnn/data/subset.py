"""Write a smaller COCO dataset: N randomly chosen images (optionally only some categories).

Output layout::

    OUT/images/<file_name>      # copied images (sub-folders in file_name are kept)
    OUT/annotations.json        # only the kept images, annotations and categories

Only images with at least one non-crowd instance of the kept categories are
candidates (a subset is usually for a quick training run).  Crowd annotations
of kept categories are kept too, since evaluation uses them.  Category ids are
unchanged, so results stay comparable with the full dataset.

CLI::

    python -m maskrcnn.data.subset --ann A.json --images DIR --out OUTDIR -n 25 [--categories person] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .coco import DatasetError, load_coco_json

__all__ = ["make_subset"]


def make_subset(
    ann_file: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    num_images: int,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Copy ``num_images`` random images (seeded) and their annotations to ``out_dir``.

    Returns ``{"images": OUT/images, "ann": OUT/annotations.json}``.  Asking
    for more images than there are candidates keeps all of them (with a warning).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    data = load_coco_json(ann_file)  # validated: errors name the file and record
    source = os.fspath(ann_file)
    images_dir, out_dir = Path(images_dir), Path(out_dir)

    cats = sorted(data["categories"], key=lambda c: c["id"])
    if categories:
        by_name = {c["name"]: c["id"] for c in cats}
        unknown = [n for n in categories if n not in by_name]
        if unknown:
            raise DatasetError(f"{source}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                               f"{', '.join(map(repr, unknown))}; valid names: {', '.join(by_name)}")
        wanted = {by_name[n] for n in categories}
        cats = [c for c in cats if c["id"] in wanted]
    kept_cats = {c["id"] for c in cats}

    anns = [a for a in data["annotations"] if a["category_id"] in kept_cats]
    candidates = sorted({a["image_id"] for a in anns if not a.get("iscrowd", 0)})
    if not candidates:
        raise DatasetError(f"{source}: no image has a non-crowd instance of the requested categories")
    if num_images > len(candidates):
        warnings.warn(f"{source}: only {len(candidates)} candidate images, keeping all of them", stacklevel=2)
        num_images = len(candidates)
    rng = np.random.default_rng(seed)
    chosen = {candidates[i] for i in rng.choice(len(candidates), size=num_images, replace=False)}

    images = [img for img in data["images"] if img["id"] in chosen]
    for img in images:  # check everything exists before writing anything
        if not (images_dir / img["file_name"]).is_file():
            raise DatasetError(f"{source}: image id {img['id']}: image file "
                               f"{os.fspath(images_dir / img['file_name'])!r} not found")
    out_images = out_dir / "images"
    out_images.mkdir(parents=True, exist_ok=True)
    for img in images:
        dst = out_images / img["file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images_dir / img["file_name"], dst)

    subset: dict[str, Any] = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    subset["images"] = images
    subset["annotations"] = [a for a in anns if a["image_id"] in chosen]
    subset["categories"] = cats
    ann_out = out_dir / "annotations.json"
    ann_out.write_text(json.dumps(subset))
    return {"images": out_images, "ann": ann_out}


def _main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m maskrcnn.data.subset",
                                description="Write a random N-image subset of a COCO dataset.")
    p.add_argument("--ann", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    p.add_argument("--out", required=True, help="output folder (images/ and annotations.json)")
    p.add_argument("-n", "--num-images", type=int, required=True)
    p.add_argument("--categories", nargs="+", default=None, help="keep only these category names")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        paths = make_subset(a.ann, a.images, a.out, a.num_images, a.categories, a.seed)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    data = json.loads(paths["ann"].read_text())
    print(f"wrote {paths['ann']}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
          f"categories {[c['name'] for c in data['categories']]}")


if __name__ == "__main__":
    _main()
