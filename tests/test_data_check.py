"""Up-front dataset check: every problem counted by kind, the same rules as training, exit codes."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest

from maskrcnn.data.coco import CocoInstances, DatasetError
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.check import check_coco_data, check_dataset_files, main
from maskrcnn.data.rules import scan_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_shapes(tmp_path_factory.mktemp("check") / "shapes", num_train=6, num_val=0,
                           image_size=(48, 64), seed=3)


def _copy(shapes: dict[str, Path], tmp_path: Path) -> tuple[dict[str, Any], Path, Path]:
    images = tmp_path / "images"
    shutil.copytree(shapes["train_images"], images)
    return json.loads(shapes["train_ann"].read_text()), tmp_path / "ann.json", images


def test_clean_shapes_exit_0(shapes: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = check_dataset_files(shapes["train_ann"], shapes["train_images"], workers=2, progress=False)
    assert report.ok and report.errors == [] and report.images_checked == 6
    assert main([str(shapes["train_ann"]), str(shapes["train_images"]), "--quiet"]) == 0
    assert "OK: no errors" in capsys.readouterr().out
    assert main([str(shapes["train_ann"]), "--no-images"]) == 0


def test_missing_paths_exit_2(shapes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.json"), str(shapes["train_images"])]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.json'}: annotation file not found\n"
    assert main([str(shapes["train_ann"]), str(tmp_path / "nodir")]) == 2
    assert main([str(shapes["train_ann"])]) == 2  # IMAGES needed unless --no-images
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def _first(data: dict[str, Any], image_index: int) -> dict[str, Any]:
    """The first annotation of images[image_index]."""
    iid = data["images"][image_index]["id"]
    return next(a for a in data["annotations"] if a["image_id"] == iid)


def _inject(data: dict[str, Any], images: Path) -> None:
    """One or more problems of each kind, in different images/records."""
    im = data["images"]
    (images / im[0]["file_name"]).write_bytes(b"not an image")                          # image-unreadable
    cv2.imwrite(str(images / im[1]["file_name"]), np.zeros((10, 12, 3), np.uint8))     # image-size-mismatch
    (images / im[2]["file_name"]).unlink()                                              # image-missing
    a = _first(data, 3)
    a["bbox"] = [im[3]["width"] + 5, 2, 10, 10]                                          # degenerate (outside)
    a = _first(data, 4)
    a["segmentation"] = [[1, 2, 3, 4]]                                                   # segmentation-malformed
    data["annotations"][-1]["category_id"] = 99                                          # unknown-category-id
    data["annotations"][-2]["category_id"] = 77                                          # unknown-category-id
    data["annotations"].append(copy.deepcopy(data["annotations"][0]))                   # duplicate-annotation-id
    data["images"].append(dict(im[5]))                                                   # duplicate-image-id


def test_injected_problems_counted(shapes: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    data, ann, images = _copy(shapes, tmp_path)
    _inject(data, images)
    ann.write_text(json.dumps(data))
    report = check_dataset_files(ann, images, workers=2, progress=False)
    counts = {kind: n for (_, kind), n in report.counts().items()}
    assert counts["image-unreadable"] == 1
    assert counts["image-size-mismatch"] == 1
    assert counts["image-missing"] == 1
    assert counts["degenerate-box"] == 1
    assert counts["segmentation-malformed"] == 1
    assert counts["unknown-category-id"] == 2
    assert counts["duplicate-annotation-id"] == 1
    assert counts["duplicate-image-id"] == 1
    assert not report.ok
    assert {p.severity for p in report.problems if p.kind == "degenerate-box"} == {"warning"}
    for p in report.problems:
        assert "\n" not in p.message and p.message.startswith(str(ann) + ": ")
    msgs = [p.message for p in report.errors]
    assert any("category_id 99 not found in 'categories'" in m for m in msgs)
    assert any(m.endswith("image on disk is 12x10 (width x height) but the JSON says width="
                          f"{data['images'][1]['width']}, height={data['images'][1]['height']}") for m in msgs)

    assert main([str(ann), str(images), "--quiet", "--examples", "1"]) == 1
    out = capsys.readouterr().out
    assert "error unknown-category-id: 2" in out and "... and 1 more" in out and "FAILED:" in out
    # The quick pass sees the JSON problems only.
    quick = check_dataset_files(ann, None)
    assert {p.kind for p in quick.problems}.isdisjoint({"image-unreadable", "image-missing", "image-size-mismatch"})
    assert {"unknown-category-id", "duplicate-image-id"} <= {p.kind for p in quick.problems}


Mutation = Callable[[dict[str, Any], Path], None]


def _bad_image(data: dict[str, Any], images: Path) -> None:
    (images / data["images"][0]["file_name"]).write_bytes(b"\x89PNG broken")


def _bbox(value: list[float]) -> Mutation:
    def mutate(data: dict[str, Any], images: Path) -> None:
        _first(data, 0)["bbox"] = value
    return mutate


def _empty_mask(data: dict[str, Any], images: Path) -> None:
    _first(data, 0)["segmentation"] = [[0.1, 0.1, 0.5, 0.1, 0.5, 0.4]]  # normalised polygon


SAME_RULES: list[tuple[str, Mutation]] = [
    ("image-unreadable", _bad_image),
    ("bbox-negative-size", _bbox([1, 2, -3, 4])),
    ("bbox-malformed", _bbox([1, 2, 3])),
    ("mask-empty", _empty_mask),
    ("unknown-image-id", lambda d, i: _first(d, 0).update(image_id=12345)),
]


@pytest.mark.parametrize("kind,mutate", SAME_RULES, ids=[k for k, _ in SAME_RULES])
def test_training_stops_on_the_reported_error(shapes: dict[str, Path], tmp_path: Path, kind: str,
                                              mutate: Mutation) -> None:
    """What training raises is the checker's first error of that kind, word for word."""
    data, ann, images = _copy(shapes, tmp_path)
    mutate(data, images)
    ann.write_text(json.dumps(data))
    report = check_dataset_files(ann, images, workers=1, progress=False)
    assert [p.kind for p in report.errors] == [kind]
    with pytest.raises(DatasetError) as e:
        ds = CocoInstances(images, ann)
        for k in range(len(ds)):
            ds[k]
    assert str(e.value) == report.errors[0].message


def test_warnings_are_what_training_repairs(shapes: dict[str, Path], tmp_path: Path) -> None:
    data, ann, images = _copy(shapes, tmp_path)
    w, h = data["images"][0]["width"], data["images"][0]["height"]
    _first(data, 0)["bbox"] = [-20, -20, w + 40, h + 40]  # clipped to the image by training
    data["images"].append(dict(data["images"][1], id=999))  # no instance, same file
    ann.write_text(json.dumps(data))
    report = check_dataset_files(ann, images, workers=2, progress=False)
    assert report.ok
    assert {p.kind for p in report.warnings} == {"bbox-clipped", "image-without-instances", "duplicate-file-name"}
    ds = CocoInstances(images, ann)  # trains: no error
    for k in range(len(ds)):
        ds[k]
    assert 999 not in ds.image_ids


def test_json_level_problems_and_fast_path_agrees_with_rules(shapes: dict[str, Path]) -> None:
    """The vectorised screen flags every record the per-record rules flag (same problems, same order)."""
    data = json.loads(shapes["train_ann"].read_text())
    anns = data["annotations"]
    anns[0]["bbox"] = [1, 2, float("nan"), 3]
    anns[1]["iscrowd"] = 2
    anns[2]["area"] = float("inf")
    anns[3]["segmentation"] = {"size": [1, 2], "counts": "abc"}
    anns[4]["image_id"] = 777
    anns[5]["bbox"] = [0.1, 0.1, 0.2, 0.2]  # degenerate: warning
    anns[6]["id"] = anns[7]["id"]
    del anns[8]["segmentation"]
    data["categories"].append(dict(data["categories"][0]))
    fast = scan_coco(data, "x.json")
    slow = scan_coco(data, "x.json", _slow=True)
    assert fast.problems == slow.problems and fast.bad_annotations == slow.bad_annotations
    kinds = [p.kind for p in fast.problems]
    for kind in ("bbox-malformed", "annotation-malformed", "segmentation-malformed", "unknown-image-id",
                 "degenerate-box", "duplicate-annotation-id", "duplicate-category-id"):
        assert kind in kinds
    assert kinds.count("annotation-malformed") == 2 and kinds.count("segmentation-malformed") == 2
    # A value of an unusual type (a string id) takes the unscreened path and still reports everything else.
    anns[9]["id"] = "x"
    assert len(scan_coco(data, "x.json").problems) == len(fast.problems) + 1


def test_all_boxes_degenerate_and_bad_json(tmp_path: Path) -> None:
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.1, 0.1, 0.3, 0.3],
                             "segmentation": [[0.1, 0.1, 0.4, 0.1, 0.4, 0.4]], "area": 0.05, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}]}
    report = check_coco_data(data, "a.json", None)
    assert [p.kind for p in report.errors] == ["all-boxes-degenerate"]
    assert report.errors[0].message.startswith("a.json: all 1 annotations have boxes smaller than min_box_size")
    (tmp_path / "bad.json").write_text("{")
    report = check_dataset_files(tmp_path / "bad.json", None)
    assert [p.kind for p in report.errors] == ["json-invalid"] and "not valid JSON" in report.summary()


@pytest.mark.parametrize("bad_id", [[1], {"a": 1}])
def test_unhashable_image_id_is_one_error(shapes: dict[str, Path], tmp_path: Path, bad_id: Any) -> None:
    """An image id that is a list or an object is one malformed-record error, for the check and the dataset
    (it used to crash the scan with a TypeError)."""
    data, ann, images = _copy(shapes, tmp_path)
    data["images"][2]["id"] = bad_id
    report = check_coco_data(copy.deepcopy(data), "ann.json", images, workers=1, progress=False)
    malformed = [p.message for p in report.errors if p.kind == "image-record-malformed"]
    assert malformed == [f"ann.json: images[2]: 'id' must be an integer, got {json.dumps(bad_id)}"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"images\[2\]: 'id' must be an integer"):
        CocoInstances(images, ann)
