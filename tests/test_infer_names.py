"""infer.py's output names: images of one folder that share a stem (photo.jpg, photo.png) write outputs of their
own instead of replacing each other's; names that would still clash are an error before any work."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest

import infer
import train
from infer import output_stems


def test_unique_stems_keep_their_names():
    assert output_stems([Path("a/x.png"), Path("a/y.jpg")]) == ["x", "y"]


def test_shared_stems_keep_their_extension():
    images = [Path("f/photo.jpg"), Path("f/photo.png"), Path("f/Photo.TIF"), Path("f/other.png")]
    assert output_stems(images) == ["photo-jpg", "photo-png", "Photo-TIF", "other"]


def test_names_that_still_clash_are_an_error():
    with pytest.raises(ValueError, match="photo.jpg and .*photo.JPG would both write photo-JPG_det.png"):
        output_stems([Path("f/photo.jpg"), Path("f/photo.JPG")])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer-names")
    return train.main(["--config", "configs/tiny.yaml", "--no-progress", "--stage", "full", "--name", "full",
                       "--set", f"train.output_dir={tmp}", "solver.max_iter=1", "train.eval_at_end=false"])["checkpoint"]


def test_photo_jpg_and_png_both_kept(checkpoint, tmp_path):
    src = sorted(Path("datasets/shapes-tiny/val").glob("*.png"))[0]
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(src, folder / "photo.png")
    cv2.imwrite(str(folder / "photo.jpg"), cv2.imread(str(src)))
    out = tmp_path / "out"
    records = infer.main(["--checkpoint", checkpoint, "--input", str(folder), "--out", str(out), "--device", "cpu",
                          "--score-thresh", "0"])
    assert sorted(p.name for p in out.iterdir()) == ["photo-jpg_det.json", "photo-jpg_det.png",
                                                     "photo-png_det.json", "photo-png_det.png"]
    for ext in ("jpg", "png"):
        assert json.loads((out / f"photo-{ext}_det.json").read_text())["image"] == str(folder / f"photo.{ext}")
    assert sorted(r["picture"] for r in records) == [str(out / "photo-jpg_det.png"), str(out / "photo-png_det.png")]


def test_clash_is_one_line_before_any_work(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("photo.jpg", "photo.JPG"):
        (folder / name).write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        infer.main(["--checkpoint", checkpoint, "--input", str(folder), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "rename one" in err[0]
    assert not out.exists()
