"""Mask Scoring R-CNN's MaskIoU head (maskrcnn/model/maskiou_head.py): shapes, its loss on empty ground truth,
the IoU target on a planted case computed by hand, the rescoring of detections at inference, the segm results
ranked by the mask scores, and a tiny training run through train.main with `model.roi_heads.mask_head: maskiou`."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from maskrcnn.evaluation.coco_eval import _records_for, detections_to_coco
from maskrcnn.model.mask_head import MaskHead
from maskrcnn.model.maskiou_head import MaskIoUHead

ROOT = Path(__file__).resolve().parents[1]
K, C = 3, 8


def make_head(seed: int = 0) -> MaskIoUHead:
    torch.manual_seed(seed)
    return MaskIoUHead(in_channels=C, conv_dim=8, num_convs=1, num_classes=K, iou_fc_dim=16)


def sample(boxes, labels, matched) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "matched_idx": torch.tensor(matched)}


def test_shapes_and_the_standard_head_inside():
    head = make_head()
    assert isinstance(head, MaskHead)
    x = torch.randn(5, C, 14, 14)
    logits, pooled = head(x)
    assert logits.shape == (5, K + 1, 28, 28) and pooled is x
    iou = head.predict_iou(x, logits[:, 1], torch.tensor([1, 2, 3, 1, 2]))
    assert iou.shape == (5,)
    # the branch: 4 convs (C + 1 channels in: the features and the pooled mask), 3 FC, K + 1 outputs
    assert head.iou_convs[0].in_channels == C + 1 and len(head.iou_convs) == 4 and head.iou_convs[3].stride == (2, 2)
    assert head.iou_pred.out_features == K + 1 and head.iou_fc1.in_features == 8 * 7 * 7


def test_loss_on_empty_ground_truth_is_zero_and_reaches_every_parameter():
    head = make_head().train()
    logits, pooled = head(torch.randn(0, C, 14, 14))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 32, 32, dtype=torch.uint8)}
    losses = head.losses((logits, pooled), [sample(torch.zeros(0, 4).tolist(), [], [])], [empty])
    assert set(losses) == {"loss_mask", "loss_maskiou"} and losses["loss_maskiou"].item() == 0.0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())  # the graph stays connected (DDP)


def test_iou_target_by_hand():
    """A planted 4x4 case: predicted mask (logit > 0) covers 6 cells, the target 4 (2 of them shared): IoU 2/8."""
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, 0, :3] = 5.0  # row 0, cells 0..2
    logits[0, 1, :3] = 5.0  # row 1, cells 0..2
    target = torch.zeros(1, 4, 4)
    target[0, 1:3, 1:3] = 1.0  # rows 1-2, cells 1-2: shares (1,1) and (1,2)
    assert MaskIoUHead.iou_targets(logits, target).tolist() == pytest.approx([2 / 8])
    assert MaskIoUHead.iou_targets(torch.full((1, 4, 4), -1.0), torch.zeros(1, 4, 4)).item() == 0.0
    # half of the ground-truth mask lies outside the RoI: its area in the RoI frame is 4 / 0.5 = 8, so the
    # union is 6 + 8 - 2 = 12 (the official code's rule)
    assert MaskIoUHead.iou_targets(logits, target, torch.tensor([0.5])).tolist() == pytest.approx([2 / 12])


def test_fraction_of_the_ground_truth_mask_inside_the_roi_by_hand():
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, 0:10, 0:20] = 1  # 200 pixels
    masks[1, 20:30, 30:40] = 1  # 100 pixels
    s = sample([[0.0, 0.0, 10.0, 10.0], [0.2, -3.0, 19.6, 5.4], [25.0, 20.0, 60.0, 45.0], [0.0, 0.0, 50.0, 40.0]],
               [1, 1, 2, 1], [0, 0, 1, 0])
    inside = MaskIoUHead.fraction_inside([s], [{"masks": masks}])
    # 10x10 of 200; rounded box x 0..20, y 0..5 (clipped): 100 of 200; x 30..40 of the second: all; the whole image
    assert inside.tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])


def test_loss_is_the_squared_error_to_the_iou_target_through_the_gt_class():
    """One foreground RoI whose box is its ground truth (the target: all ones); the mask logits are planted so
    that half the mask is predicted: target IoU 0.5; the loss is (predicted IoU of class 2 - 0.5)^2."""
    head = make_head().train()
    x = torch.randn(1, C, 14, 14)
    masks = torch.zeros(1, 56, 56, dtype=torch.uint8)
    masks[0, :, :] = 1
    t = {"boxes": torch.tensor([[0.0, 0.0, 56.0, 56.0]]), "labels": torch.tensor([2]), "masks": masks}
    s = sample([[0.0, 0.0, 56.0, 56.0]], [2], [0])
    logits = torch.full((1, K + 1, 28, 28), -4.0)
    logits[0, 2, :14] = 4.0  # the top half, in class 2 only
    losses = head.losses((logits, x), [s], [t])
    iou = head.predict_iou(x, logits[:, 2], torch.tensor([2]))
    assert losses["loss_maskiou"].item() == pytest.approx((iou.item() - 0.5) ** 2, rel=1e-5)
    other = head.predict_iou(x, logits[:, 2], torch.tensor([1]))
    assert losses["loss_maskiou"].item() != pytest.approx((other.item() - 0.5) ** 2, rel=1e-3)


def test_inference_rescores_the_masks():
    head = make_head().eval()
    with torch.no_grad():
        head.iou_pred.bias.fill_(0.0)
        head.iou_pred.weight.fill_(0.0)
        head.iou_pred.bias[2] = 0.25  # class 2 predicts IoU 0.25, the others 0
        head.iou_pred.bias[1] = 2.0  # beyond 1: clamped
    x = torch.randn(3, C, 14, 14)
    results = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [5.0, 5, 20, 20]]), "scores": torch.tensor([0.9, 0.5]),
                "labels": torch.tensor([2, 1])},
               {"boxes": torch.tensor([[1.0, 1, 8, 8]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([3])}]
    out = head.inference(head(x), results)
    assert out[0]["masks"].shape == (2, 1, 28, 28)
    assert out[0]["mask_scores"].tolist() == pytest.approx([0.9 * 0.25, 0.5 * 1.0])
    assert out[1]["mask_scores"].tolist() == pytest.approx([0.0])
    assert out[0]["scores"].tolist() == pytest.approx([0.9, 0.5])  # box scores untouched (box AP)
    empty = head.inference(head(torch.randn(0, C, 14, 14)), [{k: v[:0] for k, v in results[1].items()}])
    assert empty[0]["mask_scores"].shape == (0,)


def test_segm_results_are_ranked_by_the_mask_scores():
    det = {"boxes": torch.tensor([[0.0, 0, 4, 4]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
           "masks": torch.ones(1, 1, 8, 8), "mask_scores": torch.tensor([0.3])}
    recs = detections_to_coco(det, 7, {1: 11})
    assert recs[0]["score"] == pytest.approx(0.9)
    assert _records_for(recs, "bbox")[0]["score"] == pytest.approx(0.9)
    assert _records_for(recs, "segm")[0]["score"] == pytest.approx(0.3)
    del det["mask_scores"]  # the standard head: the detection score for both
    assert _records_for(detections_to_coco(det, 7, {1: 11}), "segm")[0]["score"] == pytest.approx(0.9)


def test_a_tiny_training_run_with_the_maskiou_head(tmp_path):
    import train

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--name", "msr", "--no-progress",
                              "--set", f"train.output_dir={tmp_path}", "solver.max_iter=2",
                              "train.checkpoint_period=1000", "test.max_images=2",
                              "model.roi_heads.mask_head=maskiou", "loss_weights.loss_maskiou=1.0"])
    assert "loss_maskiou" in summary["loss_end"] and summary["loss_end"]["loss_maskiou"] >= 0
    assert {"bbox", "segm"} <= set(summary["val"])
    metrics = json.loads((tmp_path / "msr" / "metrics.json").read_text())
    assert "loss_maskiou" in metrics["loss_start"]
