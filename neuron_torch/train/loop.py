"""One training step's updates: run on the rule itself, checked once, and only then counted by Lightning.

Each update is :func:`~neuron_torch.nn.update.apply_update` on the raw rule (``self.optimizers().optimizer``).
After the step's updates, one host read checks them all: finite, not diverging, no rank signalled. When the
check fails, the state saved at the step's start is restored and the updates before the failing one are run
again (same batches, same operations: the same numbers), so the module holds the last finite state. Only then
does Lightning count the updates kept, one ``step()`` of its optimizer wrapper each with every ``p.grad`` None
(the rule leaves such a parameter as it is): ``global_step`` is always the updates kept, never rewound.

Lightning validates after training step ``b`` when ``(b + 1) % val_check_batch == 0``. The updates done after
step ``b`` are ``(b + 1)·k − offset`` (``k`` = ``updates_per_step``), with ``offset`` fixed at a fit's first step, a
multiple of the validation interval in updates chosen so that validation falls on the same updates whatever
step count a resumed checkpoint restored. On a fresh fit, and on a resume with the same ``updates_per_step``,
``offset`` is 0 and every step runs ``k`` updates. A run resumed with another ``updates_per_step`` may begin
with steps that run no update, or one step that runs several times ``k``, until the counts agree; a
``ModelCheckpoint(every_n_train_steps=n)`` sees the update count at step ends only, so such a step can save the
resumed state once more, or pass over a multiple of ``n``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from neuron_torch.data.batches import MiniBatches
from neuron_torch.data.streaming import StreamedSplit
from neuron_torch.errors import DataError
from neuron_torch.nn.optim import StepFailed
from neuron_torch.nn.update import Update, apply_update, gradient_norm
from neuron_torch.train import cuda_graphs
from neuron_torch.train.distributed import RankSum
from neuron_torch.train.stopping import GROWTH, LOSS_FLOOR, Stop

log = logging.getLogger("neuron_torch")


class Step(NamedTuple):
    """What one training step kept."""

    rows: Tensor  # (updates kept [+ 1 for the final state], columns): the tracked rows
    start: int  # the step of the first row: the update count its update started from
    stop: Optional[Stop]  # why training stops here, or None
    converged_at: Optional[int]  # the update count at which the gradient norm fell under tol, or None


class UpdateLoop:
    """The updates of one fit's training steps, for a :class:`~neuron_torch.train.module.NeuronModule`.

    Holds what lasts across a fit's steps: the loss the growth check compares with, whether it warned, the
    CUDA graph of a step's updates and the offset between Lightning's step count and the updates.
    """

    def __init__(self, module):
        self.module, self.net = module, module.net
        hp = module.hparams
        self.newton, self.tol, self.divergence, self.lr = (hp.update_rule == "newton", hp.tol, hp.divergence,
                                                           hp.learning_rate)
        self.loss_start: Optional[float] = None  # read once per fit
        self.growth_warned = False
        self.graphed: Optional[tuple] = None  # (batch, cuda_graphs.GraphedUpdates) of a CUDA-graphed step
        self.offset: Optional[int] = None
        self.steps = 0  # training steps of this fit so far
        self.first_step = 0  # Lightning's index of this fit's first training step
        self.parameters: dict[str, Tensor] = {}  # the network's, looked up once per step
        self.update: Callable[..., Update] = apply_update  # one update of the running step (set by run)

    def run(self, batch, batch_idx: int) -> Step:
        """The updates of one training step on ``batch``: ``(X, Y[, W])`` or a streamed split, reused by every
        update, or :class:`~neuron_torch.data.batches.MiniBatches`, one mini-batch per update."""
        module, trainer = self.module, self.module.trainer
        done = trainer.global_step  # the updates kept so far
        n = self._updates_now(batch_idx, done)
        batches = batch.take(n) if isinstance(batch, MiniBatches) else [batch] * n
        optimizer = module.optimizers()
        rule, schedule = optimizer.optimizer, module.lr_schedulers()
        parameters = self.parameters = dict(self.net.named_parameters())  # looked up once per step, not per update
        start = _saved(parameters.values(), rule, schedule)  # what a failed check rolls back to
        ranks = (RankSum(trainer.strategy, trainer.world_size, self._signalled, isinstance(batch, StreamedSplit))
                 if trainer.world_size > 1 else None)
        self.update = functools.partial(apply_update if ranks is None else ranks.update, self.net, rule,
                                        hessian=self.newton, schedule=schedule, parameters=parameters)
        snapshots, flags, failed, stop, converged_at = [], [], None, None, None
        graphed = self._graphed_updates(batches, rule, schedule)
        if graphed is not None:
            snapshots = graphed
        for i, b in enumerate(batches if graphed is None else []):
            if ranks is None and self._signalled():  # a Python flag: no host sync
                stop = Stop("interrupted", signum=module.stop_signals.signum)
                break
            try:
                update = self.update(b)
            except StepFailed as err:  # Newton: no step can be computed from this state
                failed = str(err)
                break
            except DataError as err:  # a streamed shard gone or corrupt: the updates before it stand
                stop = Stop("failed", f"{err} (during update {done + i + 1})")
                break
            snapshots.append(update.snapshot)
            if ranks is not None:
                flags.append(ranks.signals)
            if self.tol > 0 and gradient_norm(update.gradients).item() < self.tol:  # read only when it can stop training
                converged_at = done + i + 1  # the updates run, this one included
                trainer.should_stop = True
                break
        rows = self.net.tracked_rows(torch.stack(snapshots)) if snapshots else self._no_rows()
        rows, checked = self._checked(rows, flags, failed, start, batches, done, rule, schedule)
        stop = checked or stop
        _count(parameters.values(), optimizer, len(rows))
        if stop is None and batches and (0 <= trainer.max_steps <= done + len(rows) or trainer.should_stop):
            # the last update's result as one more row (step = global_step), so the per-update values end
            # where training ended, not at the state the last update started from
            rows = torch.cat([rows, self._final_row(batches[max(len(rows), 1) - 1], rule)])
        return Step(rows, done, stop, converged_at)

    def _updates_now(self, batch_idx: int, done: int) -> int:
        """How many updates this training step runs: up to ``(b + 1)·k − offset`` in all, and ``max_steps``."""
        trainer, k = self.module.trainer, self.module.updates_per_step
        if self.offset is None:  # the fit's first step: align the updates with Lightning's step count
            every = trainer.val_check_batch
            steps = every if trainer.check_val_every_n_epoch is None and isinstance(every, int) else 1
            interval = steps * k  # the validation interval in updates
            validated = batch_idx + (-(batch_idx + 1)) % steps  # the first step Lightning validates after
            self.offset = (validated + 1) * k - (done // interval + 1) * interval
            self.first_step = batch_idx
        b = self.first_step + self.steps  # this fit's own count: Lightning's batch_idx starts again each epoch
        self.steps += 1
        end = (b + 1) * k - self.offset
        return max(0, (end if trainer.max_steps < 0 else min(end, trainer.max_steps)) - done)  # -1: no limit

    def _graphed_updates(self, batches: list, rule, schedule) -> Optional[list[Tensor]]:
        """The step's updates replayed from a CUDA graph, when the set-up gives the same numbers that way (one
        full batch on CUDA, gd, momentum or Nesterov, no schedule, no ``tol``, one process; see
        :mod:`neuron_torch.train.cuda_graphs`): their snapshots, one per update. None otherwise: run them one by
        one. A stop signal is then seen once per training step instead of once per update."""
        n = len(batches)
        batch = batches[0] if batches else None
        if (n < 2 or n != self.module.updates_per_step or not isinstance(batch, tuple)
                or any(other is not batch for other in batches) or self._signalled()
                or not cuda_graphs.capturable(self._parameters(), rule, schedule=schedule,
                                              world_size=self.module.trainer.world_size, host_reads=self.tol > 0)):
            return None
        if self.graphed is None or self.graphed[0] is not batch:
            self.graphed = (batch, cuda_graphs.GraphedUpdates(cuda_graphs.neuron_update(self.net, rule, *batch), n,
                                                              cuda_graphs.watched(self.net, rule, *batch)))
        return list(self.graphed[1]())  # (k, s)

    def _final_row(self, batch, rule) -> Tensor:
        """The tracked row of the state training ended in: its loss, gradients and parameters, (1, columns).
        One more forward and backward pass, on the last update's batch; no update."""
        trainer = self.module.trainer
        ranks = RankSum(trainer.strategy, trainer.world_size, lambda: False) if trainer.world_size > 1 else None
        update = apply_update(self.net, rule, batch, reduce=ranks, before_step=lambda gradients: True,
                              parameters=self.parameters)
        return self.net.tracked_rows(torch.stack([update.snapshot]))

    def _signalled(self) -> bool:
        signals = self.module.stop_signals
        return signals is not None and signals.signum is not None

    def _checked(self, rows: Tensor, flags: list, failed: Optional[str], start: tuple, batches: list, done: int,
                 rule, schedule) -> tuple[Tensor, Optional[Stop]]:
        """The step's rows once it is checked (finite, not diverging, and under DDP no rank signalled), and why
        training stops here, if it does.

        One host read per training step, never per update. When the check fails, the state saved at the
        step's start is restored and the updates before the failing one are run again; the rows are cut to
        the updates kept.
        """
        k = len(rows)
        # the fast path: a few reductions and one host read. A sum is finite only if every term is (a sum
        # that overflows takes the exact path below, which then finds nothing to stop for)
        total = rows.sum()
        for p in self._parameters():
            total = total + p.sum()
        checks = [total, rows[:, 0].max() if k else total.new_zeros(())]
        if flags:
            checks.append(torch.stack(flags).sum())
        verdict = torch.stack(checks).tolist()
        if self.loss_start is None and k:
            self.loss_start = max(float(rows[0, 0]), LOSS_FLOOR)
        limit = GROWTH * self.loss_start if self.loss_start is not None else math.inf
        growth_matters = self.divergence == "stop" or not self.growth_warned  # warned once is enough
        if (math.isfinite(verdict[0]) and failed is None and not (verdict[1] > limit and growth_matters)
                and not (len(verdict) > 2 and verdict[2] > 0)):
            return rows, None

        # the exact path, only when something is wrong: per-update verdicts
        finite_rows = torch.isfinite(rows).all(1)  # (k,)
        params_finite = all(bool(torch.isfinite(p).all()) for p in self._parameters())
        grown = rows[:, 0] > limit
        signalled = torch.stack(flags) > 0 if flags else torch.zeros_like(finite_rows)
        bad = ~finite_rows
        if bool(grown.any()) and self.divergence == "stop":
            bad = bad | grown
        elif bool(grown.any()) and not self.growth_warned:
            self.growth_warned = True
            j = int(grown.nonzero()[0, 0])
            log.warning(f"warning: the training loss grew from {self.loss_start:.4g} to "
                        f"{float(rows[j, 0]):.4g} by update {done + j} (model.learning_rate {self.lr:g}): "
                        f"training is diverging; lower model.learning_rate (model.divergence: stop ends "
                        f"the run there)")
        first_bad = int(bad.nonzero()[0, 0]) if bool(bad.any()) else (k if failed or not params_finite else None)
        first_signal = int(signalled.nonzero()[0, 0]) + 1 if bool(signalled.any()) else None  # stop after it
        if first_bad is None and first_signal is None:
            return rows, None
        if first_bad is not None and (first_signal is None or first_bad <= first_signal):
            keep = self._replay(start, batches, first_bad, rule, schedule)
            return rows[:keep], Stop("diverged", self._divergence_reason(rows, keep, done, failed, limit))
        if first_signal < k:
            self._replay(start, batches, first_signal, rule, schedule)
        signals = self.module.stop_signals
        return rows[:first_signal], Stop("interrupted", signum=signals.signum if self._signalled() else 2)

    def _divergence_reason(self, rows: Tensor, keep: int, done: int, failed: Optional[str], limit: float) -> str:
        """One line: which update, what went wrong, the learning rate and what to do."""
        update = done + keep + 1  # the update that was not applied, counted from 1
        if keep < len(rows) and not bool(torch.isfinite(rows[keep]).all()):
            column = int((~torch.isfinite(rows[keep])).nonzero()[0, 0])
            what = f"{self.module.tracked_names()[column]} is {float(rows[keep, column])} at its start"
        elif keep < len(rows) and self.divergence == "stop" and bool(rows[keep, 0] > limit):
            what = (f"the training loss at its start grew from {self.loss_start:.4g} to "
                    f"{float(rows[keep, 0]):.4g} (over {GROWTH:g} times the first)")
        elif failed is not None and keep == len(rows):
            what = failed
        else:
            what = "it makes the parameters non-finite"
        return (f"training diverged at update {update}: {what} (model.learning_rate {self.lr:g}); "
                f"lower model.learning_rate")

    def _replay(self, start: tuple, batches: list, n: int, rule, schedule) -> int:
        """Restore the step's start and run its first ``n`` updates again; fewer while the parameters they
        reach are not finite. Returns the number of updates kept."""
        while True:
            _restore(self._parameters(), rule, schedule, start)
            for b in batches[:n]:
                self.update(b)
            if n == 0 or all(bool(torch.isfinite(p).all()) for p in self._parameters()):
                return n
            n -= 1

    def _no_rows(self) -> Tensor:
        """The rows of a step that ran no update: (0, columns)."""
        return next(iter(self._parameters())).new_empty((0, len(self.module.tracked_names())))

    def _parameters(self):
        """The network's parameters, in order, as looked up for the running step."""
        return self.parameters.values()


def _count(parameters, optimizer, n: int) -> None:
    """Have Lightning count ``n`` updates already applied: one step of its optimizer wrapper each, with no
    gradient on any of the ``parameters``, so the rule changes nothing."""
    for p in parameters:
        p.grad = None
    for _ in range(n):
        optimizer.step()


def _copied(state: dict) -> dict:
    """An update rule's per-parameter state with its tensors cloned."""
    return {key: value.clone() if isinstance(value, Tensor) else value for key, value in state.items()}


def _saved(parameters, rule, schedule) -> tuple:
    """What a training step starts from: parameters, the rule's state and learning rates, the schedule."""
    # copied by hand: state_dict() and a deep copy take longer than the copies themselves
    return ([p.detach().clone() for p in parameters], {p: _copied(s) for p, s in rule.state.items()},
            [group["lr"] for group in rule.param_groups], schedule.state_dict() if schedule is not None else None)


def _restore(parameters, rule, schedule, start: tuple) -> None:
    """Put back what :func:`_saved` saved."""
    params, rule_state, lrs, schedule_state = start
    with torch.no_grad():
        for p, saved in zip(parameters, params):
            p.copy_(saved)
    rule.state.clear()
    rule.state.update({p: _copied(s) for p, s in rule_state.items()})
    for group, lr in zip(rule.param_groups, lrs):
        group["lr"] = lr
    if schedule is not None:
        schedule.load_state_dict(schedule_state)
