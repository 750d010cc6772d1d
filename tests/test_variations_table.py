"""tests/variations.py's table: each statistic's worst margin, relative to its threshold, or, for a lower bound on a
statistic with a limit of its own (a cosine, an IoU, a fraction), to the room below that limit."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("variations", Path(__file__).with_name("variations.py"))
variations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variations)


def test_a_lower_bound_without_a_limit_is_measured_against_its_threshold():
    # a loss drop of 0.0634 against >= 0.015 is 4.2x the bound: +323%, not the +5% of "room below 1"
    assert variations.margin_of(0.0634, ">=", 0.015) == pytest.approx(0.0484 / 0.015)


def test_a_lower_bound_with_a_limit_is_measured_against_the_room_below_it():
    assert variations.margin_of(0.9998, ">=", 0.999, limit=1) == pytest.approx(0.8)
    assert variations.margin_of(0.9998, ">=", 0.999) == pytest.approx(0.0008 / 0.999)


def test_upper_bounds_failures_and_infinities():
    assert variations.margin_of(0.03333, "<=", 0.5) == pytest.approx(0.93334)
    assert variations.margin_of(0.6, "<=", 0.5) == pytest.approx(-0.2)
    assert variations.margin_of(0.7, ">=", 0.8, limit=1) == pytest.approx(-0.5)
    assert variations.margin_of(float("inf"), "<=", 600) == float("-inf")


def test_the_table_keeps_each_statistics_worst_value_and_reads_its_limit(tmp_path, monkeypatch):
    from conftest import Margin

    out = tmp_path / "margins.jsonl"
    monkeypatch.setenv("MASKRCNN_MARGINS", str(out))
    m = Margin("tests/test_x.py::test_y")
    m.check("gradient cosine", 0.9999, ">=", 0.99, limit=1)
    m.check("gradient cosine", 0.9995, ">=", 0.99, limit=1)  # the worse of the two is kept
    m.check("loss drop", 0.0634, ">=", 0.015)
    records = [{**json.loads(line), "column": "s0/2t"} for line in out.read_text().splitlines()]
    lines = variations.table(records, ["s0/2t"]).splitlines()
    cosine = next(line for line in lines if "gradient cosine" in line)
    drop = next(line for line in lines if "loss drop" in line)
    assert "0.9995" in cosine and cosine.endswith("+95%")
    assert drop.endswith("+323%")
