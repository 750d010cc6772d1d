"""Deterministic batching for detection datasets.

Reproducibility design: every epoch's order *and* a per-sample augmentation
seed are drawn from ``(seed, epoch)``.  Each sample is loaded with torch's RNG
seeded from its own seed (then restored, so the caller's global RNG is untouched).
Consequently the same seed gives the same batches whatever ``num_workers`` is,
and epoch ``e`` of a resumed run equals epoch ``e`` of an uninterrupted one.
:attr:`SeededLoader.position` says where the next batch comes from, ``(epoch, batch
index)``; :meth:`SeededLoader.set_position` starts there, skipping the batches
before it without loading them, so a resumed run sees exactly the batches that
the uninterrupted run would have seen.

Several processes (torchrun) share one global order: an epoch's order is cut into *steps* of
``batch_size x num_replicas x accumulate`` samples (aspect-ratio grouped when asked: every step of one
orientation), each step into ``accumulate`` micro-batches of ``num_replicas`` consecutive slices of
``batch_size``, and process ``rank`` takes its slice of each. A step therefore holds the same images whatever
the split: one process with 16 images, 8 processes with 2, or one process accumulating 8 micro-batches of 2.
:attr:`SeededLoader.sample_position` gives the position in global samples, which a run resumed on another
number of processes continues from.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .samplers import GroupedBatchSampler, dataset_landscape_flags

__all__ = ["collate", "build_loader", "SeededLoader", "epoch_seed"]

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> Batch:
    """Keep images (of different sizes) and targets as lists; the model pads them."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch)`` (nearby seeds give unrelated streams)."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class _EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` pairs; order and seeds depend only on (seed, epoch)."""

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # samples of this epoch not to yield (a resumed epoch); the order itself is unchanged

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        return iter(list(zip(order.tolist(), seeds.tolist()))[self.skip:])

    def __len__(self) -> int:
        return self.size


class _StepBatchSampler(Sampler[list]):
    """This process's micro-batches of one epoch (see the module docstring): the epoch's (index, seed) pairs cut
    into steps of ``batch_size * num_replicas * accumulate`` (plain, or aspect-ratio grouped with `landscape`
    flags), each step split into ``accumulate`` micro-batches of ``num_replicas`` slices; slice ``rank`` is ours.
    ``skip``: steps of this epoch not to yield (a resumed epoch)."""

    def __init__(self, sampler: _EpochSampler, batch_size: int, drop_last: bool, num_replicas: int = 1,
                 rank: int = 0, accumulate: int = 1, landscape: Sequence[bool] | None = None) -> None:
        self.sampler = sampler
        self.batch_size, self.num_replicas, self.rank, self.accumulate = batch_size, num_replicas, rank, accumulate
        self.step_size = batch_size * num_replicas * accumulate
        self.drop_last = drop_last
        self.grouped = (GroupedBatchSampler(sampler, landscape, self.step_size, drop_last)
                        if landscape is not None else None)
        self.skip = 0

    def _steps(self) -> Iterator[list]:
        if self.grouped is not None:  # groups the whole epoch's order, then skips whole steps
            self.sampler.skip = 0
            self.grouped.skip = self.skip
            yield from self.grouped
            return
        self.sampler.skip = self.skip * self.step_size  # skipped pairs are never loaded
        step: list = []
        for item in self.sampler:
            step.append(item)
            if len(step) == self.step_size:
                yield step
                step = []
        if step and not self.drop_last:
            yield step

    def __iter__(self) -> Iterator[list]:
        for step in self._steps():
            for m in range(self.accumulate):
                start = (m * self.num_replicas + self.rank) * self.batch_size
                yield step[start:start + self.batch_size]

    def steps_per_epoch(self) -> int:
        if self.grouped is not None:
            return len(self.grouped)
        n = len(self.sampler)
        return n // self.step_size if self.drop_last else -(-n // self.step_size)

    def __len__(self) -> int:
        return self.steps_per_epoch() * self.accumulate


class _SeededItems(Dataset):
    """Loads ``dataset[index]`` with torch's RNG seeded by the sample's own seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        # Seed only the CPU generator (torch.manual_seed also queues CUDA seeding,
        # ~1 ms per call) and restore it afterwards, so loading in the main
        # process (num_workers=0) does not disturb the training loop's RNG.
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            gen.set_state(state)


def _worker_init_fn(worker_id: int) -> None:
    """Seed numpy/random in each worker from torch's per-worker seed (set by DataLoader); leave SIGTERM and
    SIGINT to the main process. They often reach the whole process group (Ctrl-C in a terminal, a cluster
    scheduler's preemption); a worker they killed would make the main process fail at its next batch instead of
    stopping after its step with a checkpoint. Workers end with the main process as always."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class SeededLoader:
    """Iterable over ``(images, targets)`` batches; see :func:`build_loader`.

    Each pass (one ``iter()`` of a finite loader, or each epoch of an infinite
    one) uses epoch number :attr:`epoch` and then advances it, so consecutive
    epochs are shuffled differently. Batch indices count this process's
    (micro-)batches; a step of training is ``accumulate`` of them.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        num_workers: int,
        seed: int,
        drop_last: bool = False,
        infinite: bool = False,
        pin_memory: bool = False,
        aspect_ratio_grouping: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        accumulate: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} of {num_replicas} processes is not a valid shard")
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if not drop_last and num_replicas * accumulate > 1:
            raise ValueError("drop_last=False needs one process and no accumulation (a short last step cannot be "
                             "split evenly)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_replicas, self.rank, self.accumulate = num_replicas, rank, accumulate
        self.infinite = infinite
        self.epoch = 0
        self._start_index = 0  # first batch of the next epoch to iterate (set_position)
        self._position = (0, 0)
        self.sampler = _EpochSampler(len(dataset), shuffle, seed)  # type: ignore[arg-type]
        landscape = dataset_landscape_flags(dataset) if aspect_ratio_grouping else None
        self.batch_sampler = _StepBatchSampler(self.sampler, batch_size, drop_last, num_replicas, rank, accumulate,
                                               landscape)
        self.loader = DataLoader(
            _SeededItems(dataset),
            batch_sampler=self.batch_sampler,
            num_workers=num_workers,
            collate_fn=collate,
            # Seeds the workers' base seed (numpy/random via worker_init_fn).
            generator=torch.Generator().manual_seed(int(seed)),
            worker_init_fn=_worker_init_fn,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,  # page-locked batches, so .to(cuda, non_blocking=True) overlaps
        )
        if infinite and len(self.loader) == 0:
            raise ValueError(
                f"dataset of {len(dataset)} images gives no step of "  # type: ignore[arg-type]
                f"{self.batch_sampler.step_size} with drop_last=True; an infinite loader would never yield"
            )

    @property
    def batches_per_epoch(self) -> int:
        """This process's (micro-)batches per epoch."""
        return len(self.loader)

    @property
    def samples_per_step(self) -> int:
        """Global samples per step: batch_size x num_replicas x accumulate."""
        return self.batch_sampler.step_size

    @property
    def samples_per_epoch(self) -> int:
        """Global samples an epoch yields (after drop_last and grouping)."""
        return self.batch_sampler.steps_per_epoch() * self.samples_per_step

    def set_position(self, epoch: int, index: int = 0) -> None:
        """Start the next iteration at batch ``index`` of ``epoch``: the batches of an uninterrupted run from
        there on, without loading the ones before. ``index`` must start a step (a multiple of accumulate)."""
        if epoch < 0 or not 0 <= index < max(1, self.batches_per_epoch) or index % self.accumulate:
            raise ValueError(f"loader position ({epoch}, {index}) outside epochs of {self.batches_per_epoch} batches"
                             f"{f' in steps of {self.accumulate}' if self.accumulate > 1 else ''}")
        self.epoch, self._start_index = int(epoch), int(index)
        self._position = (self.epoch, self._start_index)

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch index)`` of the next batch: what to pass to :meth:`set_position` to continue."""
        return self._position

    @property
    def sample_position(self) -> tuple[int, int]:
        """``(epoch, global samples of the epoch before the next batch)``, the same on every process."""
        epoch, index = self._position
        return epoch, index * self.batch_size * self.num_replicas

    def set_sample_position(self, epoch: int, samples: int) -> None:
        """:meth:`set_position` in global samples; ``samples`` must start a step of this loader."""
        if samples % self.samples_per_step:
            raise ValueError(f"sample position {samples} does not start a step of {self.samples_per_step} samples")
        self.set_position(epoch, samples // (self.batch_size * self.num_replicas))

    def _one_epoch(self) -> Iterator[Batch]:
        # Advance first: an epoch abandoned half-way is not replayed by the next iter().
        epoch, start = self.epoch, self._start_index
        self.sampler.epoch, self.batch_sampler.skip = epoch, start // self.accumulate
        self.epoch, self._start_index = epoch + 1, 0
        self._position = (epoch, start)
        n = self.batches_per_epoch
        for index, batch in enumerate(self.loader, start):
            # Set before the yield: a caller that stops here (a checkpoint) reads where the next batch is.
            self._position = (epoch, index + 1) if index + 1 < n else (epoch + 1, 0)
            yield batch
        self.batch_sampler.skip = 0
        self.sampler.skip = 0

    def __iter__(self) -> Iterator[Batch]:
        if not self.infinite:
            return self._one_epoch()
        return self._forever()

    def _forever(self) -> Iterator[Batch]:
        while True:
            yield from self._one_epoch()

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite loader has no length; use batches_per_epoch")
        return len(self.loader)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as taskset or a container's cpuset sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_workers(num_workers: int) -> int:
    """`num_workers` loader processes, at most one per available CPU (more only compete for the same cores, and
    PyTorch warns about them): a preset's 4 workers become 2 on a 2-core machine, with one line saying so. The
    batches do not depend on the number of workers."""
    cpus = available_cpus()
    if num_workers > cpus:
        print(f"data loader: {num_workers} workers asked for (data.num_workers), this machine has {cpus} CPU(s) "
              f"available: using {cpus}")
        return cpus
    return num_workers


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
    infinite: bool = False,
    pin_memory: bool = False,
    aspect_ratio_grouping: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    accumulate: int = 1,
) -> SeededLoader:
    """A reproducible loader yielding ``(list[image], list[target])`` batches.

    Args:
        dataset: map-style dataset of ``(image, target)``.
        batch_size: images per batch (on this process).
        shuffle: reshuffle every epoch (order depends on ``(seed, epoch)``).
        num_workers: loader processes (persistent across epochs when > 0), at most one per available CPU
            (``usable_workers``).
        seed: same seed -> same batches, including random augmentation.
        drop_last: drop the last incomplete step of each epoch.
        infinite: yield batches forever, epoch after epoch (for
            iteration-based training); otherwise one epoch per ``iter()``.
        pin_memory: page-locked batches for fast host-to-GPU copies (CUDA only).
        aspect_ratio_grouping: every step holds only landscape or only portrait
            images (flags from the dataset's image records, see samplers.py).
        num_replicas, rank: this process's shard of the global order (torchrun).
        accumulate: micro-batches per step (gradient accumulation).
    """
    return SeededLoader(dataset, batch_size, shuffle, usable_workers(num_workers), seed, drop_last, infinite,
                        pin_memory, aspect_ratio_grouping, num_replicas, rank, accumulate)
