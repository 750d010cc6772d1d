"""CocoInstances decoding, label mapping, filtering, flips, validation errors, and subsets."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn.data.coco import CocoInstances, DatasetError
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.subset import make_subset
from maskrcnn.data.transforms import RandomHorizontalFlip, hflip

H, W = 20, 30


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _image(i: int, w: int = W, h: int = H, file_name: str | None = None) -> dict[str, Any]:
    return {"id": i, "file_name": file_name or f"img{i}.png", "width": w, "height": h}


def _square_ann(ann_id: int, image_id: int, cat: int, x: int = 5, y: int = 4, w: int = 10, h: int = 8,
                **extra: Any) -> dict[str, Any]:
    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
    ann = {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": [poly],
           "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
    ann.update(extra)
    return ann


def _write(tmp_path: Path, data: dict[str, Any], name: str = "instances_test.json",
           write_images: bool = True) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if write_images:
        rng = np.random.default_rng(0)
        for img in data.get("images", []):
            # Always H x W: records with broken sizes are rejected before pixels are read.
            pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            cv2.imwrite(str(img_dir / img["file_name"]), pixels)
    ann = tmp_path / name
    ann.write_text(json.dumps(data))
    return img_dir, ann


def _base() -> dict[str, Any]:
    """One image, one square instance of category 1: the valid starting point for error tests."""
    return {
        "images": [_image(1)],
        "annotations": [_square_ann(17, 1, 1)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


# --------------------------------------------------------------------------- #
# decoding
# --------------------------------------------------------------------------- #
def test_polygon_square(tmp_path: Path) -> None:
    img_dir, ann = _write(tmp_path, _base())
    ds = CocoInstances(img_dir, ann)
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    expected = np.zeros((H, W), np.uint8)
    expected[4:12, 5:15] = 1  # pixel i spans [i, i+1): polygon x 5..15 covers columns 5..14
    assert target["masks"].shape == (1, H, W) and target["masks"].dtype == torch.uint8
    assert np.array_equal(target["masks"][0].numpy(), expected)
    assert target["boxes"].tolist() == [[5.0, 4.0, 15.0, 12.0]]
    assert target["labels"].tolist() == [1] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["orig_size"] == (H, W)


def test_image_is_rgb(tmp_path: Path) -> None:
    data = _base()
    img_dir, ann = _write(tmp_path, data)
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(img_dir / "img1.png"), pixels)
    image, _ = CocoInstances(img_dir, ann)[0]
    assert image[0].min() == 1.0 and image[1].max() == 0.0 and image[2].max() == 0.0


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_images(tmp_path: Path, channels: int) -> None:
    img_dir, ann = _write(tmp_path, _base())
    shape = (H, W) if channels == 1 else (H, W, 4)
    cv2.imwrite(str(img_dir / "img1.png"), np.full(shape, 128, np.uint8))
    image, _ = CocoInstances(img_dir, ann)[0]
    assert image.shape == (3, H, W)
    assert torch.allclose(image, torch.full_like(image, 128 / 255))


def test_compressed_and_uncompressed_rle(tmp_path: Path) -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[2:9, 3:7] = 1
    mask[12:18, 20:28] = 1  # two components: only RLE can hold this in one record
    compressed = mask_utils.encode(np.asfortranarray(mask))
    compressed = {"size": [H, W], "counts": compressed["counts"].decode("ascii")}
    data = _base()
    data["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": compressed,
         "bbox": [3, 2, 25, 16], "area": int(mask.sum()), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": _uncompressed_rle(mask),
         "bbox": [3, 2, 25, 16], "area": int(mask.sum()), "iscrowd": 0},
    ]
    img_dir, ann = _write(tmp_path, data)
    _, target = CocoInstances(img_dir, ann)[0]
    assert target["masks"].shape == (2, H, W)
    assert np.array_equal(target["masks"][0].numpy(), mask)
    assert np.array_equal(target["masks"][1].numpy(), mask)
    assert target["labels"].tolist() == [1, 2]


def test_crowd_dropped_from_targets(tmp_path: Path) -> None:
    crowd_mask = np.zeros((H, W), np.uint8)
    crowd_mask[10:20, 0:10] = 1
    data = _base()
    data["annotations"].append({"id": 18, "image_id": 1, "category_id": 1, "iscrowd": 1,
                                "segmentation": _uncompressed_rle(crowd_mask), "bbox": [0, 10, 10, 10],
                                "area": 100})
    img_dir, ann = _write(tmp_path, data)
    _, target = CocoInstances(img_dir, ann)[0]
    assert target["labels"].tolist() == [1]
    assert target["masks"].shape[0] == 1 and target["boxes"].tolist() == [[5.0, 4.0, 15.0, 12.0]]
    assert set(target) == {"boxes", "labels", "masks", "image_id", "orig_size"}  # no trace of the crowd region


def test_crowd_only_image_dropped(tmp_path: Path) -> None:
    data = _base()
    data["images"].append(_image(2))
    data["annotations"].append(_square_ann(18, 2, 1, iscrowd=1))
    img_dir, ann = _write(tmp_path, data)
    assert CocoInstances(img_dir, ann).image_ids == [1]
    assert CocoInstances(img_dir, ann, remove_images_without_annotations=False).image_ids == [1, 2]


# --------------------------------------------------------------------------- #
# categories
# --------------------------------------------------------------------------- #
def test_contiguous_mapping_noncontiguous_ids(tmp_path: Path) -> None:
    data = {
        "images": [_image(1)],
        # Deliberately unsorted in the file: the mapping follows sorted COCO ids.
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 7, "name": "train"}],
        "annotations": [_square_ann(1, 1, 90), _square_ann(2, 1, 1, x=1, y=1, w=3, h=3),
                        _square_ann(3, 1, 7, x=20, y=10, w=5, h=5)],
    }
    img_dir, ann = _write(tmp_path, data)
    ds = CocoInstances(img_dir, ann)
    assert ds.num_classes == 3
    assert ds.class_names == ["__background__", "person", "train", "toothbrush"]
    assert ds.cat_id_to_contiguous == {1: 1, 7: 2, 90: 3}
    assert ds.contiguous_to_cat_id == {1: 1, 2: 7, 3: 90}
    _, target = ds[0]
    assert target["labels"].tolist() == [3, 1, 2]


def test_category_filter_by_name(tmp_path: Path) -> None:
    data = _base()
    data["images"].append(_image(2))
    data["annotations"].append(_square_ann(18, 1, 2, x=20, y=2, w=5, h=5))  # dog in image 1
    data["annotations"].append(_square_ann(19, 2, 1))  # only a cat in image 2
    img_dir, ann = _write(tmp_path, data)
    ds = CocoInstances(img_dir, ann, categories=["dog"])
    assert ds.num_classes == 1 and ds.class_names == ["__background__", "dog"]
    assert ds.contiguous_to_cat_id == {1: 2}
    assert ds.image_ids == [1]  # image 2 has no dog
    _, target = ds[0]
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[20.0, 2.0, 25.0, 7.0]]
    assert CocoInstances(img_dir, ann, categories=["dog"], remove_images_without_annotations=False).image_ids == [1, 2]


def test_unknown_category_name(tmp_path: Path) -> None:
    img_dir, ann = _write(tmp_path, _base())
    with pytest.raises(DatasetError, match=r"instances_test\.json: unknown category 'horse'; valid names: cat, dog"):
        CocoInstances(img_dir, ann, categories=["horse"])


def test_images_without_annotations(tmp_path: Path) -> None:
    data = _base()
    data["images"].append(_image(5))
    img_dir, ann = _write(tmp_path, data)
    assert CocoInstances(img_dir, ann).image_ids == [1]
    kept = CocoInstances(img_dir, ann, remove_images_without_annotations=False)
    assert kept.image_ids == [1, 5]
    _, target = kept[1]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W)
    assert target["labels"].shape == (0,)


def test_degenerate_box_removed(tmp_path: Path) -> None:
    data = _base()
    # A 0.5 px wide sliver: valid JSON, but not a usable training box.
    data["annotations"].append({"id": 30, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 1,
                                "segmentation": [[20, 2, 20.5, 2, 20.5, 9, 20, 9]], "bbox": [20, 2, 0.5, 7]})
    img_dir, ann = _write(tmp_path, data)
    _, target = CocoInstances(img_dir, ann)[0]
    assert target["labels"].tolist() == [1]
    _, target = CocoInstances(img_dir, ann, min_box_size=0.1)[0]
    assert target["labels"].tolist() == [1, 2]


@pytest.mark.parametrize("preset, kept", [(None, [1]), ("configs/coco_r50_fpn_1x.yaml", [1, 2])])
def test_min_box_size_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], preset: str | None,
                                      kept: list[int]) -> None:
    """data.min_box_size reaches the datasets and the data check: the COCO preset keeps a 0.5 px wide box as
    detectron2 does (its threshold 1e-5), the default (1 px) drops it."""
    import train
    from maskrcnn.config import load_config
    from maskrcnn.data.build import build_datasets

    data = _base()
    data["annotations"].append({"id": 30, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 3.5,
                                "segmentation": [[20, 2, 20.5, 2, 20.5, 9, 20, 9]], "bbox": [20, 2, 0.5, 7]})
    img_dir, ann = _write(tmp_path, data)
    cfg = load_config(preset, ["data.dataset=coco", f"data.train_ann={ann}", f"data.train_images={img_dir}",
                               f"data.val_ann={ann}", f"data.val_images={img_dir}"])
    assert cfg.data.min_box_size == (1.0 if preset is None else 1e-5)
    train_set, val_set = build_datasets(cfg)
    train_set.transforms = None  # no flip: labels in annotation order
    assert train_set[0][1]["labels"].tolist() == kept and val_set[0][1]["labels"].tolist() == kept
    assert train_set[0][1]["boxes"].tolist()[1:] == ([[20.0, 2.0, 20.5, 9.0]] if len(kept) == 2 else [])
    # train.py --check-data: the dropped box is a warning under the default only.
    train.check_data(cfg, progress=False)
    assert ("degenerate-box" in capsys.readouterr().out) == (len(kept) == 1)


def test_min_box_size_must_be_positive_and_unit_mistakes_still_stop(tmp_path: Path) -> None:
    data = _base()
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(ValueError, match="min_box_size must be > 0 px, got 0"):
        CocoInstances(img_dir, ann, min_box_size=0)
    # Boxes all under a pixel (normalised coordinates) stop training under detectron2's 1e-5 too.
    data["annotations"][0]["bbox"] = [0.1, 0.2, 0.3, 0.3]
    data["annotations"][0]["segmentation"] = [[0.1, 0.2, 0.4, 0.2, 0.4, 0.5, 0.1, 0.5]]
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=r"all 1 annotations have boxes smaller than 1 px \(e\.g\. annotation "
                                           r"id 17 bbox \[0\.1, 0\.2, 0\.3, 0\.3\]\); are coordinates normalised"):
        CocoInstances(img_dir, ann, min_box_size=1e-5)
    from maskrcnn.data.check import check_dataset_files
    report = check_dataset_files(ann, img_dir, progress=False, min_box_size=1e-5)
    assert "all-boxes-degenerate" in [p.kind for p in report.errors]


# --------------------------------------------------------------------------- #
# flips
# --------------------------------------------------------------------------- #
def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


def test_flip_consistency(tmp_path: Path) -> None:
    data = _base()
    data["annotations"].append(_square_ann(18, 1, 2, x=0, y=1, w=4, h=6))
    img_dir, ann = _write(tmp_path, data)
    image, target = CocoInstances(img_dir, ann)[0]
    fimage, ftarget = hflip(image, target)
    assert torch.equal(fimage, image.flip(-1))
    assert ftarget["boxes"].tolist() == [[15.0, 4.0, 25.0, 12.0], [26.0, 1.0, 30.0, 7.0]]
    for mask, box in zip(ftarget["masks"], ftarget["boxes"]):
        assert _mask_box(mask) == box.tolist()  # mask and box flipped together
    image2, target2 = hflip(fimage, ftarget)
    assert torch.equal(image2, image)
    for key in ("boxes", "masks", "labels"):
        assert torch.equal(target2[key], target[key])
    assert target["boxes"].tolist()[0] == [5.0, 4.0, 15.0, 12.0]  # input not mutated


def test_random_flip_probability(tmp_path: Path) -> None:
    img_dir, ann = _write(tmp_path, _base())
    image, target = CocoInstances(img_dir, ann)[0]
    assert RandomHorizontalFlip(0.0)(image, target)[1]["boxes"].tolist() == [[5.0, 4.0, 15.0, 12.0]]
    assert RandomHorizontalFlip(1.0)(image, target)[1]["boxes"].tolist() == [[15.0, 4.0, 25.0, 12.0]]
    torch.manual_seed(0)
    flips = [RandomHorizontalFlip(0.5)(image, target)[1]["boxes"][0, 0].item() == 15.0 for _ in range(200)]
    assert 60 < sum(flips) < 140


# --------------------------------------------------------------------------- #
# validation: one-line errors naming file and record
# --------------------------------------------------------------------------- #
def _set(path: str, value: Any):
    """Mutation setting data[path] (dotted, ints index lists); value None deletes."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        key: Any = int(last) if last.isdigit() else last
        if value is None:
            del node[key]
        else:
            node[key] = value

    return mutate


CASES = [
    ("missing top-level key", _set("categories", None), r"missing top-level key\(s\) 'categories'"),
    ("unknown image", _set("annotations.0.image_id", 99), r"annotation id 17: image_id 99 not found in 'images'"),
    ("unknown category", _set("annotations.0.category_id", 4),
     r"annotation id 17 \(image 1\): category_id 4 not found in 'categories' \(valid ids: 1, 2\)"),
    ("bbox not 4 numbers", _set("annotations.0.bbox", [1, 2, 3]),
     r"annotation id 17 \(image 1\): bbox \[1, 2, 3\] is not 4 finite numbers"),
    ("bbox non-finite", _set("annotations.0.bbox", [1, 2, float("nan"), 3]),
     r"annotation id 17 \(image 1\): bbox \[1, 2, NaN, 3\] is not 4 finite numbers"),
    ("bbox string", _set("annotations.0.bbox", [1, 2, "3", 4]), r"annotation id 17 \(image 1\): bbox .* not 4 finite"),
    ("negative width", _set("annotations.0.bbox", [10, 5, -4, 8]),
     r"instances_test\.json: annotation id 17 \(image 1\): bbox \[10, 5, -4, 8\] has negative width"),
    ("negative height", _set("annotations.0.bbox", [10, 5, 4, -8]), r"annotation id 17 \(image 1\): .* negative height"),
    ("segmentation missing", _set("annotations.0.segmentation", None),
     r"annotation id 17 \(image 1\): missing 'segmentation'"),
    ("segmentation wrong type", _set("annotations.0.segmentation", "abc"),
     r"annotation id 17 \(image 1\): segmentation is a str; expected a list of polygons or an RLE dict"),
    ("flat polygon", _set("annotations.0.segmentation", [5, 4, 15, 4, 15, 12]),
     r"annotation id 17 \(image 1\): segmentation is a flat list of numbers"),
    ("short polygon", _set("annotations.0.segmentation", [[5, 4, 15, 4]]),
     r"annotation id 17 \(image 1\): segmentation polygon 0 has 4 coordinates"),
    ("odd polygon", _set("annotations.0.segmentation", [[5, 4, 15, 4, 15, 12, 5]]),
     r"annotation id 17 \(image 1\): segmentation polygon 0 has 7 coordinates"),
    ("non-numeric polygon", _set("annotations.0.segmentation", [[5, 4, 15, 4, 15, None]]),
     r"annotation id 17 \(image 1\): segmentation polygon 0 contains non-numeric"),
    ("RLE size mismatch", _set("annotations.0.segmentation", {"size": [W, H], "counts": "abc"}),
     r"annotation id 17 \(image 1\): RLE size \[30, 20\] \(height, width\) disagrees with the image's "
     r"height=20, width=30"),
    ("RLE bad counts", _set("annotations.0.segmentation", {"size": [H, W], "counts": [5, 5]}),
     r"annotation id 17 \(image 1\): uncompressed RLE counts sum to 10 but the image has 20x30=600 pixels"),
    ("image missing width", _set("images.0.width", None), r"image id 1 \('img1\.png'\): missing 'width'"),
    ("image bad height", _set("images.0.height", 0), r"image id 1 \('img1\.png'\): 'height' must be a positive integer"),
    ("duplicate annotation id", lambda d: d["annotations"].append(copy.deepcopy(d["annotations"][0])),
     r"annotation id 17: duplicate annotation id"),
    ("category without name", _set("categories.1.name", None), r"category id 2: 'name' must be a string"),
]


@pytest.mark.parametrize("mutate,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_errors(tmp_path: Path, mutate, pattern: str) -> None:
    data = _base()
    mutate(data)
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=r"instances_test\.json: " + pattern.removeprefix(r"instances_test\.json: ")) as info:
        CocoInstances(img_dir, ann)
    assert "\n" not in str(info.value)


def test_error_missing_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"nope\.json: annotation file not found"):
        CocoInstances(tmp_path / "images", tmp_path / "nope.json")


def test_error_not_json(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.json").write_text('{"images": [,]}')
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON \(.* line 1, column 13\)"):
        CocoInstances(tmp_path / "images", tmp_path / "bad.json")


def test_error_top_level_list(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"list\.json: top level is a list"):
        CocoInstances(tmp_path / "images", tmp_path / "list.json")


def test_error_image_file_missing(tmp_path: Path) -> None:
    img_dir, ann = _write(tmp_path, _base(), write_images=False)
    ds = CocoInstances(img_dir, ann)  # checked lazily
    with pytest.raises(DatasetError, match=r"instances_test\.json: image id 1: image file '.*img1\.png' not found"):
        ds[0]


def test_error_image_size_mismatch(tmp_path: Path) -> None:
    img_dir, ann = _write(tmp_path, _base())
    cv2.imwrite(str(img_dir / "img1.png"), np.zeros((W, H, 3), np.uint8))  # transposed
    with pytest.raises(DatasetError, match=r"image id 1 \('img1\.png'\): image on disk is 20x30 \(width x height\) "
                                           r"but the JSON says width=30, height=20"):
        CocoInstances(img_dir, ann)[0]


def test_error_empty_mask(tmp_path: Path) -> None:
    data = _base()
    # Normalised coordinates: the classic mistake; rasterises to nothing.
    data["annotations"][0]["segmentation"] = [[0.1, 0.1, 0.5, 0.1, 0.5, 0.4, 0.1, 0.4]]
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=r"instances_test\.json: annotation id 17 \(image 1\): segmentation "
                                           r"decodes to an empty mask"):
        CocoInstances(img_dir, ann)[0]


def test_sub_pixel_sliver_skipped(tmp_path: Path) -> None:
    data = _base()
    # A diagonal sliver inside its box that covers no pixel centre: valid, just empty.
    data["annotations"].append({"id": 18, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 0.5,
                                "segmentation": [[20, 2, 20.2, 2, 24.2, 6, 24, 6]], "bbox": [20, 2, 4.2, 4]})
    img_dir, ann = _write(tmp_path, data)
    _, target = CocoInstances(img_dir, ann)[0]
    assert target["labels"].tolist() == [1]


def test_error_all_boxes_degenerate(tmp_path: Path) -> None:
    data = _base()
    data["annotations"][0]["bbox"] = [0.1, 0.2, 0.3, 0.3]  # normalised box
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=r"instances_test\.json: all 1 annotations have boxes smaller than "
                                           r"min_box_size=1\.0 px \(e\.g\. annotation id 17 bbox"):
        CocoInstances(img_dir, ann)


def test_error_full_image_mask(tmp_path: Path) -> None:
    data = _base()
    data["annotations"][0]["segmentation"] = _uncompressed_rle(np.ones((H, W), np.uint8))
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=r"annotation id 17 \(image 1\): segmentation decodes to a mask "
                                           r"covering the whole image"):
        CocoInstances(img_dir, ann)[0]


def test_error_mask_outside_box(tmp_path: Path) -> None:
    data = _base()
    data["annotations"][0]["bbox"] = [20, 12, 8, 6]  # polygon is at x 5..15, y 4..12
    img_dir, ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=r"annotation id 17 \(image 1\): only 0 of the 80 mask pixels lie inside"):
        CocoInstances(img_dir, ann)[0]


def test_missing_iscrowd_and_area_filled(tmp_path: Path) -> None:
    data = _base()
    del data["annotations"][0]["iscrowd"], data["annotations"][0]["area"]
    img_dir, ann = _write(tmp_path, data)
    ds = CocoInstances(img_dir, ann)
    assert ds.coco.anns[17]["iscrowd"] == 0 and ds.coco.anns[17]["area"] == 80.0
    assert ds[0][1]["labels"].tolist() == [1]


# --------------------------------------------------------------------------- #
# subset
# --------------------------------------------------------------------------- #
def test_subset(tmp_path: Path) -> None:
    paths = generate_shapes(tmp_path / "shapes", num_train=10, num_val=0, image_size=64, seed=1)
    out = make_subset(paths["train_ann"], paths["train_images"], tmp_path / "sub", 4,
                      categories=["circle", "star"], seed=3)
    data = json.loads(out["ann"].read_text())
    assert len(data["images"]) == 4
    assert sorted(p.name for p in out["images"].iterdir()) == sorted(i["file_name"] for i in data["images"])
    assert [c["name"] for c in data["categories"]] == ["circle", "star"]
    kept = {i["id"] for i in data["images"]}
    assert data["annotations"] and all(a["image_id"] in kept and a["category_id"] in (1, 4)
                                       for a in data["annotations"])
    ds = CocoInstances(out["images"], out["ann"])
    assert len(ds) == 4 and ds.class_names == ["__background__", "circle", "star"]
    for i in range(len(ds)):
        ds[i]
    again = make_subset(paths["train_ann"], paths["train_images"], tmp_path / "sub2", 4,
                        categories=["circle", "star"], seed=3)
    assert again["ann"].read_text() == out["ann"].read_text()  # seeded


def test_subset_cli(tmp_path: Path) -> None:
    from maskrcnn.data.subset import _main

    paths = generate_shapes(tmp_path / "shapes", num_train=5, num_val=0, image_size=64, seed=2)
    _main(["--ann", str(paths["train_ann"]), "--images", str(paths["train_images"]),
           "--out", str(tmp_path / "sub"), "-n", "2"])
    assert len(json.loads((tmp_path / "sub" / "annotations.json").read_text())["images"]) == 2
    with pytest.raises(SystemExit, match=r"unknown category 'horse'"):
        _main(["--ann", str(paths["train_ann"]), "--images", str(paths["train_images"]),
               "--out", str(tmp_path / "sub3"), "-n", "2", "--categories", "horse"])
