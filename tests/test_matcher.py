"""Tests for maskrcnn.model.matcher: thresholds, low-quality matches, empty ground truth."""
from __future__ import annotations

import pytest
import torch

from maskrcnn.model.matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher


def test_constants():
    assert BELOW_LOW_THRESHOLD == -1
    assert BETWEEN_THRESHOLDS == -2


def test_thresholds_without_low_quality():
    m = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=False)
    # 2 GT x 6 predictions
    iou = torch.tensor([
        [0.9, 0.7, 0.5, 0.3, 0.29, 0.0],
        [0.1, 0.75, 0.2, 0.1, 0.0, 0.0],
    ])
    got = m(iou)
    assert got.dtype == torch.int64
    # 0: GT0 (0.9); 1: GT1 (0.75 beats 0.7); 2: 0.5 between; 3: exactly low -> between; 4: below; 5: zero
    assert got.tolist() == [0, 1, BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD,
                            BELOW_LOW_THRESHOLD]


def test_threshold_boundaries():
    m = Matcher(high_threshold=0.5, low_threshold=0.4)
    iou = torch.tensor([[0.5, 0.4999, 0.4, 0.3999]])
    assert m(iou).tolist() == [0, BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD]


def test_equal_thresholds_no_ignored_band():
    m = Matcher(high_threshold=0.5, low_threshold=0.5)  # the RoI-head setting: nothing is ignored
    iou = torch.tensor([[0.5, 0.49, 0.8, 0.0]])
    assert m(iou).tolist() == [0, BELOW_LOW_THRESHOLD, 0, BELOW_LOW_THRESHOLD]


def test_low_quality_match_keeps_best_prediction():
    iou = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],  # GT0: well matched by prediction 0
        [0.0, 0.4, 0.2, 0.0],  # GT1: best IoU only 0.4 (prediction 1)
    ])
    without = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=False)(iou)
    assert without.tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]
    with_lq = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    assert with_lq.tolist() == [0, 1, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]


def test_low_quality_match_ties_included():
    iou = torch.tensor([
        [0.4, 0.1, 0.4, 0.0, 0.4],  # three predictions tie for GT0's best
    ])
    got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    assert got.tolist() == [0, BELOW_LOW_THRESHOLD, 0, BELOW_LOW_THRESHOLD, 0]


def test_low_quality_below_low_threshold_still_matched():
    iou = torch.tensor([[0.1, 0.05, 0.0]])  # best IoU below even the low threshold
    got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    assert got.tolist() == [0, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]


def test_low_quality_gt_with_zero_overlap_adds_nothing():
    # GT1 overlaps nothing: its "best" predictions (IoU 0) must not all become positives.
    iou = torch.tensor([
        [0.8, 0.0, 0.0],
        [0.0, 0.0, 0.0],
    ])
    got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    assert got.tolist() == [0, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]


def test_low_quality_match_index_is_best_gt_of_prediction():
    # Prediction 0 is the best of both GTs (0.6 for GT0, 0.5 for GT1): it keeps its own argmax GT (0), as
    # both references do; prediction 1 is nobody's best and below the low threshold.
    iou = torch.tensor([
        [0.6, 0.1],
        [0.5, 0.2],
    ])
    got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    assert got[0].item() == 0
    assert got[1].item() == BELOW_LOW_THRESHOLD


def test_no_ground_truth_all_background():
    for lq in (False, True):
        got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=lq)(torch.zeros(0, 5))
        assert got.shape == (5,)
        assert got.dtype == torch.int64
        assert (got == BELOW_LOW_THRESHOLD).all()


def test_no_predictions():
    for lq in (False, True):
        got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=lq)(torch.zeros(3, 0))
        assert got.shape == (0,) and got.dtype == torch.int64, lq


def test_prediction_with_zero_iou_to_everything():
    iou = torch.tensor([
        [0.9, 0.0],
        [0.75, 0.0],
    ])
    for lq in (False, True):
        got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=lq)(iou)
        assert got[1].item() == BELOW_LOW_THRESHOLD
        assert got[0].item() == 0


def test_low_greater_than_high_raises():
    with pytest.raises(ValueError):
        Matcher(high_threshold=0.3, low_threshold=0.7)


def test_does_not_modify_input():
    iou = torch.tensor([[0.4, 0.9], [0.2, 0.1]])
    before = iou.clone()
    Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    assert torch.equal(iou, before)
