"""The check-up page rendered from a saved report.json alone (maskrcnn/report/page.py): no model, no checkpoint,
no data and no torch. The two files in tests/data/ were written by `visualize.py report` on the planted data of
test_report.py (paths made relative, floats rounded; the against-report names a losses picture): one checkpoint
against another (an RPN-stage one) with a run directory, and a first-day report without a checkpoint."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from maskrcnn.report.page import render, write_page

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


class Page(HTMLParser):
    """Section ids, linked pictures and the text of every table cell."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.cells, self.cell_classes = [], [], [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.links.append(a["src"])
        if tag == "td":
            self._in_cell = True
            self.cells.append("")
            self.cell_classes.append(a.get("class") or "")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def parsed(report: dict) -> Page:
    p = Page()
    p.feed(render(report))
    p.close()
    return p


def test_page_renders_from_report_json_without_torch(tmp_path):
    """`python -m maskrcnn.report.page DIR` writes index.html in a process that never imports torch or the
    model: everything the page shows is in report.json."""
    shutil.copy(DATA / "report_against.json", tmp_path / "report.json")
    code = ("import sys; from maskrcnn.report.page import main; rc = main(sys.argv[1:]); "
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'maskrcnn.model', "
            "'maskrcnn.engine', 'maskrcnn.data', 'maskrcnn.evaluation'))]; assert rc == 0 and not loaded, sorted(loaded)[:8]")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "index.html")
    assert (tmp_path / "index.html").read_text() == render(json.loads((DATA / "report_against.json").read_text()))


def test_against_page_has_every_section_and_picture():
    report = json.loads((DATA / "report_against.json").read_text())
    p = parsed(report)
    assert p.ids == ["summary", "views", "anchor-fit", "suggestions", "proposals", "run"]
    this, other = report["sides"]["this"], report["sides"]["against"]
    # every picture the report names is linked, and nothing else
    named = {report["losses_picture"]} | set(this["pictures"].values()) | set(other["pictures"].values())
    named |= {v for s in (this, other) for pics in s["view_pictures"] for v in pics.values()}
    assert set(p.links) == named
    # the RPN-stage side has no RoI or detection view: a dash in those cells
    page = render(report)
    views_table = page[page.index('id="views"'):page.index('id="anchor-fit"')]
    assert "rois" not in other["view_pictures"][0] and views_table.count("<td>–</td>") == 2
    # the summary: one row per summary entry, both values and their difference
    summary = [r["metric"] for r in report["summary"]]
    assert [c for c in p.cells if c in summary] == summary
    assert not any("better" in c or "worse" in c for c in p.cell_classes)  # all the same
    # the anchor fit is shared by the two checkpoints (same data and anchors): shown once
    assert "the same for both checkpoints" in page and page.count('alt="best anchor IoU"') == 1
    # the run table: metrics.json of each side, iterations
    assert "this (metrics.json)" in p.cells and "against (metrics.json)" in p.cells
    assert f"checkpoint <code>{this['source']}</code> (full stage)" in page
    assert f"checkpoint <code>{other['source']}</code> (rpn stage)" in page


def test_page_follows_the_numbers_of_report_json():
    """The page shows what report.json says: change a number there and the page changes with it."""
    report = json.loads((DATA / "report_against.json").read_text())
    report["summary"][0].update(this=0.9, difference=0.2, verdict="better")
    report["sides"]["this"]["proposals"]["all"]["recall@100"] = 0.123
    p = parsed(report)
    assert "0.900" in p.cells and "+0.200" in p.cells and p.cell_classes.count("num better") == 1
    assert "0.123" in p.cells
    del report["sides"]["against"]["run"], report["sides"]["this"]["run"]
    assert "run" not in parsed(report).ids


def test_first_day_page():
    report = json.loads((DATA / "report_first_day.json").read_text())
    p = parsed(report)
    assert p.ids == ["summary", "views", "anchor-fit", "suggestions", "first-day"]
    day = report["sides"]["this"]["first_day"]
    page = render(report)
    assert "no checkpoint: config <code>configs/tiny.yaml</code>" in page and day["set"] in page
    assert f"{day['seconds_per_iteration']:.3f} (median of {day['timing_steps']} steps" in page
    assert "run with --against CHECKPOINT" in page


def test_page_command_errors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "maskrcnn.report.page", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    (tmp_path / "report.json").write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "maskrcnn.report.page", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "report.json" in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("name", ["report_against.json", "report_first_day.json"])
def test_write_page_reads_report_json(tmp_path, name):
    shutil.copy(DATA / name, tmp_path / "report.json")
    path = write_page(tmp_path)
    assert path == tmp_path / "index.html" and path.read_text().startswith("<!DOCTYPE html>")
