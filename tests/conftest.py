"""Shared test set-up: keep the suite's disk use small, and each test's thread count its own.

Trained checkpoints are 45-350 MB each. pytest keeps every test's directory until the session ends, which
for this suite is several GB; `pytest.ini` has it delete the directory of a passing test at once
(tmp_path_retention_policy = failed), and the fixture below deletes what a module's shared fixtures wrote
(tmp_path_factory.mktemp) when the module's tests are done. Everything is kept when a test failed.

`train.main` run inside the test process applies the run's `train.num_threads` to the whole process; the
thread count is restored after every test, so that no test runs with what an earlier one left (module
fixtures that train in-process restore it themselves).

Tests whose verdict depends on a training trajectory carry the `trains` mark. Their fixtures seed from
MASKRCNN_TEST_SEED (default 0, `fixture_seed()`), and they state each thresholded statistic through the `margin`
fixture, which asserts it and, with MASKRCNN_MARGINS=<file>, appends it there as a JSON line: `make
test-variations` (tests/variations.py) runs them under other seeds, thread counts and the AVX2 limits and prints
every statistic next to its threshold.

`saved_bytes(fn)` measures what autograd keeps for the backward pass while fn runs.

`offline_hub` gives a test its own torch.hub cache with downloads failing as they do offline, and places a
state dict there as a torchvision weights file would be (a name carrying its SHA-256 prefix).
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _free_module_directories(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class OfflineHub:
    def __init__(self, root: Path, monkeypatch):
        self.root, self._monkeypatch = root, monkeypatch

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def place(self, enum, state, **save_kwargs) -> str:
        """torch.save `state` as the cached file of torchvision weights `enum` (see place_file)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints / "placing.tmp"
        torch.save(state, tmp, **save_kwargs)
        return self.place_file(enum, tmp)

    def place_file(self, enum, src: Path) -> str:
        """Move `src` into the cache as the file of torchvision weights `enum`: the enum's URL is changed (for
        this test) to a name carrying the real SHA-256 prefix of the file. Returns the file name."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        stem = enum.url.rsplit("/", 1)[-1].split("-")[0]
        name = f"{stem}-{hashlib.sha256(Path(src).read_bytes()).hexdigest()[:8]}.pth"
        Path(src).rename(self.checkpoints / name)
        self._monkeypatch.setattr(enum.value, "url", f"https://download.invalid/models/{name}")
        return name


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> OfflineHub:
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # torch.hub.get_dir(), undone after
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return OfflineHub(tmp_path / "hub", monkeypatch)


@pytest.fixture
def count_batchnorms():
    """A function: the BatchNorm layers (frozen or trained) left in a model (what fold_batchnorm removes)."""
    from maskrcnn.model.backbone import FrozenBatchNorm2d

    return lambda model: sum(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in model.modules())


def fixture_seed() -> int:
    """The seed of the training fixtures (MASKRCNN_TEST_SEED, default 0): tests/variations.py sets others."""
    return int(os.environ.get("MASKRCNN_TEST_SEED", "0"))


def fixture_threads() -> int:
    """The thread count the training fixtures train with (MASKRCNN_TEST_THREADS, default 2): float sums, and so
    the trained weights, depend on it; tests/variations.py sets 1."""
    return int(os.environ.get("MASKRCNN_TEST_THREADS", "2"))


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class Margin:
    """`margin.check("mask IoU (worst object)", value, ">", 0.7, limit=1)` asserts `value > 0.7` and keeps the
    numbers for tests/variations.py (written to $MASKRCNN_MARGINS when set, one JSON line each). `limit` is the
    most the statistic can ever be, where it has one (1 for a cosine, an IoU, a fraction): the table then measures
    a lower bound's margin against the room up to it; without one, against the threshold."""

    def __init__(self, nodeid: str):
        self.nodeid = nodeid

    def check(self, name: str, value: float, op: str, threshold: float, detail=None, *,
              limit: float | None = None) -> None:
        value = float(value)
        path = os.environ.get("MASKRCNN_MARGINS")
        if path:
            record = {"test": self.nodeid, "statistic": name, "value": value, "op": op, "threshold": threshold,
                      "limit": limit, "passed": bool(_OPS[op](value, threshold))}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        assert _OPS[op](value, threshold), (name, value, op, threshold, detail)


@pytest.fixture
def margin(request) -> Margin:
    return Margin(request.node.nodeid)


def saved_bytes(fn) -> tuple[object, int]:
    """(fn's result, bytes of the tensors autograd keeps for the backward pass while fn runs, each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
