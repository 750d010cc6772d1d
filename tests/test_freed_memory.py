"""Freed memory kept for the next tensors (maskrcnn.cli.keep_freed_memory): the command-line tools ask glibc's
malloc not to hand big blocks back to the system (right after huge pages: tests/test_huge_pages.py checks where),
a setting the user made is kept, and glibc honours the request:
a step that allocates, touches and frees big tensors stops faulting fresh pages after its first runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskrcnn import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_MAX_", "65536"), ("MALLOC_MMAP_THRESHOLD_", "131072"),
                                         ("MALLOC_TRIM_THRESHOLD_", "0"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=65536")])
def test_a_users_malloc_setting_is_kept(monkeypatch, name, value):
    """The benchmark's memory children set MALLOC_MMAP_THRESHOLD_ (peak RSS follows the live memory): kept."""
    called = []
    monkeypatch.setattr(cli.ctypes, "CDLL", lambda *a: called.append(a))
    monkeypatch.setenv(name, value)
    assert cli.keep_freed_memory() is False and called == []


_PROBE = """
import resource, sys
import torch
from maskrcnn.cli import keep_freed_memory
asked = keep_freed_memory() if sys.argv[1] == "ask" else False

def step():  # as a model's step: big maps (above glibc's 32 MB mmap limit) touched and freed, small tensors between
    alive = []
    for mb in (40, 64, 40):
        alive.append(torch.ones(mb * 2**20 // 4))
        alive.append(torch.ones(1000))
    return sum(float(t[0]) for t in alive)

faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(asked, *faults)
"""


@pytest.mark.skipif(not cli.glibc(), reason="glibc's malloc only")
@pytest.mark.parametrize("huge_pages", ["0", "1"])
def test_glibc_honours_it(huge_pages):
    """Without the request every step faults its 144 MB in again (36.9k faults of 4 KB, or 1.6k with huge pages,
    measured); with it the later steps reuse the freed memory (0 faults once the heap has grown: the first steps
    can still fault while freed blocks coalesce, since an aligned allocation asks for a little more than a block
    of the same size it freed)."""
    def faults(arg):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        env["THP_MEM_ALLOC_ENABLE"] = huge_pages
        out = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, cwd=ROOT, env=env,
                             check=True, timeout=120).stdout.split()
        return out[0] == "True", [int(f) for f in out[1:]]

    asked, kept = faults("ask")
    assert asked
    not_asked, fresh = faults("no")
    assert not not_asked
    assert min(fresh[1:]) > 1000  # every step faults anew (1.6k-36.9k measured)
    assert min(kept[3:]) == 0 and sum(kept[3:]) < min(fresh[1:])  # 0, 0, 0 measured
