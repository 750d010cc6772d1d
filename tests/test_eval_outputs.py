"""Tests for the names of evaluate.py's files (maskrcnn/evaluation/outputs.py) and for the readers that pick one
evaluation among several (compare.py): one name, one evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import compare
from maskrcnn.evaluation import outputs


def test_names_carry_the_image_set_and_the_tag():
    assert outputs.image_set("val", 0, 100) == "val"
    assert outputs.image_set("val", 100, 100) == "val"
    assert outputs.image_set("val", 500, 100) == "val"  # more than there are: every image
    assert outputs.image_set("val", 20, 100) == "val-first20"
    assert outputs.image_set("train", 3, 8) == "train-first3"
    assert outputs.metrics_file("val-first20", "benchmark") == "eval_val-first20_benchmark.json"
    assert outputs.detections_file("val", "clean", "clean", one_pass=True) == "detections_val_clean.json"
    # the benchmark's clean pass has a name of its own, never the clean evaluation's
    assert outputs.detections_file("val-first20", "benchmark", "clean", one_pass=False) == \
        "detections_val-first20_benchmark_clean.json"
    assert outputs.benchmark_table_file("val-first20") == "benchmark_val-first20.md"


def write_eval(run: Path, image_set: str, tag: str, report: dict) -> Path:
    path = run / outputs.metrics_file(image_set, tag)
    path.write_text(json.dumps(report))
    return path


def clean_report(box: float) -> dict:
    return {"results": {"clean": {"bbox": {"stats": {"AP": box}}, "segm": {"stats": {"AP": box / 2}}}}}


def bench_report(mpc: float) -> dict:
    return {"benchmark": {"metrics": {"bbox": {"mPC": mpc, "rPC": 0.5}}}}


def test_find_metrics_prefers_every_image_then_the_most(tmp_path):
    assert outputs.find_metrics(tmp_path, "val", "clean") is None
    write_eval(tmp_path, "val-first3", "clean", clean_report(0.1))
    ten = write_eval(tmp_path, "val-first10", "clean", clean_report(0.2))
    write_eval(tmp_path, "val-first2", "benchmark", bench_report(0.3))
    write_eval(tmp_path, "train", "clean", clean_report(0.9))  # another split
    assert outputs.find_metrics(tmp_path, "val", "clean") == ("val-first10", ten)
    whole = write_eval(tmp_path, "val", "clean", clean_report(0.4))
    assert outputs.find_metrics(tmp_path, "val", "clean") == ("val", whole)
    assert outputs.find_metrics(tmp_path, "val", "benchmark")[0] == "val-first2"
    assert outputs.find_metrics(tmp_path, "val", "all-*") is None


def test_compare_reads_the_evaluations_and_names_their_images(tmp_path):
    runs = []
    for seed, (box, mpc) in enumerate(((0.4, 0.2), (0.5, 0.3))):
        run = tmp_path / f"base-s{seed}"
        run.mkdir()
        write_eval(run, "val", "clean", clean_report(box))
        write_eval(run, "val-first2", "clean", clean_report(0.99))  # a smaller clean evaluation: not the one read
        write_eval(run, "val-first20", "benchmark", bench_report(mpc))
        runs.append(run)
    sources: dict[str, str] = {}
    assert compare.read_ap(runs[0], sources) == {"bbox": 0.4, "segm": 0.2, "bbox_mPC": 0.2, "bbox_rPC": 0.5}
    assert sources == {"bbox": "val", "segm": "val", "bbox_mPC": "val-first20", "bbox_rPC": "val-first20"}
    table = compare.ap_table(compare.group_runs(runs))
    assert "| base | 2 | 0.450 ± 0.071 | 0.225 ± 0.035 | 0.250 ± 0.071 | 0.500 ± 0.000 |" in table
    assert ("Images: box AP, mask AP: every val image; box mPC, box rPC: the first 20 val images."
            in table.splitlines())


def test_compare_says_when_a_column_mixes_image_sets(tmp_path):
    runs = []
    for seed, image_set in enumerate(("val-first10", "val-first20")):
        run = tmp_path / f"base-s{seed}"
        run.mkdir()
        write_eval(run, image_set, "benchmark", bench_report(0.25))
        runs.append(run)
    table = compare.ap_table(compare.group_runs(runs))
    assert ("Images: box mPC, box rPC: the first 10 val images / the first 20 val images (they differ between "
            "runs: not comparable).") in table.splitlines()
