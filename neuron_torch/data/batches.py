"""What training iterates over: full batches, seeded mini-batch streams, groups of a step's batches, one split."""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor

class BatchGroup:
    """The mini-batches of one training step, in order: ``batches`` is a list of ``(X, Y)`` pairs.

    A class of its own (not a list), so that a loader yielding ``[X, Y]`` lists is never taken for a group.
    """

    def __init__(self, batches: list[tuple[Tensor, Tensor]]):
        self.batches = batches


class BatchStream:
    """An endless stream of training batches cut from tensors that already sit on the device.

    A batch is ``(X, Y)``, or ``(X, Y, W)`` with sample weights ``W`` (m, 1). Full-batch gradient descent yields
    the same batch every step: nothing is copied or collated. With a
    ``batch_size``, each pass over the rows follows a fresh seeded permutation, and each item of the stream
    is a :class:`BatchGroup` of the next ``group`` mini-batches (the updates of one training step). The
    stream is one long epoch, so the Trainer's ``max_steps`` sets the number of updates. ``position`` is the
    index of the first mini-batch to hand out: a resumed run passes its update count and continues the
    sequence exactly where it stopped (the Trainer fetches one item ahead, so a count kept by the stream
    itself would be off).
    """

    def __init__(self, X: Tensor, Y: Tensor, batch_size: Optional[int] = None, seed: int = 0, position: int = 0,
                 group: int = 1, weight: Optional[Tensor] = None):
        self.X, self.Y, self.seed, self.group = X, Y, seed, group
        self.tensors = (X, Y) if weight is None else (X, Y, weight)
        m = X.shape[0]
        self.batch_size = m if batch_size is None or batch_size >= m else batch_size
        self.batches_per_pass = math.ceil(m / self.batch_size)
        self.position = position  # mini-batches handed out so far

    def __iter__(self) -> Iterator:
        if self.batch_size == self.X.shape[0]:
            while True:
                yield self.tensors
        batches = self._batches()
        while True:
            yield BatchGroup([next(batches) for _ in range(self.group)])

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            n_pass, start = divmod(self.position, self.batches_per_pass)
            order = self._permutation(n_pass)
            for k in range(start, self.batches_per_pass):
                rows = order[k * self.batch_size:(k + 1) * self.batch_size]
                self.position += 1
                yield tuple(t[rows] for t in self.tensors)

    def _permutation(self, n_pass: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + n_pass)
        return torch.randperm(self.X.shape[0], generator=generator).to(self.X.device)


class StreamedBatches:
    """The endless stream of full-batch updates over a streamed split: every item is the split itself, read
    again chunk by chunk when the update iterates it."""

    def __init__(self, streamed):
        self.streamed = streamed

    def __iter__(self) -> Iterator:
        while True:
            yield self.streamed


class SingleBatch:
    """A loader of exactly one batch (a whole split, ``(X, Y)`` or ``(X, Y, W)``), for validation and test."""

    def __init__(self, batch: tuple[Tensor, ...]):
        self.batch = batch

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        yield self.batch

    def __len__(self) -> int:
        return 1
