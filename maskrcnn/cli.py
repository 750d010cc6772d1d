"""Shared command-line plumbing: config arguments, one-line errors instead of tracebacks, and the process
settings the tools start with (huge pages for large tensors)."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from .config import ConfigError


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument("--config", default=default_config,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set solver.max_iter=100 model.noise.strength=0.3")


class Stopped(Exception):
    """An orderly stop (e.g. training checkpointed after SIGTERM): one line on stderr, then exit `status`."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def use_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator to back tensors of 2 MB or more with transparent huge pages
    (THP_MEM_ALLOC_ENABLE=1, PyTorch's own switch): a fresh tensor then costs one page fault per 2 MB instead of
    per 4 KB. Inference allocates such tensors all the time (a P2 map of 2 x 256 x 128x128 is 32 MB, the pasted
    masks of 100 detections at 512x512 100 MB; glibc hands blocks above 32 MB back to the system when they are
    freed, so each new one faults again). AVX2 EPYC, 2 threads, five fresh processes each, both models alike:
    inference 15% faster (ours 2763 -> 2356 ms, torchvision 4722 -> 4051), a training step 3% (within noise), the
    same peak RSS.

    PyTorch reads the variable once, at its first CPU allocation of any size (importing torch allocates nothing):
    the command-line tools call this as main's first statement. A value already set is kept; PyTorch takes
    exactly "1" (on) or "0" (off) and ignores anything else. Linux only, and only where the kernel's THP mode is
    `always` or `madvise` (/sys/kernel/mm/transparent_hugepage/enabled); elsewhere nothing changes. Returns
    whether the variable asks PyTorch for huge pages."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def ready_to_write(path: str, option: str = "--out") -> None:
    """Before minutes of measuring: the folder of an output file made if it is missing, and checked writable; if
    not, one line on stderr and exit status 2, so that a wrong path costs nothing measured."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        print(f"error: {option}: cannot create the folder {parent}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    if os.path.isdir(path) or not os.access(parent, os.W_OK):
        print(f"error: {option}: cannot write {path}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def one_line_errors():
    """Known user errors (bad config, bad data, missing files or weights) and errors of the machine (a file that
    cannot be written, a full disk: OSError) print one line and exit 2; a non-finite loss exits 3; an orderly
    stop exits with its own status."""
    from .data.coco import DatasetError
    from .model.backbone import WeightsUnavailable
    try:
        yield
    except Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.status)
    except (ConfigError, DatasetError, WeightsUnavailable, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
