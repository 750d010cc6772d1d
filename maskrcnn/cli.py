"""Shared command-line plumbing: config arguments, one-line errors instead of tracebacks, and the process
settings the tools start with (huge pages for large tensors, freed memory kept for the next tensor)."""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
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


# glibc's malloc tunables (mallopt's parameters) and the environment variables that set them at start-up
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
freed_memory_kept = False  # whether keep_freed_memory's request was made and accepted in this process


def glibc() -> bool:
    """Linux with glibc: where keep_freed_memory can ask anything."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def users_malloc_settings() -> bool:
    """Whether the user set glibc's malloc tunables (a MALLOC_* variable or GLIBC_TUNABLES): then they are kept."""
    return (any(v in os.environ for v in _MALLOC_VARIABLES)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory the process frees for its next allocations instead of handing it
    back to the system (mallopt: M_MMAP_MAX 0, no block is mmapped on its own; M_TRIM_THRESHOLD 2 GB, the free top
    of the heap is kept). By default a block above 32 MB (a P2 map of 2 x 256 x 128x128, the pasted masks, the
    deconvolution's output) is mmapped when allocated and unmapped when freed, so every step and every image
    faults its pages in again, and the kernel zeroes them. Ours alone in its process, as train.py and evaluate.py
    run it (2-core AVX-512 EPYC, 512x512, batch 2, four fresh processes each, medians): a training step 4040 ms
    against 4493, an inference 2036 ms against 2169 (1873-2163 against 1960-2622: the spread is the faults'), the
    system time of an inference 4-7 ms against 139-295, for a peak RSS 5-8% higher. The README's lever table has
    the figures.

    Process-wide, like huge pages: the benchmarks call it for both models alike. Linux with glibc only; a
    MALLOC_* variable of the user's (MALLOC_MMAP_MAX_=65536 is glibc's default) or malloc tunables in
    GLIBC_TUNABLES are kept, and nothing changes. Returns whether the request was made and accepted (also kept in
    `freed_memory_kept`, which the benchmarks print)."""
    global freed_memory_kept
    if not glibc() or users_malloc_settings():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    freed_memory_kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return freed_memory_kept


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
