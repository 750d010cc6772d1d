"""Per-instance binary masks -> COCO JSON: round trip and one-line errors for bad masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from maskrcnn.data.coco import CocoInstances, DatasetError
from maskrcnn.data.from_masks import masks_to_coco
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.from_masks import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CocoInstances]:
    """Shapes images re-exported as images/ + one PNG per instance (both layouts, 0/255 and 0/1)."""
    root = tmp_path_factory.mktemp("from_masks")
    paths = generate_shapes(root / "shapes", num_train=3, num_val=0, image_size=(64, 80), seed=4)
    source = CocoInstances(paths["train_images"], paths["train_ann"])
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(len(source)):
        name = source.image_info(i)["file_name"]
        stem = Path(name).stem
        (images / name).write_bytes((paths["train_images"] / name).read_bytes())
        _, target = source[i]
        for k, (mask, label) in enumerate(zip(target["masks"].numpy(), target["labels"].tolist())):
            cls = source.class_names[label]
            if i == 0:  # folder layout, 0/1 values
                (masks / stem).mkdir(exist_ok=True)
                cv2.imwrite(str(masks / stem / f"{k}_{cls}.png"), mask)
            else:  # flat layout, 0/255 values
                cv2.imwrite(str(masks / f"{stem}_{k}_{cls}.png"), mask * 255)
    return images, masks, source


def test_round_trip(exported: tuple[Path, Path, CocoInstances], tmp_path: Path) -> None:
    images, masks, source = exported
    data = masks_to_coco(images, masks, out_file=tmp_path / "ann.json")
    assert json.loads((tmp_path / "ann.json").read_text()) == data
    assert [c["name"] for c in data["categories"]] == sorted(source.class_names[1:])
    ds = CocoInstances(images, tmp_path / "ann.json")
    assert len(ds) == len(source)
    for i in range(len(ds)):
        _, got = ds[i]
        _, want = source[i]
        assert got["masks"].shape == want["masks"].shape
        assert (got["masks"] == want["masks"]).all()
        assert (got["boxes"] == want["boxes"]).all()
        names = [ds.class_names[k] for k in got["labels"].tolist()]
        assert names == [source.class_names[k] for k in want["labels"].tolist()]


def _write_case(tmp_path: Path, mask: np.ndarray, image_shape: tuple[int, int] = (20, 30)) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.full((*image_shape, 3), 100, np.uint8))
    cv2.imwrite(str(masks / "a_1.png"), mask)
    return images, masks


def test_single_category(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[3:9, 4:12] = 255
    images, masks = _write_case(tmp_path, mask)
    data = masks_to_coco(images, masks, category="cell")
    assert data["categories"] == [{"id": 1, "name": "cell", "supercategory": ""}]
    assert data["images"] == [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}]
    (ann,) = data["annotations"]
    assert ann["bbox"] == [4, 3, 8, 6] and ann["area"] == 48 and ann["category_id"] == 1


def test_exif_rotated_photo_and_mask(tmp_path: Path) -> None:
    """Photos are read as displayed (EXIF orientation applied), masks by the same rule."""
    from PIL import Image

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 x 20, displayed 20 x 30
    Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(images / "a.jpg", exif=exif.tobytes())
    mask = np.zeros((30, 20), np.uint8)  # drawn on the displayed image
    mask[22:28, 2:12] = 255
    cv2.imwrite(str(masks / "a_1.png"), mask)
    exif[0x0112] = 3
    stored = np.zeros((30, 20), np.uint8)
    stored[2:8, 8:18] = 255  # the same region stored turned 180 degrees, with the tag saying so
    Image.fromarray(stored).save(masks / "a_2.png", exif=exif.tobytes())
    data = masks_to_coco(images, masks, category="cell")
    assert data["images"] == [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 20}]
    assert [a["bbox"] for a in data["annotations"]] == [[2, 22, 10, 6], [2, 22, 10, 6]]


def test_colour_mask_error(tmp_path: Path) -> None:
    mask = np.zeros((20, 30, 3), np.uint8)
    mask[2:8, 2:8] = (0, 0, 255)  # a red instance and a green one in one label image
    mask[10:15, 10:20] = (0, 255, 0)
    images, masks = _write_case(tmp_path, mask)
    with pytest.raises(DatasetError, match=r"a_1\.png: mask is a 3-channel colour image with 3 distinct colours "
                                           r"\(e\.g\. RGB \(0, 0, 0\), .*\); expected one single-channel binary mask") as e:
        masks_to_coco(images, masks)
    assert "\n" not in str(e.value)


def test_grey_saved_as_rgb_is_accepted(tmp_path: Path) -> None:
    mask = np.zeros((20, 30, 3), np.uint8)
    mask[2:8, 2:8] = 255
    images, masks = _write_case(tmp_path, mask)
    assert masks_to_coco(images, masks)["annotations"][0]["area"] == 36


def test_non_binary_mask_error(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 2:8] = 1
    mask[10:15, 10:20] = 2  # a label map, not a binary mask
    images, masks = _write_case(tmp_path, mask)
    with pytest.raises(DatasetError, match=r"a_1\.png: mask has 3 distinct values \(0, 1, 2\); expected a binary mask"):
        masks_to_coco(images, masks)


def test_size_mismatch_error(tmp_path: Path) -> None:
    mask = np.zeros((30, 20), np.uint8)
    mask[2:8, 2:8] = 255
    images, masks = _write_case(tmp_path, mask)
    with pytest.raises(DatasetError, match=r"a_1\.png: mask is 20x30 \(width x height\) but image a\.jpg is 30x20"):
        masks_to_coco(images, masks)


def test_empty_mask_error(tmp_path: Path) -> None:
    images, masks = _write_case(tmp_path, np.zeros((20, 30), np.uint8))
    with pytest.raises(DatasetError, match=r"a_1\.png: mask is empty"):
        masks_to_coco(images, masks)


def test_unmatched_mask_and_image_without_masks(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 2:8] = 255
    images, masks = _write_case(tmp_path, mask)
    cv2.imwrite(str(images / "b.png"), np.zeros((20, 30, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"b\.png: no masks found"):
        data = masks_to_coco(images, masks)
    assert len(data["images"]) == 2 and len(data["annotations"]) == 1
    cv2.imwrite(str(masks / "c_1.png"), mask)
    with pytest.raises(DatasetError, match=r"c_1\.png: mask name does not match any image"):
        masks_to_coco(images, masks)


def test_longest_stem_wins(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 2:8] = 255
    images, masks = _write_case(tmp_path, mask)  # a.jpg with a_1.png
    cv2.imwrite(str(images / "a_1.png"), np.zeros((20, 30, 3), np.uint8))
    cv2.imwrite(str(masks / "a_1_3.png"), mask)  # instance 3 of image "a_1", not class "3" of "a"
    data = masks_to_coco(images, masks, category="x")
    by_file = {i["id"]: i["file_name"] for i in data["images"]}
    assert sorted(by_file[a["image_id"]] for a in data["annotations"]) == ["a.jpg", "a_1.png"]
    assert [c["name"] for c in data["categories"]] == ["x"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 2:8] = 1
    images, masks = _write_case(tmp_path, mask)
    main(["--images", str(images), "--masks", str(masks), "--category", "cell", "--out", str(tmp_path / "o.json")])
    assert "1 images, 1 instances" in capsys.readouterr().out
    cv2.imwrite(str(masks / "a_2.png"), np.full((20, 30), 7, np.uint8))
    with pytest.raises(SystemExit, match=r"error: .*a_2\.png: mask has 1 distinct values \(7\)"):
        main(["--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "o.json")])
