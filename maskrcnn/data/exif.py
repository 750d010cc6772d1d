"""EXIF orientation: read the tag from an encoded image and turn decoded pixels into the image as displayed.

A camera stores a portrait photo as landscape pixels plus an Orientation tag (EXIF 0x0112, values 1..8);
viewers, and annotation tools such as VIA and labelme, show it rotated or mirrored accordingly, so annotations
refer to the image as displayed.  detectron2's ``read_image`` applies the tag the same way.

The tag is read here rather than left to OpenCV: whether ``cv2.imdecode`` applies it depends on the flags
(``IMREAD_UNCHANGED`` never does), on the OpenCV version and, for PNG, on the libpng it was built with.
TIFF is the exception: OpenCV's TIFF decoder applies a TIFF's Orientation tag itself, whatever the flags
(tested with OpenCV 5.1), so :func:`exif_orientation` reports 1 for TIFF files.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["apply_orientation", "exif_orientation"]

_ORIENTATION_TAG = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"


def _jpeg_exif(data: memoryview) -> memoryview | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None  # lost sync: not a marker where one must be
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: metadata comes before
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == _EXIF_HEADER:  # APP1 (XMP is APP1 too)
            return data[pos + 10:pos + 2 + length]
        pos += 2 + length
    return None


def _png_exif(data: memoryview) -> memoryview | None:
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if kind == b"eXIf":  # may follow the image data: every chunk is looked at
            return data[pos + 8:pos + 8 + length]
        if kind == b"IEND":
            return None
        pos += 12 + length  # length, type, data, CRC
    return None


def _webp_exif(data: memoryview) -> memoryview | None:
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos:pos + 4] == b"EXIF":
            return data[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _tiff_orientation(block: bytes) -> int:
    """The Orientation entry of IFD0 of a TIFF-structured EXIF block, 1 when absent or malformed."""
    if block.startswith(_EXIF_HEADER):  # some writers keep JPEG's header in PNG / WebP too
        block = block[len(_EXIF_HEADER):]
    order = {b"II": "<", b"MM": ">"}.get(block[:2])
    if order is None or len(block) < 8:
        return 1
    ifd = struct.unpack(order + "I", block[4:8])[0]
    if ifd + 2 > len(block):
        return 1
    count = struct.unpack(order + "H", block[ifd:ifd + 2])[0]
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(block) - 11), 12):
        tag, kind = struct.unpack(order + "HH", block[entry:entry + 4])
        if tag == _ORIENTATION_TAG:
            if kind != 3:  # SHORT, as the standard says
                return 1
            value = struct.unpack(order + "H", block[entry + 8:entry + 10])[0]
            return value if 1 <= value <= 8 else 1
    return 1


def exif_orientation(data: bytes | np.ndarray) -> int:
    """The EXIF orientation (1..8) of an encoded JPEG, PNG or WebP image; 1 when it has none (or is another format).

    ``data`` is the file's bytes (or a uint8 array of them).  A malformed EXIF block counts as none, as
    viewers do: the file still decodes.
    """
    data = memoryview(data).cast("B")  # no copy of a whole file; slices are views too
    if data[:2] == b"\xff\xd8":
        block = _jpeg_exif(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        block = _png_exif(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        block = _webp_exif(data)
    else:
        return 1
    return _tiff_orientation(bytes(block)) if block else 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels ``[H, W, ...]`` -> the image as displayed under EXIF ``orientation`` (contiguous).

    2: mirrored left-right; 3: rotated 180 degrees; 4: mirrored top-bottom; 5: transposed (mirrored along
    the main diagonal); 6: to be turned 90 degrees clockwise; 7: transposed along the other diagonal;
    8: to be turned 90 degrees counter-clockwise.  5..8 swap height and width.
    """
    if orientation == 2:
        image = image[:, ::-1]
    elif orientation == 3:
        image = image[::-1, ::-1]
    elif orientation == 4:
        image = image[::-1]
    elif orientation == 5:
        image = image.swapaxes(0, 1)
    elif orientation == 6:
        image = np.rot90(image, -1)
    elif orientation == 7:
        image = image[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        image = np.rot90(image, 1)
    else:
        return image
    return np.ascontiguousarray(image)
