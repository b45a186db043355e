"""The LightningModule: hand-written updates in each training step, metrics on validation and test."""

from __future__ import annotations

import time
import warnings
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryF1Score, BinaryPrecision,
                                         BinaryRecall)

from neuron_torch import layers
from neuron_torch.data import BatchGroup
from neuron_torch.networks import ActivationName, DeepNetwork, HandBackprop, Init, SingleNeuron
from neuron_torch.optim import make_update_rule

UpdateRule = Literal["gd", "momentum", "nesterov", "adam", "newton"]


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
        Hidden layer widths; empty trains the single neuron.
    activation : {"relu", "tanh", "sigmoid", "leaky_relu"}
        Hidden activation (deep networks only).
    init : {"zeros", "normal", "xavier", "he"}, optional
        Initialisation; default zeros for the single neuron, He for deep networks.
    l2 : float
        L2 penalty ``(λ/2)·Σ‖W‖²`` in the loss and gradients.
    learning_rate : float
        ``α``.
    update_rule : {"gd", "momentum", "nesterov", "adam", "newton"}
        The hand-written update (see :mod:`neuron_torch.optim`). ``newton`` (single neuron only) also
        computes the Hessian ``XᵀSX/m`` each update, one more pass over X; use ``learning_rate`` 1 for the
        full Newton (IRLS) step.
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
        Let the single neuron take its one-pass CPU kernel where it applies (see :mod:`neuron_torch.fused`);
        false forces the plain reference path (two passes over X), as ``NEURON_TORCH_FUSED=0`` does.
    """

    def __init__(self, feature_names: list[str], hidden_sizes: list[int] = [],
                 activation: ActivationName = "relu", init: Optional[Init] = None, l2: float = 0.0,
                 learning_rate: float = 0.5, update_rule: UpdateRule = "gd", momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_schedule: Optional[Literal["step", "cosine"]] = None, lr_step_size: int = 1000,
                 lr_gamma: float = 0.5, tol: float = 0.0, updates_per_step: int = 1,
                 fused: bool = True):
        super().__init__()
        if updates_per_step < 1:
            raise ValueError(f"model.updates_per_step must be >= 1, got {updates_per_step}")
        self.save_hyperparameters()
        self.updates_per_step = updates_per_step  # what runs now; the CLI may lower it to fit validation
        self.automatic_optimization = False
        self.feature_names = list(feature_names)
        n = len(self.feature_names)
        if update_rule == "newton" and hidden_sizes:
            raise ValueError("model.update_rule newton is for the single neuron (its Hessian is written by "
                             "hand); with hidden_sizes use gd, momentum, nesterov or adam")
        if hidden_sizes:
            self.net: HandBackprop = DeepNetwork(n, hidden_sizes, activation, init or "he", l2)
        else:
            self.net = SingleNeuron(n, init or "zeros", l2, fused=fused)
        # standardisation statistics of the training split, kept with the weights (set in setup)
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        metrics = MetricCollection({"accuracy": BinaryAccuracy(), "precision": BinaryPrecision(),
                                    "recall": BinaryRecall(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.tracked_rows: Optional[Tensor] = None  # per update of this step: loss, ‖∇‖, tracked values
        self.converged_at: Optional[int] = None
        self.mlflow_run_id: Optional[str] = None  # the run tracking this training, kept in checkpoints

    # --- what the tracker records per update --------------------------------------------------------------

    def tracked_names(self) -> list[str]:
        """Names of :attr:`tracked_rows`' columns: ``train/loss``, ``train/grad_norm``, then the network's."""
        return ["train/loss", "train/grad_norm", *self.net.tracked_names(self.feature_names)]

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

    def on_train_start(self) -> None:
        # Lightning validates (val_check_interval) by counting training steps. A run resumed from a checkpoint
        # written with another updates_per_step restored that run's count: derive it from the updates done.
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.total
        steps = self.global_step // self.updates_per_step
        progress.ready = progress.started = progress.processed = progress.completed = steps

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
        snapshots = []
        for X, Y in batches[:n_updates]:
            snapshot, converged = self._update(X, Y, parameters, optimizer, schedule)
            snapshots.append(snapshot)
            if converged:
                self.trainer.should_stop = True
                break
        self.tracked_rows = self.net.tracked_rows(torch.stack(snapshots))  # (updates run, columns), on device

    def _update(self, X: Tensor, Y: Tensor, parameters: dict, optimizer, schedule) -> tuple[Tensor, bool]:
        """One hand-written update; returns the network's snapshot of the state it started from, and whether
        the gradient norm there was under ``tol``."""
        bp = self.net.forward_backward(X, Y)
        loss, grads = bp.loss, bp.gradients
        hessian = self._hessian(X) if self.hparams.update_rule == "newton" else None
        if self.trainer.world_size > 1:
            loss, grads, hessian = self._all_reduce(X.shape[0], loss, grads, hessian)
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
        return snapshot, converged

    def _hessian(self, X: Tensor) -> Tensor:
        """The single neuron's ``(w, b)`` Hessian of the loss, L2 included, shape (n + 1, n + 1)."""
        linear = self.net.linear
        return layers.l2_hessian(layers.bce_hessian(X, linear.weight, linear.bias), self.net.l2)

    def _all_reduce(self, m: int, loss: Tensor, grads: dict[str, Tensor], hessian: Optional[Tensor] = None
                    ) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
        """Exact full-data gradients under data parallelism: the sum of per-rank sums over the global m.

        Each rank's loss, gradients (and Hessian) are means over its own ``m`` rows; ``Σ_r m_r·g_r / Σ_r m_r``
        is the mean over all rows. The L2 terms, equal on every rank, come through unchanged.
        """
        reduce = self.trainer.strategy.reduce
        m_total = reduce(torch.tensor(float(m), device=loss.device), reduce_op="sum")
        parts = [loss.view(1)] + [g.flatten() for g in grads.values()]
        if hessian is not None:
            parts.append(hessian.flatten())
        flat = reduce(torch.cat(parts) * m, reduce_op="sum") / m_total
        loss, offset, reduced = flat[0], 1, {}
        for name, g in grads.items():
            reduced[name] = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        if hessian is not None:
            hessian = flat[offset:].view_as(hessian)
        return loss, reduced, hessian

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mlflow_run_id"] = self.mlflow_run_id

    def on_train_end(self) -> None:
        if self.hparams.tol > 0 and self.converged_at is None:
            warnings.warn(f"the gradient norm did not fall under tol={self.hparams.tol:g} within "
                          f"{self.global_step} updates; raise trainer.max_steps or the learning rate",
                          ConvergenceWarning, stacklevel=1)

    def _evaluate(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, stage: str) -> None:
        X, Y = batch
        Z = self.net.logits(X)  # (m, 1)
        # every rank evaluates the whole split, so syncing only averages equal values
        self.log(f"{stage}/loss", layers.bce_from_logits(Z, Y), prog_bar=stage == "val", sync_dist=True)
        metrics.update(layers.sigmoid(Z).squeeze(1), Y.squeeze(1).long())
        self.log_dict(metrics, prog_bar=False)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        X = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(X)

    def predict_proba(self, X_raw: Tensor) -> Tensor:
        """Probability of label 1 for raw (unstandardised) features, shape (m, n) → (m, 1)."""
        with torch.no_grad():
            X = (X_raw.to(self.feature_mean) - self.feature_mean) / self.feature_std
            return self.net(X)


class LossProgressBar(TQDMProgressBar):
    """The usual progress bar, counting updates and showing the training loss without a per-step ``self.log``.

    It advances by ``global_step`` (several updates may run in one training step) and redraws at most every
    ``refresh_seconds``, reading the loss from the module only then, so updates in between never wait on it.
    """

    def __init__(self, refresh_seconds: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.refresh_seconds = refresh_seconds
        self._last_refresh = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("updates")  # training is one epoch of max_steps updates
        self.train_progress_bar.total = trainer.max_steps
        self.train_progress_bar.n = self.train_progress_bar.initial = trainer.global_step  # resumed runs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        bar, now = self.train_progress_bar, time.monotonic()
        done = trainer.global_step >= trainer.max_steps or trainer.should_stop
        if bar.disable or (now - self._last_refresh < self.refresh_seconds and not done):
            return
        self._last_refresh = now
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        rows = getattr(pl_module, "tracked_rows", None)
        if rows is not None:
            metrics["loss"] = f"{rows[-1, 0].item():.4g}"
        metrics.pop("v_num", None)
        return metrics
