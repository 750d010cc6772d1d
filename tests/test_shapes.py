"""The synthetic shapes generator writes a deterministic, valid, non-trivial COCO dataset."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn.data.coco import CocoInstances
from maskrcnn.data.shapes import ensure_shapes, generate_shapes

SMALL = dict(num_train=6, num_val=2, image_size=(96, 128))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=24, num_val=4, image_size=(128, 160), seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path: Path) -> None:
    a = _files(generate_shapes(tmp_path / "a", seed=5, **SMALL)["root"])
    b = _files(generate_shapes(tmp_path / "b", seed=5, **SMALL)["root"])
    assert a == b  # byte-identical JSON, images and meta
    c = _files(generate_shapes(tmp_path / "c", seed=6, **SMALL)["root"])
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert a["train/000000.png"] != c["train/000000.png"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' annToMask under NumPy 2
def test_layout_and_pycocotools(shapes: dict[str, Path]) -> None:
    assert sorted(p.name for p in shapes["train_images"].iterdir())[:2] == ["000000.png", "000001.png"]
    assert len(list(shapes["val_images"].iterdir())) == 4
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(shapes["train_ann"]))
    assert len(coco.imgs) == 24 and len(coco.anns) > 24
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "rectangle", "triangle", "star"]
    for ann in coco.anns.values():
        assert ann["iscrowd"] == 0
        assert int(coco.annToMask(ann).sum()) == ann["area"]  # area is the mask area


def test_both_segmentation_formats(shapes: dict[str, Path]) -> None:
    anns = json.loads(shapes["train_ann"].read_text())["annotations"]
    kinds = {("polygon" if isinstance(a["segmentation"], list) else "rle") for a in anns}
    assert kinds == {"polygon", "rle"}
    rles = [a["segmentation"] for a in anns if isinstance(a["segmentation"], dict)]
    assert all(isinstance(r["counts"], str) for r in rles)  # compressed


def test_sizes_span_fpn_levels(shapes: dict[str, Path]) -> None:
    data = json.loads(shapes["train_ann"].read_text())
    sides = {i["id"]: min(i["width"], i["height"]) for i in data["images"]}
    extents = [max(a["bbox"][2:]) for a in data["annotations"]]
    rel = [max(a["bbox"][2:]) / sides[a["image_id"]] for a in data["annotations"]]
    assert min(extents) <= 16  # small objects (P2)
    assert max(rel) >= 0.5  # large objects (P5)
    assert len({int(math.log2(max(e, 1))) for e in extents}) >= 4  # several octaves


def test_dataset_masks_match_boxes(shapes: dict[str, Path]) -> None:
    ds = CocoInstances(shapes["train_images"], shapes["train_ann"])
    assert ds.num_classes == 4 and len(ds) == 24
    n_overlapping = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape[1:] == target["orig_size"]
        assert 128 <= image.shape[1] <= 160 and 128 <= image.shape[2] <= 160
        for mask, box in zip(target["masks"], target["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1] == box.tolist()
        # Visible masks of one image never overlap (occlusion is resolved).
        assert target["masks"].sum(0).max() <= 1
        boxes = target["boxes"]
        if len(boxes) > 1:
            lt = torch.max(boxes[:, None, :2], boxes[None, :, :2])
            rb = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
            inter = (rb - lt).clamp(min=0).prod(-1)
            n_overlapping += int((inter.triu(1) > 0).any())
    assert n_overlapping >= 5  # objects do overlap


def test_image_not_trivial(shapes: dict[str, Path]) -> None:
    # Textured backgrounds: many distinct colours outside the objects.
    ds = CocoInstances(shapes["train_images"], shapes["train_ann"])
    image, target = ds[0]
    background = target["masks"].sum(0) == 0
    pixels = (image[:, background] * 255).round().to(torch.int64)
    assert len(torch.unique(pixels[0] * 65536 + pixels[1] * 256 + pixels[2])) > 200


def test_ensure_shapes_caches(tmp_path: Path) -> None:
    paths = ensure_shapes(tmp_path, seed=1, **SMALL)
    stamp = paths["train_ann"].stat().st_mtime_ns
    assert ensure_shapes(tmp_path, seed=1, **SMALL) == paths
    assert paths["train_ann"].stat().st_mtime_ns == stamp  # reused
    ensure_shapes(tmp_path, seed=2, **SMALL)  # different parameters: regenerated
    assert json.loads(paths["meta"].read_text())["seed"] == 2
    ensure_shapes(tmp_path, seed=2, **{**SMALL, "num_train": 3})
    assert sorted(p.name for p in paths["train_images"].iterdir()) == ["000000.png", "000001.png", "000002.png"]
    paths["meta"].unlink()  # interrupted generation: regenerated
    ensure_shapes(tmp_path, seed=2, **{**SMALL, "num_train": 3})
    assert paths["meta"].exists()


def test_fixed_image_size_and_classes(tmp_path: Path) -> None:
    paths = generate_shapes(tmp_path, num_train=3, num_val=1, image_size=64, classes=("ellipse", "circle"))
    data = json.loads(paths["train_ann"].read_text())
    assert {(i["width"], i["height"]) for i in data["images"]} == {(64, 64)}
    assert data["categories"][0] == {"id": 1, "name": "ellipse", "supercategory": "shape"}
    with pytest.raises(ValueError, match="classes"):
        generate_shapes(tmp_path, classes=("hexagon",))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from maskrcnn.data.shapes import _main

    _main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1", "--seed", "3",
           "--min-size", "64", "--max-size", "80"])
    assert "2 train / 1 val images" in capsys.readouterr().out
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["image_size"] == [64, 80]
    assert np.array_equal(sorted(p.name for p in (tmp_path / "val").iterdir()), ["000000.png"])
