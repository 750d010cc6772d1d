"""infer.py: a checkpoint on an image or a folder writes, per image, a picture with the detections drawn and a
JSON of the detections; bad input is a one-line error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

import infer
import train


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    common = ["--config", "configs/tiny.yaml", "--no-progress", "--set", f"train.output_dir={tmp}",
              "solver.max_iter=2", "train.eval_at_end=false"]
    full = train.main(["--stage", "full", "--name", "full"] + common)["checkpoint"]
    rpn = train.main(["--stage", "rpn", "--name", "rpn"] + common)["checkpoint"]
    return tmp, full, rpn


def _images(tmp_path, n=2):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted(Path("datasets/shapes-tiny/val").glob("*.png"))[:n]
    assert len(sources) == n
    for src in sources:
        shutil.copy(src, folder / src.name)
    (folder / "notes.txt").write_text("not an image")
    return folder, sources


def test_folder_writes_picture_and_json_per_image(checkpoints, tmp_path):
    _, full, _ = checkpoints
    folder, sources = _images(tmp_path)
    out = tmp_path / "out"
    records = infer.main(["--checkpoint", full, "--input", str(folder), "--out", str(out), "--score-thresh", "0"])
    assert [r["image"] for r in records] == [str(folder / s.name) for s in sources]
    assert sum(r["detections"] for r in records) > 0  # threshold 0: every detection of the model is kept
    for src in sources:
        image = cv2.imread(str(src))
        picture = cv2.imread(str(out / f"{src.stem}_det.png"))
        assert picture.shape == image.shape
        data = json.loads((out / f"{src.stem}_det.json").read_text())
        assert (data["height"], data["width"]) == image.shape[:2]
        for det in data["detections"]:
            x1, y1, x2, y2 = det["box_xyxy"]
            assert 0 <= x1 <= x2 <= image.shape[1] and 0 <= y1 <= y2 <= image.shape[0]
            assert 1 <= det["label"] <= 4 and 0 <= det["score"] <= 1 and det["class"]
            rle = dict(det["mask_rle"], counts=det["mask_rle"]["counts"].encode("ascii"))
            assert mask_util.decode(rle).shape == image.shape[:2]
    drawn = [r for r in records if r["detections"]][0]
    src = next(s for s in sources if str(folder / s.name) == drawn["image"])
    assert not np.array_equal(cv2.imread(drawn["picture"]), cv2.imread(str(src)))  # something is drawn


def test_single_image_and_threshold(checkpoints, tmp_path):
    _, full, _ = checkpoints
    folder, sources = _images(tmp_path, n=1)
    out = tmp_path / "out"
    (record,) = infer.main(["--checkpoint", full, "--input", str(folder / sources[0].name), "--out", str(out),
                            "--score-thresh", "1.01"])
    assert record["detections"] == 0
    assert json.loads((out / f"{sources[0].stem}_det.json").read_text())["detections"] == []


@pytest.mark.parametrize("case", ["missing-input", "empty-folder", "rpn-checkpoint", "missing-checkpoint"])
def test_bad_input_is_one_line(checkpoints, tmp_path, capsys, case):
    _, full, rpn = checkpoints
    folder, _ = _images(tmp_path, n=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = {"missing-input": ["--checkpoint", full, "--input", str(tmp_path / "nothing")],
            "empty-folder": ["--checkpoint", full, "--input", str(empty)],
            "rpn-checkpoint": ["--checkpoint", rpn, "--input", str(folder)],
            "missing-checkpoint": ["--checkpoint", str(tmp_path / "no.pth"), "--input", str(folder)]}[case]
    message = {"missing-input": f"error: input not found: {tmp_path / 'nothing'}",
               "empty-folder": f"error: {empty}: no images (",
               "rpn-checkpoint": f"error: {rpn} is an RPN-stage checkpoint; infer.py needs a full-stage one",
               "missing-checkpoint": f"error: checkpoint not found: {tmp_path / 'no.pth'}"}[case]
    with pytest.raises(SystemExit) as e:
        infer.main(argv + ["--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), (case, err)
    if case == "empty-folder":  # the suffixes it looked for
        assert ".png" in err and ".jpg" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_exif_rotated_photo_is_read_as_displayed(checkpoints, tmp_path):
    """A photo stored sideways with an EXIF orientation tag gives the detections of the image as displayed."""
    from PIL import Image

    _, full, _ = checkpoints
    folder, (src,) = _images(tmp_path, n=1)
    shown = cv2.cvtColor(cv2.imread(str(src)), cv2.COLOR_BGR2RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored turned 90 degrees clockwise; lossless PNG: the very same pixels
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(folder / "sideways.png", exif=exif.tobytes())
    out = tmp_path / "out"
    infer.main(["--checkpoint", full, "--input", str(folder), "--out", str(out), "--score-thresh", "0"])
    plain = json.loads((out / f"{src.stem}_det.json").read_text())
    turned = json.loads((out / "sideways_det.json").read_text())
    assert (turned["height"], turned["width"]) == shown.shape[:2] != shown.shape[1::-1]
    assert turned["detections"] and turned["detections"] == plain["detections"]
    assert np.array_equal(cv2.imread(str(out / "sideways_det.png")), cv2.imread(str(out / f"{src.stem}_det.png")))
