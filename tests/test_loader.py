"""Reproducible batching: same seed -> same batches (order and augmentation), collate types."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from maskrcnn.data.coco import CocoInstances
from maskrcnn.data.loader import build_loader, collate
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.transforms import Compose, RandomHorizontalFlip


class _Random(Dataset):
    """Item i: a tensor and a target whose 'aug' value comes from torch's RNG (like an augmentation)."""

    def __init__(self, n: int = 10) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        return torch.full((3, 4, 5), float(i)), {"index": i, "aug": torch.rand(()).item()}


def _summary(batches) -> list[list[tuple[int, float]]]:
    return [[(t["index"], t["aug"]) for t in targets] for _, targets in batches]


def test_collate_types() -> None:
    batch = [_Random()[0], _Random()[1]]
    images, targets = collate(batch)
    assert isinstance(images, list) and isinstance(targets, list)
    assert all(isinstance(im, torch.Tensor) for im in images) and targets[1]["index"] == 1
    images, targets = next(iter(build_loader(_Random(), 3, shuffle=False, num_workers=0, seed=0)))
    assert isinstance(images, list) and len(images) == 3 and images[2].shape == (3, 4, 5)
    assert [t["index"] for t in targets] == [0, 1, 2]


def test_same_seed_same_batches() -> None:
    a = _summary(build_loader(_Random(), 3, shuffle=True, num_workers=0, seed=7))
    b = _summary(build_loader(_Random(), 3, shuffle=True, num_workers=0, seed=7))
    c = _summary(build_loader(_Random(), 3, shuffle=True, num_workers=0, seed=8))
    assert a == b and a != c
    assert sorted(i for batch in a for i, _ in batch) == list(range(10))  # one full epoch
    assert [len(x) for x in a] == [3, 3, 3, 1]


def test_independent_of_global_rng_and_workers() -> None:
    torch.manual_seed(123)
    a = _summary(build_loader(_Random(), 4, shuffle=True, num_workers=0, seed=1))
    torch.manual_seed(999)  # a different global state must not matter
    b = _summary(build_loader(_Random(), 4, shuffle=True, num_workers=0, seed=1))
    assert a == b
    loader = build_loader(_Random(), 4, shuffle=True, num_workers=2, seed=1)
    assert _summary(loader) == a  # same batches with worker processes
    del loader


def test_loader_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(build_loader(_Random(), 4, shuffle=True, num_workers=0, seed=1))
    assert torch.equal(before, torch.get_rng_state())


def test_epochs_reshuffle_and_resume() -> None:
    loader = build_loader(_Random(), 5, shuffle=True, num_workers=0, seed=3, drop_last=True)
    epoch0, epoch1 = _summary(loader), _summary(loader)
    assert epoch0 != epoch1 and loader.epoch == 2
    resumed = build_loader(_Random(), 5, shuffle=True, num_workers=0, seed=3, drop_last=True)
    resumed.set_position(1)
    assert _summary(resumed) == epoch1


def test_infinite() -> None:
    loader = build_loader(_Random(10), 4, shuffle=True, num_workers=0, seed=2, drop_last=True, infinite=True)
    assert loader.batches_per_epoch == 2
    with pytest.raises(TypeError):
        len(loader)
    batches = _summary(itertools.islice(iter(loader), 7))
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    epochs = [[i for b in batches[k:k + 2] for i, _ in b] for k in range(0, 6, 2)]
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    again = _summary(itertools.islice(iter(build_loader(_Random(10), 4, True, 0, 2, True, True)), 7))
    assert again == batches
    with pytest.raises(ValueError, match="never yield"):
        build_loader(_Random(3), 4, shuffle=True, num_workers=0, seed=0, drop_last=True, infinite=True)


def test_flip_augmentation_repeatable(tmp_path: Path) -> None:
    paths = generate_shapes(tmp_path, num_train=6, num_val=0, image_size=64, seed=0)
    ds = CocoInstances(paths["train_images"], paths["train_ann"], transforms=Compose([RandomHorizontalFlip(0.5)]))

    def run(seed: int) -> list[torch.Tensor]:
        return [t["boxes"] for _, targets in build_loader(ds, 2, True, 0, seed) for t in targets]

    a, b = run(0), run(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    runs = [run(s) for s in range(1, 6)]
    assert any(not all(torch.equal(x, y) for x, y in zip(a, r)) for r in runs)


def test_position_and_set_position_continue_the_same_batches() -> None:
    """A loader started at (epoch, index) yields what an uninterrupted one yields from there, and `position`
    after each batch is where a stopped run must start again."""
    def make():
        return build_loader(_Random(10), 3, shuffle=True, num_workers=0, seed=5, drop_last=True, infinite=True)

    loader = make()
    assert loader.position == (0, 0) and loader.batches_per_epoch == 3
    stream = iter(loader)
    batches, positions = [], []
    for _ in range(8):
        batches.append(_summary([next(stream)])[0])
        positions.append(loader.position)
    assert positions == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    for k in (1, 2, 4, 6):  # mid-epoch and at an epoch boundary
        resumed = make()
        resumed.set_position(*positions[k - 1])
        rest = _summary(itertools.islice(iter(resumed), 8 - k))
        assert rest == batches[k:], k
    with pytest.raises(ValueError, match="outside"):
        make().set_position(0, 3)


def test_set_position_skips_without_loading() -> None:
    class Counting(_Random):
        loaded = 0

        def __getitem__(self, i):
            Counting.loaded += 1
            return super().__getitem__(i)

    loader = build_loader(Counting(10), 2, shuffle=True, num_workers=0, seed=1, drop_last=True)
    full = _summary(loader)
    Counting.loaded = 0
    resumed = build_loader(Counting(10), 2, shuffle=True, num_workers=0, seed=1, drop_last=True)
    resumed.set_position(0, 3)
    assert _summary(resumed) == full[3:] and Counting.loaded == 4


def test_set_position_with_workers() -> None:
    a = _summary(itertools.islice(iter(build_loader(_Random(10), 2, True, 0, 4, True, True)), 9))
    loader = build_loader(_Random(10), 2, True, 2, 4, True, True)
    loader.set_position(1, 2)
    assert _summary(itertools.islice(iter(loader), 2)) == a[7:9]
    del loader


# ------------------------------------------------------------------------- shards, accumulation, grouping
class _Sized(_Random):
    """_Random with COCO-like image records: item i is landscape when i % 3 != 0."""

    def image_info(self, i: int) -> dict:
        return {"height": 480, "width": 640} if i % 3 else {"height": 640, "width": 480}


def _steps(loaders, k: int, n: int) -> list[list[tuple[int, float]]]:
    """The global steps seen by `loaders` (one per rank, each yielding k micro-batches per step), in the order
    a single process of batch (ranks x micro-batch) would hold them: micro-batch by micro-batch, rank by rank."""
    streams = [iter(l) for l in loaders]
    out = []
    for _ in range(n):
        micro = [[_summary([next(s)])[0] for s in streams] for _ in range(k)]
        out.append([x for per_rank in micro for batch in per_rank for x in batch])
    return out


@pytest.mark.parametrize("grouping", [False, True])
def test_ranks_and_micro_batches_split_the_single_process_steps(grouping) -> None:
    """A step holds the same images (with the same augmentation seeds) on 1 process x 4 images, 2 processes x 2,
    4 processes x 1, and 1 process accumulating 2 x 2; every process has its own share and all agree on the
    position in global samples."""
    ds = _Sized(30)

    def make(bs, replicas=1, rank=0, accumulate=1):
        return build_loader(ds, bs, True, 0, 3, drop_last=True, infinite=True, aspect_ratio_grouping=grouping,
                            num_replicas=replicas, rank=rank, accumulate=accumulate)

    single = _steps([make(4)], 1, 10)  # 10 steps cross two epochs (7 steps each)
    assert make(4).samples_per_epoch == 28 and make(4).samples_per_step == 4
    for replicas, bs, k in [(2, 2, 1), (4, 1, 1), (1, 2, 2), (2, 1, 2)]:
        loaders = [make(bs, replicas, r, k) for r in range(replicas)]
        assert _steps(loaders, k, 10) == single, (replicas, bs, k)
        assert len({l.sample_position for l in loaders}) == 1
        assert loaders[0].sample_position == (1, 12)  # 10 steps = 7 of epoch 0 and 3 of epoch 1
        assert loaders[0].batches_per_epoch == 7 * k
    for step in single:
        assert len({i % 3 != 0 for i, _ in step}) == 1 or not grouping  # one orientation per step
    shards = [[i for i, _ in batch] for batch in _summary(itertools.islice(iter(make(2, 2, 1)), 7))]
    assert all(len(b) == 2 for b in shards)


def test_resume_on_another_number_of_processes_continues_the_global_order() -> None:
    """Stopped after 5 steps of 4 images on one process; continued on 2 processes x 2 images from the position
    in global samples: the same steps as the uninterrupted single process."""
    ds = _Sized(30)
    single = build_loader(ds, 4, True, 0, 9, drop_last=True, infinite=True, aspect_ratio_grouping=True)
    reference = _steps([single], 1, 12)
    stopped = build_loader(ds, 4, True, 0, 9, drop_last=True, infinite=True, aspect_ratio_grouping=True)
    _steps([stopped], 1, 5)
    epoch, samples = stopped.sample_position
    assert (epoch, samples) == (0, 20)
    loaders = [build_loader(ds, 2, True, 0, 9, drop_last=True, infinite=True, aspect_ratio_grouping=True,
                            num_replicas=2, rank=r) for r in range(2)]
    for l in loaders:
        l.set_sample_position(epoch, samples)
    assert _steps(loaders, 1, 7) == reference[5:]
    with pytest.raises(ValueError, match="does not start a step"):
        loaders[0].set_sample_position(0, 2)


def test_shard_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="rank 2 of 2"):
        build_loader(_Random(), 2, True, 0, 0, drop_last=True, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="drop_last=False needs one process"):
        build_loader(_Random(), 2, True, 0, 0, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="aspect_ratio_grouping needs image sizes"):
        build_loader(_Random(), 2, True, 0, 0, aspect_ratio_grouping=True)
    loader = build_loader(_Random(10), 2, True, 0, 0, drop_last=True, infinite=True, accumulate=2)
    with pytest.raises(ValueError, match="in steps of 2"):
        loader.set_position(0, 1)
