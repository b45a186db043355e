"""A split of a streamed table, read chunk by chunk, and the standardisation statistics merged over chunks.

The statistics merge per-chunk moments (Chan, Golub & LeVeque 1979), so one pass over the shards gives the
same mean and variance as numpy on the loaded rows. The network's passes over these chunks are
:func:`neuron_torch.nn.chunked.full_batch`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from neuron_torch.data.chunks import Chunk, read_chunks
from neuron_torch.data.shards import Piece, Shards
from neuron_torch.data.split import TRAIN, Split


class Moments(NamedTuple):
    """Per-feature count, mean and variance (ddof 0) of the rows seen."""

    rows: int
    mean: np.ndarray  # (n,)
    var: np.ndarray  # (n,)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation (ddof 0), shape (n,): what ``np.std`` gives on the same rows."""
        return np.sqrt(self.var)


def feature_moments(chunks: Iterable[Chunk]) -> Moments:
    """Mean and variance of each feature over the chunks' rows, in one pass.

    Each chunk's ``(count, mean, M2)`` (``M2`` the sum of squared deviations from the chunk's own mean) is
    merged into the running one with Chan et al.'s update, which never subtracts two large sums: the result
    matches numpy's ``mean`` and ``std`` on the loaded rows to about 1e-12 relative, however many chunks.

    Parameters
    ----------
    chunks : iterable of Chunk
        E.g. ``read_chunks(..., split=split, part=TRAIN, check=True)``: the training rows only.

    Returns
    -------
    Moments
        ``rows`` 0 and NaN moments when no chunk held a row.
    """
    count, mean, M2 = 0, None, None
    for chunk in chunks:
        X = chunk.X  # (r, n)
        r = X.shape[0]
        mean_c = X.mean(0)  # (n,)
        M2_c = ((X - mean_c) ** 2).sum(0)  # (n,)
        if mean is None:
            count, mean, M2 = r, mean_c, M2_c
            continue
        total = count + r
        delta = mean_c - mean
        mean = mean + delta * (r / total)
        M2 = M2 + M2_c + delta**2 * (count * r / total)
        count = total
    if mean is None:
        return Moments(0, np.array([np.nan]), np.array([np.nan]))
    return Moments(count, mean, M2 / count)


class StreamedSplit:
    """One split of a sharded table as ``(X, Y)`` tensors, read again, chunk by chunk, each time it is iterated.

    Parameters
    ----------
    shards : Shards
    features : sequence of str, length n
    target : str
        The label column.
    label_map : callable
        Maps a chunk's label column (r,) to the network's ``Y`` as float64, shape (r, k) (k = 1 for a sigmoid
        output): e.g. ``lambda y: (y == positive)[:, None].astype(float)``.
    chunk_rows : int
        Most rows per chunk.
    split : Split
    part : int
        0 train, 1 validation, 2 test.
    mean, std : ndarray, shape (n,), optional
        Standardisation statistics (of the training rows); the features are used as stored when None.
    pieces : sequence of Piece, optional
        The rows this process streams (a data-parallel rank's, say); all by default.
    dtype : torch.dtype
        The network's dtype.
    device : torch.device or str
        The network's device.
    weight : str, optional
        A sample-weight column to read along.
    row_weight : callable, optional
        ``row_weight(labels, weights)`` → each row's weight in the loss (r, 1), or None for the plain mean:
        the sample weight times the class weight, say. Without it the weight column is used as it is.
    """

    def __init__(self, shards: Shards, features: Sequence[str], target: str,
                 label_map: Callable[[np.ndarray], np.ndarray], chunk_rows: int, split: Split, part: int = TRAIN,
                 mean: Optional[np.ndarray] = None, std: Optional[np.ndarray] = None,
                 pieces: Optional[Sequence[Piece]] = None, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", weight: Optional[str] = None,
                 row_weight: Optional[Callable[[np.ndarray, Optional[np.ndarray]], Optional[np.ndarray]]] = None):
        self.shards, self.features, self.target, self.label_map = shards, list(features), target, label_map
        self.chunk_rows, self.split, self.part, self.pieces = chunk_rows, split, part, pieces
        self.mean, self.std, self.dtype, self.device = mean, std, dtype, torch.device(device)
        self.weight, self.row_weight = weight, row_weight

    def placed(self, dtype: torch.dtype, device: torch.device | str, pieces: Optional[Sequence[Piece]] = None
               ) -> "StreamedSplit":
        """The same split read into another dtype and device (and, given ``pieces``, only those rows)."""
        return StreamedSplit(self.shards, self.features, self.target, self.label_map, self.chunk_rows, self.split,
                             self.part, self.mean, self.std, self.pieces if pieces is None else pieces, dtype,
                             device, self.weight, self.row_weight)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        """Yields ``(X, Y)``, or ``(X, Y, W)`` with row weights, per chunk: ``X`` (r, n) standardised, ``Y``
        (r, k), ``W`` (r, 1), in the network's dtype and on its device."""
        # cast on the reading thread where numpy has the dtype (float16/bfloat16 and devices: here, after)
        host = {torch.float64: np.float64, torch.float32: np.float32}.get(self.dtype, np.float64)
        reader = read_chunks(self.shards, self.features, self.chunk_rows, label=self.target, weight=self.weight,
                             pieces=self.pieces, split=self.split, part=self.part, center=self.mean,
                             scale=self.std, dtype=host)
        with reader:  # also when the consumer stops early: the reading thread ends with the iteration
            for chunk in reader:
                X = torch.from_numpy(chunk.X).to(self.device, self.dtype)
                Y = torch.from_numpy(np.asarray(self.label_map(chunk.labels), dtype=np.float64))
                W = chunk.weights if self.row_weight is None else self.row_weight(chunk.labels, chunk.weights)
                batch = (X, Y.to(self.device, self.dtype))
                if W is not None:
                    W = torch.from_numpy(np.asarray(W, dtype=np.float64).reshape(-1, 1))
                    batch += (W.to(self.device, self.dtype),)
                yield batch
