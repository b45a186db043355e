"""One update: the gradients by hand, then the hand-written rule. Every loop that trains calls :func:`apply_update`:
the Lightning module's training step, the scikit-learn estimator and the CUDA-graph capture."""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from neuron_torch.nn.chunked import full_batch

Batch = Union[tuple[Tensor, ...], Iterable[tuple[Tensor, ...]]]
# reduce(m, loss, gradients, hessian) → (loss, gradients, hessian): the means over every rank's rows, from this
# rank's means over its own m rows (or their total weight); see neuron_torch.train.distributed
Reduce = Callable[[Union[Tensor, float], Tensor, dict[str, Tensor], Optional[Tensor]],
                  tuple[Tensor, dict[str, Tensor], Optional[Tensor]]]


class Update(NamedTuple):
    """What one update saw, taken before the parameters changed."""

    snapshot: Optional[Tensor]  # (s,): net.snapshot of the state the update started from (None if not asked)
    loss: Tensor  # (): the loss there (over every rank's rows under a reduce)
    gradients: dict[str, Tensor]  # keyed like named_parameters(): the gradients the rule was given
    stepped: bool  # False when before_step stopped it: the rule did not run


def apply_update(net, rule: torch.optim.Optimizer, batch: Batch, *, hessian: bool = False,
                 reduce: Optional[Reduce] = None, before_step: Optional[Callable[[dict[str, Tensor]], bool]] = None,
                 schedule=None, snapshot: bool = True, parameters: Optional[dict[str, Tensor]] = None) -> Update:
    """One hand-written update of ``net`` on ``batch``: its loss and gradients, then one ``step()`` of ``rule``.

    Parameters
    ----------
    net : HandBackprop
        A network of :mod:`neuron_torch.nn.networks`.
    rule : torch.optim.Optimizer
        One of :mod:`neuron_torch.nn.optim` over ``net``'s parameters, reading the gradients from ``p.grad``
        (the rule itself, not Lightning's wrapper around it).
    batch : tuple of Tensor, or iterable of them
        ``(X, Y)`` or ``(X, Y, W)``: ``X`` (m, n), ``Y`` (m, 1) or (m, k), row weights ``W`` (m, 1); or chunks
        of such rows (a streamed split), summed by :func:`neuron_torch.nn.chunked.full_batch` into one
        full-batch pass.
    hessian : bool
        Also take the Newton Hessian and pass it to ``rule.step(hessian=H)``.
    reduce : callable, optional
        Combines the loss, gradients and Hessian across data-parallel ranks before anything uses them
        (:data:`Reduce`).
    before_step : callable, optional
        ``before_step(gradients)`` sees the gradients before the rule runs; a true result stops the update
        there (the estimator stops before stepping once the gradient norm is under ``tol``).
    schedule : torch.optim.lr_scheduler.LRScheduler, optional
        Stepped once after the rule.
    snapshot : bool
        Take ``net.snapshot`` of the state the update starts from, what a tracker keeps of it (a copy of the
        parameters and gradients); a loop that keeps nothing per update goes without.
    parameters : dict of str to Tensor, optional
        ``dict(net.named_parameters())``, when the caller holds it: a loop looks it up once, not every update.

    Returns
    -------
    Update
    """
    if torch.is_grad_enabled():  # the gradients are ours: no autograd graph is built
        with torch.no_grad():
            return apply_update(net, rule, batch, hessian=hessian, reduce=reduce, before_step=before_step,
                                schedule=schedule, snapshot=snapshot, parameters=parameters)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        bp = net.forward_backward(*batch)
        # the Hessian is one more pass over X: taken here only when the ranks must sum it, else once the update
        # is known to step (the estimator's last, converged iteration takes none)
        H = net.hessian(*batch[:1], *batch[2:]) if hessian and reduce is not None else None
        m = (batch[2].sum() if len(batch) > 2 else float(batch[0].shape[0])) if reduce is not None else None
    else:
        bp = full_batch(net, batch, hessian)
        H, m = bp.hessian, bp.rows
    loss, gradients = bp.loss, bp.gradients
    if reduce is not None:
        loss, gradients, H = reduce(m, loss, gradients, H)
    kept = net.snapshot(loss, gradients, bp) if snapshot else None
    if before_step is not None and before_step(gradients):
        return Update(kept, loss, gradients, False)
    if hessian and H is None:
        H = net.hessian(*batch[:1], *batch[2:])
    for name, p in (net.named_parameters() if parameters is None else parameters.items()):
        p.grad = gradients[name]
    if H is None:
        rule.step()
    else:
        rule.step(hessian=H)
    if schedule is not None:
        schedule.step()
    return Update(kept, loss, gradients, True)


def gradient_norm(gradients: dict[str, Tensor]) -> Tensor:
    """Euclidean norm of all gradients together, ``‖(dW, db)‖₂`` over every parameter, shape ()."""
    return torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gradients.values()]))
