"""EXIF orientation: every reader returns the image as displayed, and the data check compares that size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from maskrcnn.data.check import check_dataset_files
from maskrcnn.data.coco import CocoInstances, DatasetError, read_image
from maskrcnn.data.exif import exif_orientation

# Stored HxW; sizes differ so that a 90-degree turn shows in the shape.
H, W = 24, 40


def displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF standard's meaning of each value, written independently of maskrcnn.data.exif."""
    return {1: stored, 2: np.fliplr(stored), 3: np.rot90(stored, 2), 4: np.flipud(stored),
            5: np.rot90(stored, 1)[::-1], 6: np.rot90(stored, -1), 7: np.rot90(stored, -1)[::-1],
            8: np.rot90(stored, 1)}[orientation]


def _pixels(seed: int = 0) -> np.ndarray:
    # 8x8 blocks: JPEG keeps them, so a wrong turn cannot pass as compression noise.
    blocks = np.random.default_rng(seed).integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), np.uint8))


def _save(path: Path, rgb: np.ndarray, orientation: int | None) -> Path:
    """Write ``rgb`` (stored pixels) with an EXIF Orientation tag (none for None); format from the suffix."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    fmt = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF"}[path.suffix]
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(rgb).save(path, fmt, exif=exif.tobytes(), **options)
    return path


def _little_endian_exif(orientation: int) -> bytes:
    """A hand-made Intel-order TIFF block with one IFD entry: Orientation, SHORT, count 1."""
    return (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
            + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0))


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_returns_the_displayed_image(tmp_path: Path, suffix: str, orientation: int) -> None:
    stored = _pixels()
    tagged = read_image(_save(tmp_path / f"tagged{suffix}", stored, orientation))
    # The same pixels without a tag, through the same codec: JPEG's decoded pixels, exactly.
    plain = read_image(_save(tmp_path / f"plain{suffix}", stored, None))
    if suffix != ".jpg":
        assert np.array_equal(plain, stored)
    assert tagged.shape == (W, H, 3) if orientation >= 5 else (H, W, 3)
    assert np.array_equal(tagged, displayed(plain, orientation))
    # Pillow's exif_transpose, which detectron2's reader follows, agrees.
    with Image.open(tmp_path / f"tagged{suffix}") as im:
        assert np.array_equal(tagged, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


@pytest.mark.parametrize("orientation", [3, 2, 6])
def test_hand_made_app1_segment(tmp_path: Path, orientation: int) -> None:
    stored = _pixels(1)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR))
    assert ok
    block = b"Exif\x00\x00" + _little_endian_exif(orientation)
    app1 = b"\xff\xe1" + struct.pack(">H", len(block) + 2) + block
    jpeg = jpeg.tobytes()
    (tmp_path / "plain.jpg").write_bytes(jpeg)
    (tmp_path / "tagged.jpg").write_bytes(jpeg[:2] + app1 + jpeg[2:])  # right after SOI
    assert exif_orientation((tmp_path / "tagged.jpg").read_bytes()) == orientation
    assert np.array_equal(read_image(tmp_path / "tagged.jpg"), displayed(read_image(tmp_path / "plain.jpg"), orientation))


def test_no_or_broken_exif_reads_as_stored() -> None:
    ok, png = cv2.imencode(".png", _pixels())
    assert exif_orientation(png) == 1
    for block in (b"", b"II*\x00", b"MM\x00*\x00\x00\x00\xff", _little_endian_exif(9), _little_endian_exif(0)):
        jpeg = b"\xff\xd8\xff\xe1" + struct.pack(">H", len(block) + 8) + b"Exif\x00\x00" + block + b"\xff\xd9"
        assert exif_orientation(jpeg) == 1
    assert exif_orientation(b"BM" + bytes(60)) == 1


# --------------------------------------------------------------------------- #
# dataset and data check
# --------------------------------------------------------------------------- #
def _coco(tmp_path: Path, orientation: int, size: tuple[int, int]) -> tuple[Path, Path, np.ndarray]:
    """One photo stored with ``orientation``; the JSON gives ``size`` (width, height) and one square
    annotated on the displayed image, at x 4..12, y 2..10."""
    images = tmp_path / "images"
    images.mkdir()
    stored = _pixels(2)
    _save(images / "photo.jpg", stored, orientation)
    w, h = size
    ann = {"images": [{"id": 1, "file_name": "photo.jpg", "width": w, "height": h}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 64,
                            "bbox": [4, 2, 8, 8], "segmentation": [[4, 2, 12, 2, 12, 10, 4, 10]]}],
           "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return images, path, stored


@pytest.mark.parametrize("orientation", [3, 2, 6])  # 180 degrees, a mirror, 90 degrees
def test_dataset_gives_the_displayed_image(tmp_path: Path, orientation: int) -> None:
    size = (H, W) if orientation >= 5 else (W, H)
    images, ann, stored = _coco(tmp_path, orientation, size)
    image, target = CocoInstances(images, ann)[0]
    got = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert got.shape[:2] == (size[1], size[0]) and target["orig_size"] == (size[1], size[0])
    # The stored pixels as decoded: the same JPEG without its tag, read by OpenCV directly.
    plain = cv2.imread(str(_save(tmp_path / "plain.jpg", stored, None)), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(got, displayed(cv2.cvtColor(plain, cv2.COLOR_BGR2RGB), orientation))
    assert target["masks"].shape[1:] == got.shape[:2] and target["boxes"].tolist() == [[4.0, 2.0, 12.0, 10.0]]
    assert check_dataset_files(ann, images, progress=False).ok


def test_data_check_compares_the_displayed_size(tmp_path: Path) -> None:
    # A JSON written from the stored pixels of a photo displayed turned by 90 degrees.
    images, ann, _ = _coco(tmp_path, 6, (W, H))
    report = check_dataset_files(ann, images, progress=False)
    (problem,) = [p for p in report.problems if p.kind == "image-size-mismatch"]
    assert f"image on disk is {H}x{W} (width x height) but the JSON says width={W}, height={H}" in problem.message
    assert "EXIF orientation 6 turns it by 90 degrees" in problem.message
    with pytest.raises(DatasetError, match="EXIF orientation 6"):
        CocoInstances(images, ann)[0]
