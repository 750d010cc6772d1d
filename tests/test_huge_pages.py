"""Huge pages for large tensors (maskrcnn.cli.use_huge_pages): the command-line tools ask PyTorch's CPU allocator
for them before any large tensor, a value the user set is kept, and PyTorch honours the request."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from maskrcnn.cli import use_huge_pages

ROOT = Path(__file__).resolve().parent.parent


def test_asks_unless_the_user_said_otherwise(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert use_huge_pages() is True and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert use_huge_pages() is False and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "true")  # PyTorch takes "1" and "0" only: this is not a yes
    assert use_huge_pages() is False and os.environ["THP_MEM_ALLOC_ENABLE"] == "true"


@pytest.mark.parametrize("path", ["train.py", "evaluate.py", "infer.py", "maskrcnn/bench.py",
                                  "maskrcnn/bench_profile.py"])
def test_each_tool_asks_first(path):
    """PyTorch reads the variable at its first CPU allocation: main's first statement asks; its second keeps freed
    memory for the next tensors (maskrcnn.cli.keep_freed_memory, tests/test_freed_memory.py)."""
    tree = ast.parse((ROOT / path).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = [getattr(getattr(getattr(st, "value", None), "func", None), "id", None) for st in main.body[:2]]
    assert calls == ["use_huge_pages", "keep_freed_memory"]


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else "none"


_PROBE = """
import torch  # as the tools do: torch (and the project) imported, then main asks first
import maskrcnn.bench
from maskrcnn.cli import use_huge_pages
use_huge_pages()
x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(int(line.split()[1]) // 1024)
"""


@pytest.mark.skipif(_thp_mode() != "madvise", reason="huge pages only where asked needs the kernel's THP mode "
                    "madvise (under always every process gets them, asked or not; under never none does)")
def test_pytorch_honours_it():
    """A 64 MB tensor lies in huge pages when asked, and not with THP_MEM_ALLOC_ENABLE=0."""
    def huge_mb(value):
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if value is not None:
            env["THP_MEM_ALLOC_ENABLE"] = value
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, env=env,
                             check=True, timeout=120)
        return int(out.stdout.split()[-1])

    assert huge_mb(None) >= 32  # most of the 64 MB (the kernel may leave the unaligned ends in small pages)
    assert huge_mb("0") < 8
