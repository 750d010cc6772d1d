"""Tests for maskrcnn.evaluation.robustness: P, mPC and rPC (Michaelis et al. 2019) on made-up APs."""
from __future__ import annotations

import math

import pytest

from maskrcnn.evaluation.corruptions import BENCHMARK_CORRUPTIONS
from maskrcnn.evaluation.robustness import BENCHMARK_SEVERITIES, headline, markdown, summarize


def made_up(box_clean=0.40, mask_clean=0.36):
    """AP falls with severity and differs per corruption: AP(c, s) = clean * (1 - 0.1 s) - 0.002 c."""
    clean = {"bbox": box_clean, "segm": mask_clean}
    corrupted = {(name, s): {k: v * (1 - 0.1 * s) - 0.002 * c for k, v in clean.items()}
                 for c, name in enumerate(BENCHMARK_CORRUPTIONS) for s in BENCHMARK_SEVERITIES}
    return clean, corrupted


def test_p_mpc_rpc_of_the_full_benchmark():
    clean, corrupted = made_up()
    out = summarize(clean, corrupted)
    assert out["complete"] and out["corruptions"] == list(BENCHMARK_CORRUPTIONS)
    assert out["severities"] == [1, 2, 3, 4, 5]
    for key, p in clean.items():
        m = out["metrics"][key]
        # mean over s of (1 - 0.1 s) = 0.7; mean over the 15 corruptions of 0.002 c = 0.002 * 7 = 0.014
        assert m["P"] == p
        assert m["mPC"] == pytest.approx(0.7 * p - 0.014, abs=1e-12)
        assert m["rPC"] == pytest.approx((0.7 * p - 0.014) / p, abs=1e-12)
        # the mean over all 75 numbers, as the paper defines it
        assert m["mPC"] == pytest.approx(sum(v[key] for v in corrupted.values()) / 75, abs=1e-12)
        row = m["per_corruption"]["fog"]
        c = BENCHMARK_CORRUPTIONS.index("fog")
        assert row["3"] == pytest.approx(p * 0.7 - 0.002 * c) and row["mean"] == pytest.approx(0.7 * p - 0.002 * c)
        assert m["per_severity"]["5"] == pytest.approx(0.5 * p - 0.014)


def test_mpc_averages_severities_then_corruptions():
    """With a missing severity the paper's nested mean differs from the flat mean: the nested one is used."""
    clean = {"bbox": 0.5}
    corrupted = {("snow", 1): {"bbox": 0.4}, ("snow", 2): {"bbox": 0.2}, ("fog", 1): {"bbox": 0.1}}
    m = summarize(clean, corrupted)["metrics"]["bbox"]
    assert m["mPC"] == pytest.approx((0.3 + 0.1) / 2)
    assert m["rPC"] == pytest.approx(0.4)
    assert m["per_severity"] == {"1": pytest.approx(0.25), "2": pytest.approx(0.2)}


def test_subset_is_marked_incomplete_and_zero_clean_ap():
    clean, corrupted = made_up()
    subset = {k: v for k, v in corrupted.items() if k[0] in ("snow", "fog") and k[1] in (1, 3)}
    out = summarize(clean, subset)
    assert not out["complete"] and out["corruptions"] == ["snow", "fog"] and out["severities"] == [1, 3]
    assert "not comparable" in markdown(out)
    no_clean = summarize({"bbox": 0.0}, {k: {"bbox": 0.0} for k in subset})
    assert no_clean["metrics"]["bbox"]["rPC"] is None
    assert "rPC n/a" in markdown(no_clean)
    with pytest.raises(ValueError):
        summarize(clean, {})


def test_markdown_table():
    clean, corrupted = made_up()
    text = markdown(summarize(clean, corrupted))
    assert text.count("| corruption | s1 | s2 | s3 | s4 | s5 | mean |") == 2
    assert "**box AP**: P 40.0, mPC 26.6, rPC 66.5 %" in text
    assert "**mask AP**" in text
    for name in BENCHMARK_CORRUPTIONS:
        assert f"| {name} | " in text
    gauss = next(line for line in text.splitlines() if line.startswith("| gaussian_noise |"))
    assert gauss.split("|")[2].strip() == "36.0"  # 0.40 * 0.9, x 100


def test_headline():
    full = {"bbox": {"stats": {"AP": 0.3, "AP50": 0.5}}, "segm": {"stats": {"AP": 0.25}}}
    assert headline(full) == {"bbox": 0.3, "segm": 0.25}
    assert headline({"AR@100": 0.4, "AR@1000": 0.5}) == {"AR@100": 0.4, "AR@1000": 0.5}
    assert math.isclose(headline({"bbox": {"stats": {"AP": 0.1}}})["bbox"], 0.1)
