"""Shared test set-up: keep the suite's disk use small, and each test's thread count its own.

Trained checkpoints are 45-350 MB each. pytest keeps every test's directory until the session ends, which
for this suite is several GB; `pytest.ini` has it delete the directory of a passing test at once
(tmp_path_retention_policy = failed), and the fixture below deletes what a module's shared fixtures wrote
(tmp_path_factory.mktemp) when the module's tests are done. Everything is kept when a test failed.

`train.main` run inside the test process applies the run's `train.num_threads` to the whole process; the
thread count is restored after every test, so that no test runs with what an earlier one left (module
fixtures that train in-process restore it themselves).
"""
from __future__ import annotations

import shutil

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
