"""Converters to COCO JSON (label images, VIA, labelme, masks): outputs load in CocoInstances; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from maskrcnn.data.check import check_dataset_files
from maskrcnn.data.coco import CocoInstances, DatasetError
from maskrcnn.data.convert import label_images_to_coco, labelme_to_coco, main, via_to_coco

H, W = 20, 30


def _photo(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _targets_by_name(ds: CocoInstances, index: int = 0) -> dict[str, Any]:
    _, t = ds[index]
    return {"boxes": t["boxes"].tolist(), "names": [ds.class_names[k] for k in t["labels"].tolist()],
            "areas": t["masks"].flatten(1).sum(1).tolist(), "masks": t["masks"].numpy()}


# --------------------------------------------------------------------------- #
# label images
# --------------------------------------------------------------------------- #
def _label_case(tmp_path: Path, palette: bool = True) -> tuple[Path, Path]:
    images, labels = tmp_path / "PNGImages", tmp_path / "PedMasks"
    _photo(images / "FudanPed1.png")
    label = np.zeros((H, W), np.uint8)
    label[2:6, 3:9] = 1        # instance 1: 6 x 4
    label[10:15, 12:20] = 2    # instance 2: x 12..20, y 10..15
    labels.mkdir()
    im = Image.fromarray(label)
    if palette:  # PennFudan ships palette PNGs: values are palette indices, not colours
        im = im.convert("P")
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    im.save(labels / "FudanPed1_mask.png")
    return images, labels


def test_label_images_round_trip(tmp_path: Path) -> None:
    images, labels = _label_case(tmp_path)
    label_images_to_coco(images, labels, category="person", out_file=tmp_path / "ann.json")
    ds = CocoInstances(images, tmp_path / "ann.json")
    got = _targets_by_name(ds)
    assert got["boxes"] == [[3.0, 2.0, 9.0, 6.0], [12.0, 10.0, 20.0, 15.0]]
    assert got["areas"] == [24, 40] and got["names"] == ["person", "person"]
    expected = np.zeros((H, W), np.uint8)
    expected[10:15, 12:20] = 1
    assert np.array_equal(got["masks"][1], expected)
    assert check_dataset_files(tmp_path / "ann.json", images, progress=False).ok


def test_label_images_class_map_and_classes(tmp_path: Path) -> None:
    images, labels = _label_case(tmp_path, palette=False)
    data = label_images_to_coco(images, labels, class_map={"FudanPed1": {"1": "bike", "2": "person"}},
                                classes=["person", "bike"])
    assert data["categories"] == [{"id": 1, "name": "person", "supercategory": ""},
                                  {"id": 2, "name": "bike", "supercategory": ""}]
    assert [a["category_id"] for a in data["annotations"]] == [2, 1]
    with pytest.raises(DatasetError, match=r"FudanPed1_mask\.png: instance 1: class 'bike' is not in --classes "
                                           r"\(person\)"):
        label_images_to_coco(images, labels, class_map={"FudanPed1": {"1": "bike", "2": "person"}},
                             classes=["person"])
    with pytest.raises(DatasetError, match=r"FudanPed1_mask\.png: class map names instance '3' \('c'\) but the "
                                           r"label image has no pixel"):
        label_images_to_coco(images, labels, class_map={"FudanPed1": {"1": "a", "2": "b", "3": "c"}})


def test_label_images_errors(tmp_path: Path) -> None:
    images, labels = _label_case(tmp_path)
    Image.fromarray(np.ones((W, H), np.uint8)).save(labels / "FudanPed1_mask.png")  # transposed
    with pytest.raises(DatasetError, match=r"FudanPed1_mask\.png: label image is 20x30 \(width x height\) but "
                                           r"image FudanPed1\.png is 30x20") as e:
        label_images_to_coco(images, labels)
    assert "\n" not in str(e.value)
    Image.fromarray(np.ones((H, W), np.uint8)).save(labels / "Other_mask.png")
    with pytest.raises(DatasetError, match=r"Other_mask\.png: label image matches no photo"):
        label_images_to_coco(images, labels)


# --------------------------------------------------------------------------- #
# VIA
# --------------------------------------------------------------------------- #
def _via_region(xs: list[float], ys: list[float], **attrs: Any) -> dict[str, Any]:
    return {"shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
            "region_attributes": attrs}


def _via_case(tmp_path: Path, regions_b: Any = None) -> tuple[Path, Path]:
    images = tmp_path / "images"
    _photo(images / "a.jpg")
    _photo(images / "b.png", 40, 50)
    via = {
        "a.jpg1234": {"filename": "a.jpg", "size": 1234, "file_attributes": {},
                      "regions": [_via_region([5, 15, 15, 5], [4, 4, 12, 12], kind="cat"),
                                  {"shape_attributes": {"name": "rect", "x": 20, "y": 2, "width": 6, "height": 5},
                                   "region_attributes": {"kind": "dog"}}]},
        # VIA 1.x stores regions as a dict
        "b.png99": {"filename": "b.png", "regions": regions_b if regions_b is not None else
                    {"0": _via_region([10, 30, 10], [5, 5, 25], kind="dog")}},
    }
    (tmp_path / "via.json").write_text(json.dumps(via))
    return tmp_path / "via.json", images


def test_via_round_trip(tmp_path: Path) -> None:
    via, images = _via_case(tmp_path)
    data = via_to_coco(via, images, out_file=tmp_path / "ann.json")  # class key: the first attribute, "kind"
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    assert data["images"][1] == {"id": 2, "file_name": "b.png", "height": 40, "width": 50}
    ds = CocoInstances(images, tmp_path / "ann.json")
    got = _targets_by_name(ds, 0)
    assert got["names"] == ["cat", "dog"]
    assert got["boxes"] == [[5.0, 4.0, 15.0, 12.0], [20.0, 2.0, 26.0, 7.0]]
    assert got["areas"] == [80, 30]
    assert _targets_by_name(ds, 1)["boxes"] == [[10.0, 5.0, 30.0, 25.0]]
    assert check_dataset_files(tmp_path / "ann.json", images, progress=False).ok


def test_via_exif_rotated_photo(tmp_path: Path) -> None:
    """VIA shows a photo as displayed, EXIF orientation applied: sizes and regions are in that frame."""
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored W x H, displayed turned 90 degrees clockwise: H x W
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(images / "p.jpg", exif=exif.tobytes())
    # A region near the bottom of the displayed (portrait) image: outside the stored (landscape) frame.
    via = {"p": {"filename": "p.jpg", "regions": [_via_region([2, 12, 12, 2], [22, 22, 28, 28], kind="cat")]}}
    (tmp_path / "via.json").write_text(json.dumps(via))
    data = via_to_coco(tmp_path / "via.json", images, out_file=tmp_path / "ann.json")
    assert data["images"] == [{"id": 1, "file_name": "p.jpg", "height": W, "width": H}]
    assert _targets_by_name(CocoInstances(images, tmp_path / "ann.json"))["boxes"] == [[2.0, 22.0, 12.0, 28.0]]
    assert check_dataset_files(tmp_path / "ann.json", images, progress=False).ok


def test_label_image_exif_orientation_applied(tmp_path: Path) -> None:
    """A label image carrying an orientation tag is turned like its photo."""
    images, labels = _label_case(tmp_path, palette=False)
    stored = np.array(Image.open(labels / "FudanPed1_mask.png"))
    exif = Image.Exif()
    exif[0x0112] = 3  # 180 degrees, for both files
    for path, pixels in ((images / "FudanPed1.png", cv2.cvtColor(cv2.imread(str(images / "FudanPed1.png")),
                                                                 cv2.COLOR_BGR2RGB)),
                         (labels / "FudanPed1_mask.png", stored)):
        Image.fromarray(pixels).save(path, exif=exif.tobytes())
    data = label_images_to_coco(images, labels, category="person")
    boxes = sorted(a["bbox"] for a in data["annotations"])
    # Stored boxes x 3..9, y 2..6 and x 12..20, y 10..15 in a 30 x 20 image, turned 180 degrees.
    assert boxes == sorted([[W - 9, H - 6, 6, 4], [W - 20, H - 15, 8, 5]])


def test_via_errors(tmp_path: Path) -> None:
    via, images = _via_case(tmp_path, regions_b=[_via_region([1, 9], [1, 9], kind="dog")])
    with pytest.raises(DatasetError, match=r"via\.json: entry 'b\.png99' \('b\.png'\): region 0: polygon has 2 "
                                           r"point\(s\); at least 3 are needed"):
        via_to_coco(via, images)
    via, images = _via_case(tmp_path)
    with pytest.raises(DatasetError, match=r"entry 'a\.jpg1234' \('a\.jpg'\): region 1: class 'dog' is not in "
                                           r"--classes \(cat\)"):
        via_to_coco(via, images, classes=["cat"])
    with pytest.raises(DatasetError, match=r"region 0: region has no 'species' attribute"):
        via_to_coco(via, images, class_key="species")
    (images / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"via\.json: entry 'b\.png99': image file '.*b\.png' not found"):
        via_to_coco(via, images)


# --------------------------------------------------------------------------- #
# labelme
# --------------------------------------------------------------------------- #
def _labelme(tmp_path: Path, shapes: list[dict[str, Any]], **extra: Any) -> Path:
    folder = tmp_path / "labelme"
    _photo(folder / "img" / "x.png")
    doc = {"version": "5.0.1", "flags": {}, "shapes": shapes, "imagePath": "img/x.png",
           "imageData": None, "imageHeight": H, "imageWidth": W}
    doc.update(extra)
    (folder / "x.json").write_text(json.dumps(doc))
    return folder


def _shape(label: str, points: list[list[float]], kind: str = "polygon") -> dict[str, Any]:
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}


def test_labelme_round_trip(tmp_path: Path) -> None:
    folder = _labelme(tmp_path, [_shape("leaf", [[5, 4], [15, 4], [15, 12], [5, 12]]),
                                 _shape("bug", [[26, 7], [20, 2]], "rectangle"),
                                 _shape("ignored", [[1, 1]], "point")])
    with pytest.warns(UserWarning, match=r"shape 2 \('ignored', point\): shape type 'point' skipped"):
        data = labelme_to_coco(folder, out_file=tmp_path / "ann.json")
    assert data["images"] == [{"id": 1, "file_name": "img/x.png", "height": H, "width": W}]
    assert [c["name"] for c in data["categories"]] == ["bug", "leaf"]
    ds = CocoInstances(folder, tmp_path / "ann.json")
    got = _targets_by_name(ds)
    assert got["names"] == ["leaf", "bug"]
    assert got["boxes"] == [[5.0, 4.0, 15.0, 12.0], [20.0, 2.0, 26.0, 7.0]]
    assert got["areas"] == [80, 30]


def test_labelme_errors(tmp_path: Path) -> None:
    folder = _labelme(tmp_path, [_shape("leaf", [[5, 4], [15, 4]])])
    with pytest.raises(DatasetError, match=r"x\.json: shape 0 \('leaf', polygon\): polygon has 2 point\(s\); "
                                           r"at least 3 are needed"):
        labelme_to_coco(folder)
    folder = _labelme(tmp_path, [_shape("leaf", [[5, 4], [15, 4], [15, 12]])], imageHeight=99)
    with pytest.raises(DatasetError, match=r"x\.json: imageHeight is 99 but x\.png is 30x20"):
        labelme_to_coco(folder)
    folder = _labelme(tmp_path, [_shape("leaf", [[5, 4], [5.2, 4], [5.1, 4.1]])])
    with pytest.raises(DatasetError, match=r"shape 0 \('leaf', polygon\): empty instance"):
        labelme_to_coco(folder)
    folder = _labelme(tmp_path, [_shape("leaf", [[5, 4], [15, 4], [15, 12]])], imagePath="img/missing.png")
    with pytest.raises(DatasetError, match=r"x\.json: imagePath: image file '.*missing\.png' not found"):
        labelme_to_coco(folder)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = _label_case(tmp_path)
    out = tmp_path / "out.json"
    assert main(["label-images", "--images", str(images), "--labels", str(labels), "--category", "person",
                 "--out", str(out)]) == 0
    assert "1 images, 2 instances, categories ['person']" in capsys.readouterr().out
    assert main(["label-images", "--images", str(images), "--labels", str(labels), "--classes", "car",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "class 'object' is not in --classes (car)" in err and err.count("\n") == 1

    via, via_images = _via_case(tmp_path / "v")
    assert main(["via", "--ann", str(via), "--images", str(via_images), "--out", str(out)]) == 0
    assert len(CocoInstances(via_images, out)) == 2

    folder = _labelme(tmp_path, [_shape("leaf", [[5, 4], [15, 4], [15, 12]])])
    assert main(["labelme", "--input", str(folder), "--out", str(out)]) == 0
    assert len(CocoInstances(folder, out)) == 1

    # masks: routed to from_masks, same options
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((H, W), np.uint8)
    m[3:9, 4:12] = 255
    cv2.imwrite(str(masks / "FudanPed1_1.png"), m)
    assert main(["masks", "--images", str(images), "--masks", str(masks), "--category", "cell",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [4, 3, 8, 6]
