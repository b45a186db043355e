"""Data parallelism: the exact full-data update from every rank's rows, and the stop and failure that ride with it.

Hand-made gradients are never synced by Lightning (it all-reduces only inside ``manual_backward``), so each
update sums them here. Each rank's loss, gradients (and Hessian) are means over its own ``m`` rows (weighted
means over its rows' total weight ``m``); ``Σ_r m_r·g_r / Σ_r m_r`` is the mean over all rows. The L2 terms, equal
on every rank, come through unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from neuron_torch.errors import DataError
from neuron_torch.nn.update import Update, apply_update


class RankSum:
    """The ``reduce`` of :func:`~neuron_torch.nn.update.apply_update` across data-parallel ranks.

    One all-reduce per update carries the loss, the gradients, the Hessian and two flags: whether this rank was
    signalled to stop, and whether its rows could not be read. So every rank learns of either at the same
    update; a rank that cannot read its rows takes part with none (the others wait in the all-reduce), and every
    rank then stops with the failing rank's words, before the update is applied.

    Parameters
    ----------
    strategy : lightning.pytorch.strategies.Strategy
        The Trainer's strategy; its public ``reduce`` sums over the ranks.
    world_size : int
    signalled : callable () -> bool
        Whether this rank has been asked to stop (a signal).
    check_failures : bool
        Read the failure flag on the host after each update (one read; on streamed tables, the only rows that
        can become unreadable mid-run).

    Attributes
    ----------
    signals : Tensor, shape ()
        After each update: the number of ranks that had been signalled, on the device (read once per step).
    """

    def __init__(self, strategy, world_size: int, signalled: Callable[[], bool], check_failures: bool = False):
        self.strategy, self.world_size, self.signalled = strategy, world_size, signalled
        self.check_failures = check_failures
        self.signals: Optional[Tensor] = None
        self._failure: Optional[DataError] = None
        self._reduced = False

    def update(self, net, rule, batch, **kwargs) -> Update:
        """:func:`~neuron_torch.nn.update.apply_update` with this sum; a rank whose rows cannot be read joins
        the sum with none and says so. Raises :class:`DataError` on every rank when any rank's rows failed."""
        self._failure, self._reduced = None, False
        try:
            return apply_update(net, rule, batch, reduce=self, **kwargs)
        except DataError as err:
            if self._reduced:  # raised after the sum: every rank stops here
                raise
            self._failure = err
            return apply_update(net, rule, [], reduce=self, **kwargs)

    def __call__(self, m: Tensor | float, loss: Tensor, grads: dict[str, Tensor], hessian: Optional[Tensor] = None
                 ) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
        self._reduced = True
        reduce = self.strategy.reduce
        m_total = reduce(torch.as_tensor(m, dtype=loss.dtype, device=loss.device).clone(), reduce_op="sum")
        parts = [loss.view(1)] + [g.flatten() for g in grads.values()]
        if hessian is not None:
            parts.append(hessian.flatten())
        flags = torch.tensor([float(self.signalled()), float(self._failure is not None)], dtype=loss.dtype,
                             device=loss.device)
        payload = reduce(torch.cat([torch.cat(parts) * m, flags]), reduce_op="sum")
        # a step where every rank failed has m_total 0: its values are never used (training stops there)
        flat, self.signals = payload[:-2] / m_total, payload[-2]
        if self.check_failures and payload[-1].item() > 0:
            import torch.distributed as dist

            messages = [None] * self.world_size  # every rank stops with the first failing rank's words
            dist.all_gather_object(messages, None if self._failure is None else str(self._failure))
            raise DataError(next(message for message in messages if message))
        loss, offset, reduced = flat[0], 1, {}
        for name, g in grads.items():
            reduced[name] = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        if hessian is not None:
            hessian = flat[offset:].view_as(hessian)
        return loss, reduced, hessian
