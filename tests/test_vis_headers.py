"""Picture headers fit the picture and hide nothing: a long header on a narrow picture is wrapped (a word too
wide is shrunk, then cut) inside the picture's width, and the header of the `rois`, `detections` and `dataset`
pictures sits in a band above the image, so the label of an object at the top edge stays as drawn."""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import torch

from maskrcnn.vis import panels, views
from maskrcnn.vis import primitives as vis

LONG = "sampled 32 positive (GT colour), 96 negative (red) from 1000 proposals + GT"


def _image(h=90, w=70, value=120) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_long_header_on_a_narrow_image_fits_and_covers_nothing():
    img = _image()
    out = vis.header(img, ["300 proposals + GT", LONG])
    band = out[: out.shape[0] - img.shape[0]]
    assert out.shape[1] == img.shape[1] and (out[band.shape[0]:] == img).all()  # the image as it was
    assert band.shape[0] >= 4 * vis.LINE_HEIGHT  # wrapped onto several lines
    text = (np.abs(band.astype(int) - np.array(vis.HEADER_BACKGROUND)).sum(-1) > 60)
    assert text.any() and not text[:, -2:].any()  # nothing reaches (let alone crosses) the right edge
    rows = np.nonzero(text.any(1))[0]
    assert rows.max() < band.shape[0] - 1  # nor the bottom of the band


def test_a_word_wider_than_the_picture_is_shrunk_then_cut():
    fitted = vis._fit_lines(["ab", "a" * 8, "b" * 60], [None, None, None], 48)
    assert [t for t, _, _ in fitted][:2] == ["ab", "a" * 8] and fitted[0][2] == vis.FONT_SCALE
    assert vis.MIN_FONT_SCALE <= fitted[1][2] < vis.FONT_SCALE  # shrunk, whole
    assert fitted[2][2] == vis.MIN_FONT_SCALE and fitted[2][0].endswith("..")  # shrunk as far as it goes, cut
    assert all(cv2.getTextSize(t, vis.FONT, sc, 1)[0][0] + 2 <= 48 for t, _, sc in fitted)


def test_caption_legends_wrap_inside_the_picture():
    img = _image(w=60)
    out = vis.caption(img, [LONG, "positive 3"], colours=[vis.POSITIVE_COLOUR, vis.NEGATIVE_COLOUR])
    assert out.shape == img.shape
    fitted = vis._fit_lines([LONG], [None], 60 - vis.LINE_HEIGHT - 4)
    assert len(fitted) > 2 and all(cv2.getTextSize(t, vis.FONT, sc, 1)[0][0] <= 60 for t, _, sc in fitted)


def _top_edge_target():
    boxes = torch.tensor([[5.0, 0.0, 60.0, 40.0], [10.0, 50.0, 40.0, 85.0]])
    return boxes, torch.tensor([1, 2])


def test_detections_header_leaves_the_top_label_visible():
    img = _image()
    boxes, labels = _top_edge_target()
    det = {"boxes": boxes, "labels": labels, "scores": torch.tensor([0.9, 0.8])}
    drawn = panels.draw_detections(img, det, ["bg", "circle", "square"], 0.5)
    picture = views.detections_view(img, det, ["bg", "circle", "square"], 0.5).picture
    assert picture.shape[1] == img.shape[1] and picture.shape[0] > img.shape[0]
    assert (picture[-img.shape[0]:] == drawn).all()  # every label pixel as drawn, none under the header


def test_rois_header_leaves_the_top_label_visible():
    img = _image(w=64)
    boxes, labels = _top_edge_target()
    record = {"images": [torch.from_numpy(img).permute(2, 0, 1).float() / 255],
              "targets": [{"boxes": boxes, "labels": labels}], "proposals": [{"boxes": torch.zeros(300, 4)}],
              "roi_samples": [{"boxes": torch.cat([boxes, torch.tensor([[30.0, 30, 50, 60]])]),
                               "labels": torch.tensor([1, 2, 0]), "matched_idx": torch.tensor([0, 1, 0])}]}
    heads = SimpleNamespace(add_gt_as_proposals=True, matcher=SimpleNamespace(high=0.5),
                            sampler=SimpleNamespace(batch_size_per_image=512, positive_fraction=0.25))
    view = views.rois_view(record, 0, SimpleNamespace(roi_heads=heads), ["bg", "circle", "square"])
    s = record["roi_samples"][0]
    drawn = panels.draw_sampled_rois(img, s["boxes"], s["labels"], s["matched_idx"], boxes, ["bg", "circle",
                                     "square"], labels)
    assert view.picture.shape[1] == img.shape[1] and (view.picture[-img.shape[0]:] == drawn).all()
    band = view.picture[: -img.shape[0]]
    text = np.abs(band.astype(int) - np.array(vis.HEADER_BACKGROUND)).sum(-1) > 60
    assert text.any() and not text[:, -2:].any()
