"""The LightningModule: hand-written updates in each training step, metrics on validation and test."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Literal, Optional, Union

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MetricCollection

from neuron_torch.train import cuda_graphs
from neuron_torch.nn import layers
from neuron_torch.data.batches import BatchGroup
from neuron_torch.data.labels import check_class_weight, class_weights
from neuron_torch.errors import DataError
from neuron_torch.train.metrics import STREAMED_AUROC_THRESHOLDS, classification_metrics
from neuron_torch.nn.networks import ActivationName, HandBackprop, Init, build_network
from neuron_torch.nn.optim import NEWTON_MAX_PARAMETERS, StepFailed, make_update_rule
from neuron_torch.train.stopping import GROWTH, LOSS_FLOOR, Stop
from neuron_torch.data.streaming import StreamedSplit
from neuron_torch.nn.chunked import full_batch

log = logging.getLogger("neuron_torch")


def _batch_weight(batch) -> Tensor | float:
    """What a batch's mean is over: its row count, or its rows' total weight when it carries weights."""
    return batch[2].sum() if len(batch) > 2 else float(batch[0].shape[0])

UpdateRule = Literal["gd", "momentum", "nesterov", "adam", "newton"]


def _copied(state: dict) -> dict:
    """An update rule's per-parameter state with its tensors cloned."""
    return {key: value.clone() if isinstance(value, Tensor) else value for key, value in state.items()}


class ConvergenceWarning(UserWarning):
    """Training used every step without the gradient norm falling under ``tol`` (as in scikit-learn)."""


class NeuronModule(L.LightningModule):
    """Trains a :class:`SingleNeuron` or :class:`DeepNetwork` with hand-written gradients and updates.

    ``automatic_optimization`` is off: each update computes the gradients by hand, puts them in ``.grad``
    and calls the update rule's ``step()`` through Lightning, which counts it in ``global_step``. So
    ``global_step`` and ``trainer.max_steps`` count updates, however many run in one training step.

    Parameters
    ----------
    feature_names : list of str
        Input feature names (linked from the data); their number is ``n_features``.
    hidden_sizes : list of int
        Hidden layer widths; empty trains the single neuron (or its softmax form).
    activation : {"relu", "tanh", "sigmoid", "leaky_relu"}
        Hidden activation (deep networks only).
    init : {"zeros", "normal", "xavier", "he"}, optional
        Initialisation; default zeros for the single neuron, He for deep networks.
    l2 : float
        L2 penalty ``(λ/2)·Σ‖W‖²`` in the loss and gradients.
    learning_rate : float
        ``α``.
    update_rule : {"gd", "momentum", "nesterov", "adam", "newton"}
        The hand-written update (see :mod:`neuron_torch.nn.optim`). ``newton`` (no hidden layers) also
        computes the Hessian each update (``XᵀSX/m``, or its k-class form of k²·(n + 1)² entries), one more
        pass over X; use ``learning_rate`` 1 for the full Newton (IRLS) step. Refused past
        :data:`NEWTON_MAX_PARAMETERS` parameters.
    momentum : float
        ``μ`` of momentum and Nesterov.
    betas : tuple of float
        Adam's ``(β₁, β₂)``.
    eps : float
        Adam's ``ε``.
    lr_schedule : {"step", "cosine"}, optional
        Multiply ``α`` by ``lr_gamma`` every ``lr_step_size`` updates, or anneal it to 0 on a cosine over
        ``trainer.max_steps``.
    lr_step_size : int
    lr_gamma : float
    tol : float
        Stop when the gradient norm ``‖(dW, db)‖₂`` falls under ``tol``; 0 runs every step. A run that ends
        its steps without meeting ``tol`` > 0 warns with :class:`ConvergenceWarning`.
    updates_per_step : int
        Updates run inside one Lightning training step. Any value gives the same numbers (each update still
        gets its own mini-batch, schedule step, ``tol`` check and tracked row); a larger one spreads
        Lightning's fixed cost per step (about 0.4 ms on a laptop CPU, more than a whole update on a small
        table) over more updates. The Trainer's ``val_check_interval`` counts training steps, so it counts
        ``updates_per_step`` updates each; ``neuron-torch train`` converts it from updates for you.
    fused : bool
        Let the single neuron take its one-pass CPU kernel where it applies (see :mod:`neuron_torch.kernels.fused`);
        false forces the plain reference path (two passes over X), as ``NEURON_TORCH_FUSED=0`` does.
    divergence : {"warn", "stop"}
        What a training loss that grows past ``GROWTH`` (1000) times its start does: warn once, or stop the
        run there (FAILED). A non-finite loss, gradient, Hessian or parameter always stops the run, keeping
        the last finite state.
    class_weight : "balanced" or dict of str to float, optional
        Weights per class, with scikit-learn's meaning: each row's weight (its ``data.weight_column`` value,
        else 1) is multiplied by its class's weight; ``balanced`` gives class c ``Σw / (k·Σ_{y=c} w)`` over
        the training rows. The loss and every gradient are then weighted means.
    classes : list of str, optional
        The label of each class index (linked from the data). Two classes train one sigmoid output unit
        (the single neuron); k > 2 a softmax layer of k units (multinomial logistic regression). Default: two.
    """

    def __init__(self, feature_names: list[str], hidden_sizes: list[int] = [],
                 activation: ActivationName = "relu", init: Optional[Init] = None, l2: float = 0.0,
                 learning_rate: float = 0.5, update_rule: UpdateRule = "gd", momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_schedule: Optional[Literal["step", "cosine"]] = None, lr_step_size: int = 1000,
                 lr_gamma: float = 0.5, tol: float = 0.0, updates_per_step: int = 1,
                 fused: bool = True, divergence: Literal["warn", "stop"] = "warn",
                 class_weight: Union[Literal["balanced"], dict[str, float], None] = None,
                 classes: Optional[list[str]] = None):
        super().__init__()
        if updates_per_step < 1:
            raise ValueError(f"model.updates_per_step must be >= 1, got {updates_per_step}")
        self.save_hyperparameters()
        self.updates_per_step = updates_per_step  # what runs now; the CLI may lower it to fit validation
        self.automatic_optimization = False
        self.feature_names = list(feature_names)
        self.classes = [str(c) for c in classes] if classes is not None else ["0", "1"]
        n, k = len(self.feature_names), len(self.classes)
        if update_rule == "newton" and hidden_sizes:
            raise ValueError("model.update_rule newton is for networks without hidden layers (their Hessian is "
                             "written by hand); with hidden_sizes use gd, momentum, nesterov or adam")
        n_parameters = (n + 1) * (1 if k == 2 else k)
        if update_rule == "newton" and n_parameters > NEWTON_MAX_PARAMETERS:
            raise ValueError(f"model.update_rule newton needs a {n_parameters} × {n_parameters} Hessian "
                             f"({n_parameters ** 2 * 8 / 2 ** 30:.1f} GiB in float64) for {n} features"
                             f"{f' and {k} classes' if k > 2 else ''}; the limit is {NEWTON_MAX_PARAMETERS} "
                             "parameters: use gd, nesterov or adam")
        check_class_weight(class_weight, self.classes)  # before any run exists: one line, not a traceback
        self.net: HandBackprop = build_network(n, k, hidden_sizes, activation, init, l2, fused=fused)
        # standardisation statistics of the training split, kept with the weights (set in setup)
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        # each class's weight (model.class_weight), fitted on the training rows in setup; None: unweighted
        self.class_weight: Optional[Tensor] = None
        metrics = classification_metrics(k)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.tracked_rows: Optional[Tensor] = None  # per update of this step: loss, ‖∇‖, tracked values
        self.tracked_start = 0  # the step of tracked_rows' first row: the state its update started from
        self.converged_at: Optional[int] = None
        self.mlflow_run_id: Optional[str] = None  # the run tracking this training, kept in checkpoints
        self.stop: Optional[Stop] = None  # set by a training step that stopped early (signal or divergence)
        self.stop_signals = None  # neuron_torch.train.stopping.StopSignals while a run's handlers are armed
        self._loss_start: Optional[Tensor] = None  # the loss the growth check compares with, on the device
        self._graphed: Optional[tuple] = None  # (batch, cuda_graphs.GraphedUpdates) of a CUDA-graphed step
        self._growth_warned = False

    # --- what the tracker records per update --------------------------------------------------------------

    def tracked_names(self) -> list[str]:
        """Names of :attr:`tracked_rows`' columns: ``train/loss``, ``train/grad_norm``, then the network's."""
        return ["train/loss", "train/grad_norm", *self.net.tracked_names(self.feature_names, self.classes)]

    # --- Lightning hooks ------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if str(self.trainer.precision).startswith("64"):
            # float64 before a checkpoint is restored into the parameters (Lightning converts only later),
            # so a resumed float64 run loads its weights without a round trip through float32
            self.double()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "mean"):
            self.feature_mean.copy_(torch.as_tensor(datamodule.mean))
            self.feature_std.copy_(torch.as_tensor(datamodule.std))
        if datamodule is not None and hasattr(datamodule, "class_totals"):
            self.fit_class_weights(datamodule)
        if getattr(datamodule, "streamed", None) is not None:  # splits too large to keep every prediction of
            metrics = classification_metrics(len(self.classes), thresholds=STREAMED_AUROC_THRESHOLDS)
            self.val_metrics, self.test_metrics = metrics.clone(prefix="val/"), metrics.clone(prefix="test/")

    def fit_class_weights(self, datamodule) -> None:
        """Each class's weight (:attr:`class_weight`, None without ``class_weight``) from the training rows.

        Raises
        ------
        DataError
            When a class the weights need has no training weight, or every row would weigh 0.
        """
        if self.hparams.class_weight is None:
            return
        fitted = class_weights(self.hparams.class_weight, self.classes, datamodule.class_totals())
        self.class_weight = torch.as_tensor(fitted, dtype=torch.float64)

    def row_weights(self, y: Tensor, weight: Optional[Tensor]) -> Optional[Tensor]:
        """Each row's weight in the loss: its sample weight (or 1) times its class's weight.

        Parameters
        ----------
        y : Tensor, shape (m,)
            Class indices.
        weight : Tensor, shape (m, 1), optional
            Sample weights.

        Returns
        -------
        Tensor, shape (m, 1), or None when neither weight applies (the plain mean)
        """
        if self.class_weight is None:
            return weight
        per_class = self.class_weight[y.long()].unsqueeze(1)  # (m, 1)
        return per_class if weight is None else weight * per_class

    def on_train_start(self) -> None:
        # Lightning validates (val_check_interval) by counting training steps. A run resumed from a checkpoint
        # written with another updates_per_step restored that run's count: derive it from the updates done.
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.total
        steps = self.global_step // self.updates_per_step
        progress.ready = progress.started = progress.processed = progress.completed = steps
        self.stop, self._loss_start, self._growth_warned = None, None, False

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = make_update_rule(hp.update_rule, self.net.parameters(), hp.learning_rate, hp.momentum,
                                     hp.betas, hp.eps)
        if hp.lr_schedule is None:
            return optimizer
        if hp.lr_schedule == "step":
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_step_size, hp.lr_gamma)
        else:
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, self.trainer.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()  # the gradients are ours: no autograd graph is built
    def training_step(self, batch, batch_idx: int) -> None:
        # a full batch is reused by every update; a mini-batch stream hands one group of batches per step
        batches = batch.batches if isinstance(batch, BatchGroup) else [batch] * self.updates_per_step
        n_updates = min(len(batches), self.trainer.max_steps - self.global_step)  # max_steps counts updates
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        parameters = dict(self.net.named_parameters())
        start = self._state(optimizer, schedule)  # what a failed check rolls back to
        snapshots, flags, failed = [], [], None
        distributed = self.trainer.world_size > 1
        graphed = self._graphed_updates(batches, n_updates, parameters, optimizer, schedule)
        if graphed is not None:
            snapshots, flags = graphed, [None] * len(graphed)
        for batch in batches[:n_updates] if graphed is None else []:
            if not distributed and self._signalled():  # a Python flag: no host sync
                self.stop = Stop("interrupted", signum=self.stop_signals.signum)
                break
            try:
                snapshot, converged, flag = self._update(batch, parameters, optimizer, schedule)
            except StepFailed as err:  # Newton: no step can be computed from this state
                failed = str(err)
                break
            except DataError as err:  # a streamed shard gone or corrupt: the updates before it stand
                self.stop = Stop("failed", f"{err} (during update {self.global_step + 1})")
                break
            snapshots.append(snapshot)
            flags.append(flag)
            if converged:
                self.trainer.should_stop = True
                break
        rows = self.net.tracked_rows(torch.stack(snapshots)) if snapshots else self._no_rows()
        self.tracked_rows = self._checked(rows, flags, failed, start, batches, parameters, optimizer, schedule)
        self.tracked_start = self.global_step - len(self.tracked_rows)  # the step of the first row
        if self.stop is None and (self.global_step >= self.trainer.max_steps or self.trainer.should_stop):
            # the last update's result as one more row (step = global_step), so the per-update values end
            # where training ended, not at the state the last update started from
            last = batches[max(len(self.tracked_rows), 1) - 1]
            self.tracked_rows = torch.cat([self.tracked_rows, self._final_row(last)])

    def _graphed_updates(self, batches: list, n_updates: int, parameters: dict, optimizer, schedule
                         ) -> Optional[list[Tensor]]:
        """The step's updates replayed from a CUDA graph, when the set-up gives the same numbers that way (one
        full batch on CUDA, gd, momentum or Nesterov, no schedule, no ``tol``, one process; see
        :mod:`neuron_torch.train.cuda_graphs`): their snapshots, one per update. None otherwise: run them one by one.

        On a small table an update is a few kernels of microseconds each; the graph launches a step's k updates
        at once. A stop signal is then seen once per training step instead of once per update.
        """
        batch = batches[0]
        if (n_updates < 2 or n_updates != self.updates_per_step or not isinstance(batch, tuple)
                or any(other is not batch for other in batches) or self._signalled()
                or not cuda_graphs.capturable(parameters.values(), optimizer.optimizer, schedule=schedule,
                                              world_size=self.trainer.world_size, host_reads=self.hparams.tol > 0)):
            return None
        if self._graphed is None or self._graphed[0] is not batch:
            inner = optimizer.optimizer
            self._graphed = (batch, cuda_graphs.GraphedUpdates(cuda_graphs.neuron_update(self.net, inner, *batch),
                                                               n_updates, cuda_graphs.watched(self.net, inner, *batch)))
        snapshots = self._graphed[1]()  # (k, s)
        # a replay runs the rule's kernels without Lightning's optimizer wrapper: count the updates here
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        for _ in range(n_updates):
            progress.increment_ready()
            progress.increment_completed()
        return list(snapshots)

    def _final_row(self, batch) -> Tensor:
        """The tracked row of the state training ended in: its loss, gradients and parameters, (1, columns).
        One more forward and backward pass, on the last update's batch; no update."""
        bp, _, total = self._pass(batch)
        loss, grads = bp.loss, bp.gradients
        if self.trainer.world_size > 1:
            loss, grads, _, _ = self._all_reduce(total, loss, grads)
        return self.net.tracked_rows(torch.stack([self.net.snapshot(loss, grads, bp)]))

    def _signalled(self) -> bool:
        return self.stop_signals is not None and self.stop_signals.signum is not None

    def _checked(self, rows: Tensor, flags: list, failed: Optional[str], start: tuple, batches: list,
                 parameters: dict, optimizer, schedule) -> Tensor:
        """The step's rows, once it is checked: finite, not diverging, and (under DDP) no rank signalled.

        One host read per training step, never per update. When the check fails, the state saved at the
        step's start is restored and the updates before the failing one are replayed (same batches, same
        operations: the same numbers), so the module holds the last finite state and ``global_step`` counts
        exactly the updates kept; :attr:`stop` then says why, and the rows are cut to those updates.
        """
        k = len(rows)
        # the fast path: a few reductions and one host read. A sum is finite only if every term is (a sum
        # that overflows takes the exact path below, which then finds nothing to stop for)
        total = rows.sum()
        for p in parameters.values():
            total = total + p.sum()
        checks = [total, rows[:, 0].max() if k else total.new_zeros(())]
        if flags and flags[0] is not None:
            checks.append(torch.stack(flags).sum())
        verdict = torch.stack(checks).tolist()
        if self._loss_start is None and k:
            self._loss_start = max(float(rows[0, 0]), LOSS_FLOOR)  # read once per fit
        limit = GROWTH * self._loss_start if self._loss_start is not None else math.inf
        growth_matters = self.hparams.divergence == "stop" or not self._growth_warned  # warned once is enough
        if (math.isfinite(verdict[0]) and failed is None and not (verdict[1] > limit and growth_matters)
                and not (len(verdict) > 2 and verdict[2] > 0)):
            return rows

        # the exact path, only when something is wrong: per-update verdicts
        finite_rows = torch.isfinite(rows).all(1)  # (k,)
        params_finite = all(bool(torch.isfinite(p).all()) for p in parameters.values())
        grown = rows[:, 0] > limit
        any_grown = bool(grown.any())
        signalled = torch.stack(flags) > 0 if flags and flags[0] is not None else torch.zeros_like(finite_rows)
        any_signal = bool(signalled.any())

        lr = self.hparams.learning_rate
        step0 = self.global_step - k  # the updates done before this step
        bad = ~finite_rows
        if any_grown and self.hparams.divergence == "stop":
            bad = bad | grown
        elif any_grown and not self._growth_warned:
            self._growth_warned = True
            j = int(grown.nonzero()[0, 0])
            log.warning(f"warning: the training loss grew from {self._loss_start:.4g} to "
                        f"{float(rows[j, 0]):.4g} by update {step0 + j} (model.learning_rate {lr:g}): "
                        f"training is diverging; lower model.learning_rate (model.divergence: stop ends "
                        f"the run there)")
        first_bad = int(bad.nonzero()[0, 0]) if bool(bad.any()) else (k if failed or not params_finite else None)
        first_signal = int(signalled.nonzero()[0, 0]) + 1 if any_signal else None  # stop after that update
        if first_bad is None and first_signal is None:
            return rows
        if first_bad is not None and (first_signal is None or first_bad <= first_signal):
            keep = self._replay(start, batches, first_bad, parameters, optimizer, schedule)
            self.stop = Stop("diverged", self._divergence_reason(rows, keep, step0, failed, limit, lr))
        else:
            keep = first_signal
            if keep < k:
                self._replay(start, batches, keep, parameters, optimizer, schedule)
            self.stop = Stop("interrupted", signum=self.stop_signals.signum if self._signalled() else 2)
        return rows[:keep]

    def _divergence_reason(self, rows: Tensor, keep: int, step0: int, failed: Optional[str],
                           limit: float, lr: float) -> str:
        """One line: which update, what went wrong, the learning rate and what to do."""
        update = step0 + keep + 1  # the update that was not applied, counted from 1
        if keep < len(rows) and not bool(torch.isfinite(rows[keep]).all()):
            column = int((~torch.isfinite(rows[keep])).nonzero()[0, 0])
            what = f"{self.tracked_names()[column]} is {float(rows[keep, column])} at its start"
        elif (keep < len(rows) and self.hparams.divergence == "stop"
              and bool(rows[keep, 0] > limit)):
            what = (f"the training loss at its start grew from {self._loss_start:.4g} to "
                    f"{float(rows[keep, 0]):.4g} (over {GROWTH:g} times the first)")
        elif failed is not None and keep == len(rows):
            what = failed
        else:
            what = "it makes the parameters non-finite"
        return (f"training diverged at update {update}: {what} (model.learning_rate {lr:g}); "
                f"lower model.learning_rate")

    def _state(self, optimizer, schedule) -> tuple:
        """What a training step starts from: parameters, update-rule state, schedule and step count."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        counts = (progress.total.ready, progress.total.completed, progress.current.ready,
                  progress.current.completed)
        inner = optimizer.optimizer  # copied by hand: state_dict() and deepcopy cost tens of µs per step
        rule_state = ({p: _copied(state) for p, state in inner.state.items()},
                      [group["lr"] for group in inner.param_groups])
        return ([p.detach().clone() for p in self.net.parameters()], rule_state,
                schedule.state_dict() if schedule is not None else None, counts)

    def _replay(self, start: tuple, batches: list, n: int, parameters: dict, optimizer, schedule) -> int:
        """Restore the step's start and run its first ``n`` updates again; fewer while the parameters they
        reach are not finite. Returns the number of updates kept."""
        params, optimizer_state, schedule_state, counts = start
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        while True:
            with torch.no_grad():
                for p, saved in zip(self.net.parameters(), params):
                    p.copy_(saved)
            inner, (rule_state, lrs) = optimizer.optimizer, optimizer_state
            inner.state.clear()
            inner.state.update({p: _copied(state) for p, state in rule_state.items()})
            for group, lr in zip(inner.param_groups, lrs):
                group["lr"] = lr
            if schedule is not None:
                schedule.load_state_dict(schedule_state)
            (progress.total.ready, progress.total.completed, progress.current.ready,
             progress.current.completed) = counts
            for batch in batches[:n]:
                self._update(batch, parameters, optimizer, schedule)
            if n == 0 or all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
                return n
            n -= 1

    def _no_rows(self) -> Tensor:
        """The rows of a step that ran no update: (0, columns)."""
        p = next(self.net.parameters())
        return p.new_empty((0, len(self.tracked_names())))

    def _update(self, batch, parameters: dict, optimizer, schedule) -> tuple[Tensor, bool, Optional[Tensor]]:
        """One hand-written update on ``batch`` (``(X, Y)`` or ``(X, Y, W)``); returns the network's snapshot of
        the state it started from, whether the gradient norm there was under ``tol``, and (data-parallel only)
        the number of ranks that had been signalled to stop, summed with the gradients, on the device."""
        newton = self.hparams.update_rule == "newton"
        distributed = self.trainer.world_size > 1
        try:
            bp, hessian, total = self._pass(batch, hessian=newton)
            failure = None
        except DataError as err:
            if not distributed:
                raise
            # this rank's rows cannot be read: take part in the all-reduce with nothing (the other ranks wait in
            # it), and say so in its payload, so that every rank stops at this same update
            failure, (bp, hessian, total) = err, self._pass(None, hessian=newton)
        loss, grads = bp.loss, bp.gradients
        flag = None
        if distributed:
            loss, grads, hessian, flags = self._all_reduce(total, loss, grads, hessian, stop=float(self._signalled()),
                                                           failed=float(failure is not None))
            flag = flags[0]
            if isinstance(batch, StreamedSplit) and flags[1].item() > 0:  # one host read, on streamed tables only
                import torch.distributed as dist

                messages = [None] * self.trainer.world_size  # every rank stops with the first failing rank's words
                dist.all_gather_object(messages, None if failure is None else str(failure))
                raise DataError(next(message for message in messages if message))
        # the state this update starts from: loss(w, b), the gradients and w, b themselves
        snapshot, converged = self.net.snapshot(loss, grads, bp), False
        if self.hparams.tol > 0:  # the gradient norm is read on the host only when it can stop training
            grad_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()]))
            converged = grad_norm.item() < self.hparams.tol

        for name, p in parameters.items():
            p.grad = grads[name]
        if hessian is None:
            optimizer.step()  # the hand-written rule; Lightning counts it as one global step
        else:
            optimizer.step(hessian=hessian)
        if schedule is not None:
            schedule.step()
        if converged:
            self.converged_at = self.global_step  # the updates run, this one included
        return snapshot, converged, flag

    def _pass(self, batch, hessian: bool = False) -> tuple:
        """The forward and backward pass of one update: ``(BackwardPass, Hessian or None, what its means are
        over)``. ``batch`` is ``(X, Y)``, ``(X, Y, W)`` or a streamed split, summed chunk by chunk."""
        if batch is None or isinstance(batch, StreamedSplit):  # None: no rows at all (a rank whose rows failed)
            streamed = full_batch(self.net, batch or [], hessian)
            return streamed, streamed.hessian, streamed.rows
        bp = self.net.forward_backward(*batch)
        return bp, self.net.hessian(*batch[:1], *batch[2:]) if hessian else None, _batch_weight(batch)

    def _all_reduce(self, m: Tensor | float, loss: Tensor, grads: dict[str, Tensor], hessian: Optional[Tensor] = None,
                    stop: float = 0.0, failed: float = 0.0) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor], Tensor]:
        """Exact full-data gradients under data parallelism: the sum of per-rank sums over the global m.

        Each rank's loss, gradients (and Hessian) are means over its own ``m`` rows (weighted means over its
        rows' total weight ``m``); ``Σ_r m_r·g_r / Σ_r m_r`` is the mean over all rows. The L2 terms, equal on
        every rank, come through unchanged. ``stop`` (1 on a rank that was signalled) and ``failed`` (1 on a
        rank whose rows could not be read) ride in the same payload, so every rank learns of them at the same
        update; their sums over the ranks are returned last, as a tensor of 2.
        """
        reduce = self.trainer.strategy.reduce
        m_total = reduce(torch.as_tensor(m, dtype=loss.dtype, device=loss.device).clone(), reduce_op="sum")
        parts = [loss.view(1)] + [g.flatten() for g in grads.values()]
        if hessian is not None:
            parts.append(hessian.flatten())
        signal = torch.tensor([stop, failed], dtype=loss.dtype, device=loss.device)
        payload = reduce(torch.cat([torch.cat(parts) * m, signal]), reduce_op="sum")
        # a step where every rank failed has m_total 0: its values are never used (training stops there)
        flat, signals = payload[:-2] / m_total, payload[-2:]
        loss, offset, reduced = flat[0], 1, {}
        for name, g in grads.items():
            reduced[name] = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        if hessian is not None:
            hessian = flat[offset:].view_as(hessian)
        return loss, reduced, hessian, signals

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mlflow_run_id"] = self.mlflow_run_id

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run is a new MLflow run with its own checkpoints/<run id>/ folder: the old run's
        # ModelCheckpoint bookkeeping (its folder, its best-k files) does not carry over. Dropping it here,
        # before Lightning restores callbacks, is what keeps Lightning from warning that the folder changed.
        callbacks = checkpoint.get("callbacks") or {}
        for key in [key for key in callbacks if str(key).startswith("ModelCheckpoint")]:
            del callbacks[key]

    def on_train_end(self) -> None:
        if self.hparams.tol > 0 and self.converged_at is None:
            warnings.warn(f"the gradient norm did not fall under tol={self.hparams.tol:g} within "
                          f"{self.global_step} updates; raise trainer.max_steps or the learning rate",
                          ConvergenceWarning, stacklevel=1)

    def _evaluate(self, batch, metrics: MetricCollection, stage: str) -> None:
        try:
            self._evaluate_rows(batch, metrics, stage)
        except DataError as err:  # a streamed shard gone or corrupt while validating: stop training here
            if stage != "val":
                raise
            self.stop = Stop("failed", f"{err} (validating after update {self.global_step})")

    def _evaluate_rows(self, batch, metrics: MetricCollection, stage: str) -> None:
        head = layers.OUTPUTS[self.net.output]
        loss_sum, total = 0.0, 0.0
        # a loaded split is one batch; a streamed one is read chunk by chunk, its loss a mean over every row
        for X, Y, *weight in (batch if isinstance(batch, StreamedSplit) else [batch]):
            Z = self.net.logits(X)  # (m, 1) or (m, k)
            m = weight[0].sum() if weight else X.shape[0]
            if weight:  # a chunk of weight 0 adds nothing to the mean (its own weighted mean is 0/0)
                loss_sum = loss_sum + torch.where(m > 0, head.loss(Z, Y, *weight) * m, 0.0)
            else:
                loss_sum = loss_sum + head.loss(Z, Y) * m
            total = total + m
            if Y.shape[1] == 1:
                metrics.update(head.forward(Z).squeeze(1), Y.squeeze(1).long())
            else:
                metrics.update(head.forward(Z), Y.argmax(1))
        # every rank evaluates the whole split, so syncing only averages equal values
        # batch_size 1: the split is one batch however it was read (Lightning would guess from the tensors)
        self.log(f"{stage}/loss", loss_sum / total, prog_bar=stage == "val", sync_dist=True, batch_size=1)
        self.log_dict(metrics, prog_bar=False, batch_size=1)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        X = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(X)

    def predict_proba(self, X_raw: Tensor) -> Tensor:
        """Class probabilities for raw (unstandardised) features, shape (m, n) → (m, 1) (of label 1, two
        classes) or (m, k)."""
        with torch.no_grad():
            X = (X_raw.to(self.feature_mean) - self.feature_mean) / self.feature_std
            return self.net(X)
