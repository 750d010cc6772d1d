"""The probe's look inside the stages (maskrcnn.model.mask_rcnn.probe with configs/tiny.yaml): the RPN's deltas,
its pre-NMS top-k and the matched boxes of its anchors, the box head's refinement step by step, the mask
logits and the detections before the paste; each checked against what forward returns."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.model.build import build_model
from maskrcnn.model.postprocess import postprocess_detections

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["model.transform.min_size_test=64", "model.transform.max_size_test=96",
         # an untrained head scores every class about 1 / (K + 1): a low threshold keeps detections to follow
         "model.roi_heads.score_thresh=0.2", "model.roi_heads.detections_per_image=5"]
SIZES = [(80, 110), (100, 70)]


@pytest.fixture(scope="module")
def probed():
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, SMALL)).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in SIZES]
    targets = []
    for h, w in SIZES:
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, 10:50, 20:60] = 1
        targets.append({"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1]),
                        "masks": masks})
    with torch.no_grad():
        expected = model(images)
    return model, model.probe(images, targets), expected


def test_rpn_deltas_and_pre_nms_top_k(probed):
    model, rec, _ = probed
    rpn = model.rpn
    assert [tuple(d.shape) for d in rec["rpn_deltas"]] == [(2, len(a), 4) for a in rec["anchors"]]
    anchors = torch.cat(rec["anchors"])
    deltas, logits = torch.cat(rec["rpn_deltas"], 1), torch.cat(rec["objectness"], 1)
    for i, pre in enumerate(rec["pre_nms"]):
        k = sum(min(rpn.pre_nms_topk[1], len(a)) for a in rec["anchors"])
        assert len(pre["boxes"]) == len(pre["scores"]) == len(pre["anchor_index"]) == k
        idx = pre["anchor_index"]
        assert torch.equal(pre["scores"], logits[i, idx])  # the anchors' own logits
        h, w = rec["image_sizes"][i]
        decoded = rpn.box_coder.decode(deltas[i, idx], anchors[idx])
        decoded[:, 0::2] = decoded[:, 0::2].clamp(0, w)
        decoded[:, 1::2] = decoded[:, 1::2].clamp(0, h)
        torch.testing.assert_close(pre["boxes"], decoded)
        # every proposal is one of the pre-NMS boxes
        props = rec["proposals"][i]["boxes"]
        assert len(props) <= k and (props[:, None] == pre["boxes"][None]).all(-1).any(1).all()
    matched = rec["anchor_matched_boxes"]
    pos = rec["anchor_labels"] == 1
    for i, target in enumerate(rec["targets"]):  # one object per image: every positive is matched with it
        assert pos[i].any() and (matched[i][pos[i]] == target["boxes"][0]).all()


def test_box_refinement_steps_end_at_the_detections(probed):
    model, rec, expected = probed
    head = model.roi_heads.box_head
    k = head.num_classes
    for i, ref in enumerate(rec["box_refinement"]):
        steps = ref["steps"]
        assert list(steps) == ["class_boxes", "score_threshold", "nms", "top_k"]
        p = len(ref["proposals"])
        assert torch.equal(ref["proposals"], rec["proposals"][i]["boxes"])
        assert ref["class_logits"].shape == (p, k + 1) and ref["box_deltas"].shape == (p, 4 * (k + 1))
        counts = [len(s["boxes"]) for s in steps.values()]
        assert counts[0] == p * k and counts == sorted(counts, reverse=True), counts
        assert (steps["score_threshold"]["scores"] > head.score_thresh).all()
        assert counts[-1] == min(counts[2], head.detections_per_image) and counts[-1] > 0
        det = rec["detections"][i]
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(steps["top_k"][key], det[key])
        # each detection's box is its proposal's box for its class
        top = steps["top_k"]
        cls = steps["class_boxes"]
        assert torch.equal(cls["boxes"][top["roi"] * k + top["labels"] - 1], top["boxes"])
        assert torch.equal(expected[i]["labels"], det["labels"])


def test_mask_logits_are_the_masks_before_sigmoid_and_paste(probed):
    _, rec, expected = probed
    for logits, det in zip(rec["mask_logits"], rec["detections"]):
        assert torch.equal(logits.sigmoid()[:, None], det["masks"])
    pasted = postprocess_detections(rec["detections"], rec["image_sizes"], SIZES)
    for p, e in zip(pasted, expected):
        assert torch.equal(p["masks"], e["masks"]) and torch.equal(p["boxes"], e["boxes"])
