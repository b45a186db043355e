"""Full-batch passes over rows that come in chunks: the same numbers as one pass over all of them at once.

The loss and every gradient of the hand-written networks are means over rows, so over chunks of ``m_c`` rows
they combine as ``Σ_c m_c·g_c / Σ_c m_c``: exactly how the data-parallel sum combines ranks
(:mod:`neuron_torch.train.distributed`), one level down. The L2 terms do not depend on the rows; they are added
once, at the end.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor

from neuron_torch.errors import ConfigError
from neuron_torch.nn import layers
from neuron_torch.nn.networks import LinearModel


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
        A network with ``forward_backward(X, Y, weight, l2)`` returning (weighted) means over the rows plus the
        L2 terms of ``l2``, an ``l2`` attribute and ``linears``; with ``hessian``, ``data_hessian`` and
        ``penalised_hessian`` (:class:`neuron_torch.nn.networks.LinearModel`).
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
    if hessian and not isinstance(net, LinearModel):
        raise ConfigError("the Newton Hessian is defined for a network of one linear layer")
    total, loss_sum, grad_sums, z_max, h_sum = 0.0, None, None, None, None
    for batch in batches:
        X = batch[0]
        # a chunk's mean is over its rows, or over its total weight: the sums below undo it with that
        m = float(batch[2].sum()) if len(batch) > 2 else X.shape[0]
        if m == 0:
            continue
        # l2 0: the penalty is the same for every chunk, so it is added once, below, which keeps the sum free
        # of the rounding of (g + λw) − λw
        bp = net.forward_backward(*batch, l2=0.0)
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

