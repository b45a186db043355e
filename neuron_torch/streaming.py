"""Full-batch passes over a table streamed chunk by chunk: the same numbers as one pass over the loaded table.

The loss and every gradient of the hand-written networks are means over rows, so over chunks of ``m_c`` rows
they combine as ``Σ_c m_c·g_c / Σ_c m_c``: exactly how ``NeuronModule._all_reduce`` combines data-parallel
ranks, one level down. The L2 terms do not depend on the rows; they are added once, at the end. The
standardisation statistics merge per-chunk moments the same way (Chan, Golub & LeVeque 1979).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from neuron_torch import layers
from neuron_torch.chunks import Chunk, read_chunks
from neuron_torch.shards import Piece, Shards
from neuron_torch.split import TRAIN, Split


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


class StreamedPass(NamedTuple):
    """What one full-batch pass over streamed rows yields; reads like ``networks.BackwardPass``."""

    loss: Tensor  # shape (), mean cross-entropy over all rows plus the L2 penalty once
    gradients: dict[str, Tensor]  # keyed like named_parameters(): means over all rows plus the L2 gradient
    Z: list[Tensor]  # per layer, each unit's largest pre-activation over all rows, (1, n_l); [] on the fused path
    rows: float  # what the means are over: the rows, or their total weight when the chunks carry weights
    hessian: Optional[Tensor]  # the network's Newton Hessian over all rows when asked for, L2 included


def full_batch(net, batches: Iterable[tuple[Tensor, ...]], hessian: bool = False) -> StreamedPass:
    """Loss and gradients (and the Newton Hessian) of ``net`` over every row of ``batches``, in one pass.

    Parameters
    ----------
    net : HandBackprop
        A network with ``forward_backward(X, Y, weight)`` returning (weighted) means over the rows plus its
        L2 terms, an ``l2`` attribute and ``linears``; with ``hessian``, ``data_hessian`` and
        ``penalised_hessian`` (:class:`neuron_torch.networks.LinearModel`).
    batches : iterable of tuples of Tensor
        ``(X, Y)`` or ``(X, Y, W)`` per chunk: ``X`` (m_c, n), ``Y`` (m_c, k), row weights ``W`` (m_c, 1);
        e.g. a :class:`StreamedSplit`.
    hessian : bool
        Also sum the network's Hessian over the chunks.

    Returns
    -------
    StreamedPass
        Equal to ``net.forward_backward`` on all rows at once, up to float rounding. With no row at all the
        data terms are 0 (they weigh 0 in a sum over ranks) and only the L2 terms remain.
    """
    linears = list(net.linears)
    if hessian and not hasattr(net, "data_hessian"):
        raise ValueError("the Newton Hessian is defined for a network of one linear layer")
    total, loss_sum, grad_sums, z_max, h_sum = 0.0, None, None, None, None
    with _without_l2(net):  # the penalty is the same for every chunk: it is added once, below
        for batch in batches:
            X = batch[0]
            # a chunk's mean is over its rows, or over its total weight: the sums below undo it with that
            m = float(batch[2].sum()) if len(batch) > 2 else X.shape[0]
            if m == 0:
                continue
            bp = net.forward_backward(*batch)
            # sums in float64 whatever the network's dtype: many chunk means added would otherwise round
            if loss_sum is None:
                loss_sum = bp.loss.double() * m
                grad_sums = {name: g.double() * m for name, g in bp.gradients.items()}
                z_max = [Z.amax(0, keepdim=True) for Z in bp.Z]
            else:
                loss_sum += bp.loss.double() * m
                for name, g in bp.gradients.items():
                    grad_sums[name] += g.double() * m
                z_max = [torch.maximum(a, Z.amax(0, keepdim=True)) for a, Z in zip(z_max, bp.Z)]
            if hessian:
                H = net.data_hessian(X, *batch[2:]).double() * m
                h_sum = H if h_sum is None else h_sum + H
            total += m

    weight = linears[0].weight
    if total == 0:
        loss_sum = weight.new_zeros((), dtype=torch.float64)
        grad_sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in net.named_parameters()}
        z_max = []
        if hessian:
            N = sum(p.numel() for p in net.parameters())
            h_sum = weight.new_zeros((N, N), dtype=torch.float64)
    scale = 1.0 / total if total else 1.0
    dtype = weight.dtype
    weights = {id(layer.weight) for layer in linears}
    loss = (loss_sum * scale).to(dtype) + layers.l2_penalty([layer.weight for layer in linears], net.l2)
    gradients = {}
    for name, p in net.named_parameters():
        g = (grad_sums[name] * scale).to(dtype)
        gradients[name] = layers.l2_backward(g, p, net.l2) if id(p) in weights else g
    H = None if h_sum is None else net.penalised_hessian((h_sum * scale).to(dtype))
    return StreamedPass(loss, gradients, z_max, total, H)


@contextlib.contextmanager
def _without_l2(net):
    """``net.l2`` set to 0 inside the block, put back after (even on an error).

    Adding the penalty once at the end, rather than subtracting it from every chunk's result, keeps the sum
    free of the rounding of ``(g + λw) − λw``.
    """
    l2 = net.l2
    net.l2 = 0.0
    try:
        yield
    finally:
        net.l2 = l2
