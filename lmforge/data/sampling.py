"""Which samples go into each global batch: the order sampler, the seeded holdout split, and the
resumable batch sources the training loop reads (one over a list of samples, one mixing datasets).

A batch source's `state_dict` is its position; after `load_state_dict` it yields exactly what an
uninterrupted run would have yielded next."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: ordering samples never needs it
    from torch import Tensor

T = TypeVar("T")
Batch = dict[str, "Tensor"]


class OrderSampler:
    """Endless, deterministic, resumable global batches of sample indices.

    Epoch e visits a permutation of `range(num_samples)` seeded by `seed + e`, cut into consecutive
    batches of `global_batch_size`; the tail that does not fill a batch is dropped. The state is
    the epoch and the position (batches already taken) in it: after `load_state_dict`, `next()`
    returns exactly what an uninterrupted run would have returned next.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, global_batch_size, seed
        self.batches_per_epoch = num_samples // global_batch_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the samples in `epoch`."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(self.num_samples))
        return self._order[1]

    def next(self) -> list[int]:
        """The next global batch of sample indices."""
        start = self.position * self.batch_size
        batch = self.permutation(self.epoch)[start : start + self.batch_size].tolist()
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        return self.next()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"bad batch state {state}: epochs here have {self.batches_per_epoch} batches")
        self.epoch, self.position = epoch, position


def shard(indices: Sequence[int], rank: int, world_size: int, micro_step: int, micro_batches: int) -> list[int]:
    """The samples of one micro-step on one rank: rank r takes the r-th of `world_size` equal,
    contiguous parts of the global batch, and micro-step m the m-th of `micro_batches` equal,
    contiguous parts of that (as `train.loop.Trainer` cuts batches)."""
    if len(indices) % (world_size * micro_batches):
        raise ValueError(f"a global batch of {len(indices)} does not split into {world_size} ranks "
                         f"x {micro_batches} micro-batches")
    if not (0 <= rank < world_size and 0 <= micro_step < micro_batches):
        raise ValueError(f"rank {rank} / micro_step {micro_step} out of range "
                         f"(world_size {world_size}, micro_batches {micro_batches})")
    per_rank = len(indices) // world_size
    per_micro = per_rank // micro_batches
    start = rank * per_rank + micro_step * per_micro
    return list(indices[start : start + per_micro])


def holdout_split(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(kept, held out): a seeded `fraction` of `items` held out in permutation order, the rest
    kept in their original order."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_held = int(len(order) * fraction)
    return [items[i] for i in sorted(order[n_held:])], [items[i] for i in order[:n_held]]


class SampledSource:
    """Global batches of a dataset of `num_samples` in a seeded order, epoch after epoch:
    `make_batch` turns a batch's sample indices into tensors. Resumable."""

    def __init__(self, num_samples: int, make_batch: Callable[[list[int]], Batch], global_batch: int,
                 seed: int) -> None:
        self.make_batch = make_batch
        self.order = OrderSampler(num_samples, global_batch, seed)

    def next_batch(self) -> Batch:
        return self.make_batch(self.order.next())

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


class MixtureSource:
    """Global batches of samples drawn from several datasets in proportion to their weights; each
    dataset is read in a seeded order, epoch after epoch, and `collate` makes the batch. Resumable."""

    def __init__(self, datasets: Sequence[Sequence[T]], weights: Sequence[float], collate: Callable[[list[T]], Batch],
                 global_batch: int, seed: int) -> None:
        self.datasets, self.collate, self.global_batch = datasets, collate, global_batch
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.orders = [OrderSampler(len(d), 1, seed + i) for i, d in enumerate(datasets)]
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> Batch:
        picks = self.rng.choice(len(self.datasets), size=self.global_batch, p=self.weights)
        return self.collate([self.datasets[k][self.orders[k].next()[0]] for k in picks])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "orders": [o.state_dict() for o in self.orders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        for order, saved in zip(self.orders, state["orders"], strict=True):
            order.load_state_dict(saved)
