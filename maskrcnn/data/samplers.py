"""Aspect-ratio grouping: training batches of only landscape or only portrait images.

A batch is padded to its largest height and its largest width, so a landscape image (800x1067 after
resizing) batched with a portrait one (1067x800) gives a 1067x1067 batch that is ~25% padding; detectron2's
AspectRatioGroupedDataset avoids it by sending each image to one of two buckets (width > height, or not) and
emitting a bucket as a batch as soon as it holds `batch_size` images. This module does the same on one
epoch's order, as a pure function, so that the batches are decided by the order alone:

    order = the epoch's shuffled (index, sample seed) pairs   (maskrcnn.data.loader, from (seed, epoch))
    batches = group_by_aspect_ratio(order, [landscape[i] for i, _ in order], batch_size)

Same order, same batches; batch b of epoch e is found again by recomputing the epoch and taking batches[b:]
(a resumed run), and every batch holds one orientation. Images left in the two buckets at the end of an epoch
(fewer than batch_size each) are dropped (`drop_last`) or emitted as two smaller batches.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence, TypeVar

from torch.utils.data import Sampler

__all__ = ["group_by_aspect_ratio", "grouped_batch_count", "landscape_flags", "dataset_landscape_flags",
           "padding_fraction", "GroupedBatchSampler"]

T = TypeVar("T")


def landscape_flags(sizes: Sequence[tuple[int, int]]) -> list[bool]:
    """(height, width) per image -> True where width > height (detectron2's bucket 0; squares go with portrait)."""
    return [w > h for h, w in sizes]


def dataset_landscape_flags(dataset) -> list[bool]:
    """One flag per dataset index from the image records' width and height (COCO "images" entries, through
    `dataset.image_info(i)`), so no image is opened. A horizontal flip keeps the orientation."""
    if not hasattr(dataset, "image_info"):
        raise ValueError(f"data.aspect_ratio_grouping needs image sizes, which a {type(dataset).__name__} does not "
                         "give (image_info(i) with width and height, as CocoInstances)")
    sizes = []
    for i in range(len(dataset)):
        info = dataset.image_info(i)
        sizes.append((int(info["height"]), int(info["width"])))
    return landscape_flags(sizes)


def group_by_aspect_ratio(items: Sequence[T], landscape: Sequence[bool], batch_size: int,
                          drop_last: bool = True) -> list[list[T]]:
    """Batches of `items` (one epoch, in order) in which every item has the same `landscape` flag.

    A batch is emitted when its bucket fills, so batches come in the order they complete and items keep their
    order inside a batch. With `drop_last` the (at most batch_size - 1 per orientation) items left at the end
    are dropped, otherwise they end the epoch as up to two smaller batches (landscape first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(items) != len(landscape):
        raise ValueError(f"{len(items)} items but {len(landscape)} aspect flags")
    buckets: dict[bool, list[T]] = {True: [], False: []}
    batches: list[list[T]] = []
    for item, flag in zip(items, landscape):  # a loop over the images of an epoch, on the host, not over tensors
        bucket = buckets[bool(flag)]
        bucket.append(item)
        if len(bucket) == batch_size:
            batches.append(list(bucket))
            bucket.clear()
    if not drop_last:
        batches.extend(b for b in (buckets[True], buckets[False]) if b)
    return batches


def grouped_batch_count(num_landscape: int, num_portrait: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch of group_by_aspect_ratio: it depends only on the two counts, not on the order."""
    rounding = math.floor if drop_last else math.ceil
    return int(rounding(num_landscape / batch_size) + rounding(num_portrait / batch_size))


def padding_fraction(batches: Sequence[Sequence[int]], sizes: Sequence[tuple[int, int]],
                     size_divisibility: int = 32) -> float:
    """Fraction of the padded batch pixels that are padding, over all `batches` of indices into (h, w) `sizes`
    (the sizes after resizing), with each batch padded to its largest side, rounded up to the divisibility."""
    total = used = 0
    d = size_divisibility
    for batch in batches:
        hs = [sizes[i][0] for i in batch]
        ws = [sizes[i][1] for i in batch]
        hp, wp = -(-max(hs) // d) * d, -(-max(ws) // d) * d
        total += len(batch) * hp * wp
        used += sum(h * w for h, w in zip(hs, ws))
    return 1.0 - used / total if total else 0.0


class GroupedBatchSampler(Sampler[list]):
    """A DataLoader `batch_sampler` that groups the items of an epoch sampler by orientation.

    sampler: yields one epoch's items, e.g. maskrcnn.data.loader's (index, sample seed) pairs; `index_of(item)`
    gives the dataset index of an item (default: item[0] for a pair, else the item). landscape: one flag per
    dataset index. `skip` batches of the epoch are not yielded (a resumed epoch): set it, and the wrapped
    sampler's epoch, before iterating; the wrapped sampler must itself yield the whole epoch.
    """

    def __init__(self, sampler: Sampler, landscape: Sequence[bool], batch_size: int, drop_last: bool = True):
        self.sampler = sampler
        self.landscape = [bool(f) for f in landscape]
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.skip = 0

    @staticmethod
    def index_of(item) -> int:
        return item[0] if isinstance(item, (tuple, list)) else int(item)

    def __iter__(self) -> Iterator[list]:
        items = list(self.sampler)
        flags = [self.landscape[self.index_of(it)] for it in items]
        return iter(group_by_aspect_ratio(items, flags, self.batch_size, self.drop_last)[self.skip:])

    def __len__(self) -> int:
        n_land = sum(self.landscape)
        return grouped_batch_count(n_land, len(self.landscape) - n_land, self.batch_size, self.drop_last)
