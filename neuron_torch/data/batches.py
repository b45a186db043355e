"""What training iterates over: full batches, seeded mini-batch streams drawn per training step, one split."""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor


class MiniBatches:
    """A training step's mini-batches, drawn from a :class:`BatchStream` as the step asks for them.

    The stream hands this one object for every training step; a step that runs ``n`` updates calls
    :meth:`take` once, so the stream's position is always the updates run, however many each step runs.
    A class of its own (not a list), so that a loader yielding ``[X, Y]`` lists is never taken for one.
    """

    def __init__(self, batches: Iterator[tuple[Tensor, ...]]):
        self._batches = batches

    def take(self, n: int) -> list[tuple[Tensor, ...]]:
        """The next ``n`` mini-batches, ``(X, Y)`` or ``(X, Y, W)`` each, in order."""
        return [next(self._batches) for _ in range(n)]


class BatchStream:
    """An endless stream of training batches cut from tensors that already sit on the device.

    A batch is ``(X, Y)``, or ``(X, Y, W)`` with row weights ``W`` (m, 1). Full-batch gradient descent yields
    the same batch every step: nothing is copied or collated. With a ``batch_size``, each pass over the rows
    follows a fresh seeded permutation, and every item of the stream is the same :class:`MiniBatches`, from
    which a training step takes the mini-batches of its updates. The stream is one long epoch, so the
    Trainer's ``max_steps`` sets the number of updates. ``position`` is the index of the first mini-batch to
    hand out: a resumed run passes its update count and continues the sequence exactly where it stopped.
    """

    def __init__(self, X: Tensor, Y: Tensor, batch_size: Optional[int] = None, seed: int = 0, position: int = 0,
                 weight: Optional[Tensor] = None):
        self.X, self.Y, self.seed = X, Y, seed
        self.tensors = (X, Y) if weight is None else (X, Y, weight)
        m = X.shape[0]
        self.batch_size = m if batch_size is None or batch_size >= m else batch_size
        self.batches_per_pass = math.ceil(m / self.batch_size)
        self.position = position  # mini-batches handed out so far

    def __iter__(self) -> Iterator:
        if self.batch_size == self.X.shape[0]:
            while True:
                yield self.tensors
        batches = MiniBatches(self._batches())
        while True:
            yield batches

    def _batches(self) -> Iterator[tuple[Tensor, ...]]:
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
