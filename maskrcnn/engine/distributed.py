"""Process groups under torchrun: one process per GPU (or per CPU worker), on one node or several.

    torchrun --nproc_per_node=8 train.py --config configs/coco_r50_fpn_1x.yaml --set solver.ims_per_batch=2

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `process_group()` joins the group they
describe (NCCL on CUDA, gloo on the CPU) and leaves it at the end. Without torchrun (WORLD_SIZE unset or 1)
every function here is the single-process answer (rank 0 of 1, barrier a no-op), so the same code serves both.

Python objects (evaluation results, RNG states) travel through a gloo group even when the tensors go through
NCCL: pickled objects are host memory, and NCCL would need them copied to the GPU first (detectron2 does
the same).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

_object_group = None  # gloo group for object collectives when the main group is NCCL


def env_world_size() -> int:
    """The world size torchrun announces (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The process's index on its node: its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the process that writes the run directory, TensorBoard and the progress bar."""
    return rank() == 0


def backend() -> Optional[str]:
    return dist.get_backend() if is_distributed() else None


def init(device: str = "auto", timeout_min: float = 30.0) -> bool:
    """Check `device`, then join the process group torchrun describes; False (nothing joined) without torchrun or
    with one process.
    `device`: "auto" | "cpu" | "cuda": NCCL when it resolves to CUDA (one GPU per process, LOCAL_RANK), else
    gloo. A collective that waits longer than `timeout_min` fails instead of hanging."""
    global _object_group
    from .device import check_cuda, check_device_name
    device = check_device_name(device)  # an unknown name or an absent GPU: a DeviceError before any work,
    if device.startswith("cuda"):       # with or without torchrun (one line, exit status 2)
        check_cuda(device)
    if env_world_size() <= 1 or is_distributed():
        return is_distributed()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; run without torchrun")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) on this node: "
                               "--nproc_per_node must not exceed the GPUs of a node")
        torch.cuda.set_device(local)
    timeout = timedelta(minutes=timeout_min)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    _object_group = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else None
    return True


def device(name: str = "auto") -> torch.device:
    """The device of this process: its own GPU (cuda:LOCAL_RANK) under NCCL, else `name` resolved."""
    from .device import select_device

    if backend() == "nccl":
        return torch.device("cuda", local_rank())
    return select_device(name)


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    global _object_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _object_group = None


def abort() -> None:
    """Leave the process group after an error on this rank, without waiting for the others (they are stopped
    by torchrun when this process exits non-zero, or fail their next collective)."""
    global _object_group
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # the group may already be broken: exiting is what matters
        pass
    _object_group = None


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process died or stopped answering (its own
    error is the one that matters)."""
    text = str(error)
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in text.lower() and any(
        s in text for s in ("closed by peer", "reset by peer", "Timed out", "remote worker")))


@contextmanager
def process_group(device_name: str = "auto", timeout_min: float = 30.0) -> Iterator[bool]:
    """`init` on entry; on exit leave the group: orderly after success, abort after an error (re-raised, so
    that the caller prints its one line and exits non-zero, which makes torchrun stop the other ranks). A
    process whose collective failed because another one died says so in one line (exit status 1) instead of
    a traceback: the failing process's own line is the one to read."""
    started = init(device_name, timeout_min)
    try:
        yield started
    except BaseException as e:
        if not started:
            raise
        where = rank()
        abort()
        if lost_peer(e):
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"error: rank {where}: stopped because another process failed or stopped answering ({first})",
                  file=sys.stderr)
            raise SystemExit(1) from None
        raise
    if started:
        shutdown()


def barrier() -> None:
    if not is_distributed():
        return
    if backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating a dataset on first use), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_object_group)
    return out


def gather_object(obj: Any, dst: int = 0) -> Optional[list[Any]]:
    """[obj of every rank] on rank `dst`, None elsewhere."""
    if not is_distributed():
        return [obj]
    out: Optional[list[Any]] = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_object_group)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s obj on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group)
    return box[0]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place: the sum, mean or max of `tensor` over ranks (unchanged with one process)."""
    if not is_distributed():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    dist.all_reduce(tensor, op=ops[op])
    if op == "mean":
        tensor /= world_size()
    return tensor
