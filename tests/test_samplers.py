"""Tests for maskrcnn.data.samplers: aspect-ratio grouped batches (single orientation, each image once per
epoch, deterministic given the epoch's order) and the padding they save on COCO-like image sizes."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader

from maskrcnn.data.loader import _EpochSampler
from maskrcnn.data.samplers import (GroupedBatchSampler, group_by_aspect_ratio, grouped_batch_count,
                                    landscape_flags, padding_fraction)
from maskrcnn.model.transform import resized_size

SHORT_SIDES = (640, 672, 704, 736, 768, 800)


def coco_like_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(h, w) like COCO train2017's: long side mostly 640, aspect 4:3 most often, ~70% landscape, a few squares."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        long = 640 if rng.random() < 0.9 else rng.randint(300, 640)
        aspect = rng.choices([4 / 3, 3 / 2, 1.0, 16 / 9, rng.uniform(1.1, 2.2)], [0.55, 0.2, 0.08, 0.07, 0.1])[0]
        short = round(long / aspect)
        sizes.append((short, long) if rng.random() < 0.72 else (long, short))
    return sizes


def epoch_order(n: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    sampler = _EpochSampler(n, shuffle=True, seed=seed)
    sampler.epoch = epoch
    return list(sampler)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 16])
@pytest.mark.parametrize("drop_last", [True, False])
def test_single_orientation_and_each_image_once(batch_size, drop_last):
    sizes = coco_like_sizes(203, seed=batch_size)
    flags = landscape_flags(sizes)
    order = epoch_order(len(sizes), seed=3, epoch=1)
    batches = group_by_aspect_ratio(order, [flags[i] for i, _ in order], batch_size, drop_last)
    for b in batches:
        assert len({flags[i] for i, _ in b}) == 1, "a batch mixes landscape and portrait images"
        assert len(b) == batch_size or not drop_last
    seen = [i for b in batches for i, _ in b]
    assert len(seen) == len(set(seen)), "an image appears twice in one epoch"
    n_land = sum(flags)
    n_port = len(flags) - n_land
    dropped = len(sizes) - len(seen)
    if drop_last:  # only the two buckets' remainders are missing
        assert dropped == n_land % batch_size + n_port % batch_size
        assert all(len(b) == batch_size for b in batches)
    else:
        assert dropped == 0
    assert len(batches) == grouped_batch_count(n_land, n_port, batch_size, drop_last)
    # the sample seeds travel with their images
    seeds = dict(order)
    assert all(seeds[i] == s for b in batches for i, s in b)


def test_deterministic_given_seed_and_epoch():
    sizes = coco_like_sizes(100)
    flags = landscape_flags(sizes)

    def batches(seed, epoch):
        order = epoch_order(len(sizes), seed, epoch)
        return group_by_aspect_ratio(order, [flags[i] for i, _ in order], 4)

    assert batches(0, 2) == batches(0, 2)
    assert batches(0, 2) != batches(0, 3)
    assert batches(0, 2) != batches(1, 2)


def test_batches_in_completion_order():
    # L L P L P P
    flags = [True, True, False, True, False, False]
    assert group_by_aspect_ratio(list(range(6)), flags, 2) == [[0, 1], [2, 4]]  # [3] and [5] left over
    assert group_by_aspect_ratio(list(range(6)), flags, 2, drop_last=False) == [[0, 1], [2, 4], [3], [5]]
    assert group_by_aspect_ratio(list(range(6)), flags, 3) == [[0, 1, 3], [2, 4, 5]]
    assert group_by_aspect_ratio(list(range(5)), flags[:5], 3, drop_last=False) == [[0, 1, 3], [2, 4]]


def test_landscape_flags_square_is_portrait():
    assert landscape_flags([(480, 640), (640, 480), (500, 500)]) == [True, False, False]


def test_errors_are_one_line():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        group_by_aspect_ratio([1, 2], [True, False], 0)
    with pytest.raises(ValueError, match="2 items but 1 aspect flags"):
        group_by_aspect_ratio([1, 2], [True], 2)


def test_grouped_batch_sampler_with_dataloader_and_skip():
    sizes = coco_like_sizes(40, seed=5)
    flags = landscape_flags(sizes)
    sampler = _EpochSampler(len(sizes), shuffle=True, seed=7)
    batch_sampler = GroupedBatchSampler(sampler, flags, batch_size=4)
    loader = DataLoader(list(range(len(sizes))), batch_sampler=batch_sampler,
                        collate_fn=lambda batch: batch)
    sampler.epoch = 2
    full = [[(i, s) for i, s in b] for b in batch_sampler]
    assert len(full) == len(batch_sampler) == len(loader)
    assert all(len({flags[i] for i, _ in b}) == 1 for b in full)
    batch_sampler.skip = 3  # resume at batch 3 of the same epoch
    assert list(batch_sampler) == full[3:]


def _padding(batches_idx, sizes, seed=0):
    rng = random.Random(seed)
    resized = [resized_size(h, w, rng.choice(SHORT_SIDES), 1333, "detectron2") for h, w in sizes]
    return padding_fraction(batches_idx, resized, 32)


@pytest.mark.parametrize("batch_size", [2, 16])
def test_grouping_reduces_padding_on_coco_like_sizes(batch_size):
    sizes = coco_like_sizes(4000, seed=1)
    flags = landscape_flags(sizes)
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(0)).tolist()
    plain = [order[k:k + batch_size] for k in range(0, len(order) - batch_size + 1, batch_size)]
    grouped = group_by_aspect_ratio(order, [flags[i] for i in order], batch_size)
    without, with_ = _padding(plain, sizes), _padding(grouped, sizes)
    print(f"batch {batch_size}: padding {without:.1%} without grouping, {with_:.1%} with")
    # measured: batch 2: 20.4% -> 12.4%; batch 16: 52.1% -> 30.3% (what is left comes from the per-image short
    # side, 640..800, and from aspect ratios other than 4:3 inside one orientation)
    assert with_ < 0.65 * without
    assert with_ < (0.14 if batch_size == 2 else 0.33)


# ------------------------------------------------------------------------- wired into the training loader
def test_build_loader_groups_a_coco_dataset_and_resumes_exactly(tmp_path):
    """data.aspect_ratio_grouping: the flags come from the dataset's image records, every batch the loader
    yields has one orientation, the same seed gives the same batches, and a loader set to a position (epoch,
    batch) continues with exactly the batches of an uninterrupted one."""
    import itertools

    from maskrcnn.data.coco import CocoInstances
    from maskrcnn.data.loader import build_loader
    from maskrcnn.data.samplers import dataset_landscape_flags
    from maskrcnn.data.shapes import generate_shapes
    from maskrcnn.data.transforms import Compose, RandomHorizontalFlip

    paths = generate_shapes(tmp_path, num_train=24, num_val=0, image_size=(48, 80), seed=1)
    ds = CocoInstances(paths["train_images"], paths["train_ann"], transforms=Compose([RandomHorizontalFlip(0.5)]))
    flags = dataset_landscape_flags(ds)
    assert 0 < sum(flags) < len(flags), "the generated set should hold both orientations"

    def make():
        return build_loader(ds, 3, shuffle=True, num_workers=0, seed=4, drop_last=True, infinite=True,
                            aspect_ratio_grouping=True)

    def batches(loader, n):
        out, positions = [], []
        for images, targets in itertools.islice(iter(loader), n):
            out.append([(t["image_id"], tuple(img.shape[-2:]), tuple(t["boxes"].flatten().tolist()))
                        for img, t in zip(images, targets)])
            positions.append(loader.position)
        return out, positions

    loader = make()
    per_epoch = loader.batches_per_epoch
    assert per_epoch == grouped_batch_count(sum(flags), len(flags) - sum(flags), 3)
    reference, positions = batches(loader, 2 * per_epoch + 2)
    for batch in reference:
        assert len({w > h for _, (h, w), _ in batch}) == 1, batch  # one orientation, checked on the pixels
    assert batches(make(), 2 * per_epoch + 2)[0] == reference  # deterministic, augmentation included
    plain = build_loader(ds, 3, shuffle=True, num_workers=0, seed=4, drop_last=True, infinite=True)
    assert batches(plain, per_epoch)[0] != reference[:per_epoch]  # the grouping changed the batches
    for k in (1, per_epoch - 1, per_epoch, per_epoch + 1):
        resumed = make()
        resumed.set_position(*positions[k - 1])
        assert batches(resumed, len(reference) - k)[0] == reference[k:], k
