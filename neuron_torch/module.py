"""The LightningModule: one hand-written update per training step, metrics on validation and test."""

from __future__ import annotations

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
from neuron_torch.networks import ActivationName, DeepNetwork, HandBackprop, Init, SingleNeuron
from neuron_torch.optim import make_update_rule

UpdateRule = Literal["gd", "momentum", "nesterov", "adam"]


class ConvergenceWarning(UserWarning):
    """Training used every step without the gradient norm falling under ``tol`` (as in scikit-learn)."""


class NeuronModule(L.LightningModule):
    """Trains a :class:`SingleNeuron` or :class:`DeepNetwork` with hand-written gradients and updates.

    ``automatic_optimization`` is off: each training step computes the gradients by hand, puts them in
    ``.grad`` and calls the update rule's ``step()`` through Lightning, which counts it in ``global_step``.

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
    update_rule : {"gd", "momentum", "nesterov", "adam"}
        The hand-written update (see :mod:`neuron_torch.optim`).
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
    """

    def __init__(self, feature_names: list[str], hidden_sizes: list[int] = [],
                 activation: ActivationName = "relu", init: Optional[Init] = None, l2: float = 0.0,
                 learning_rate: float = 0.5, update_rule: UpdateRule = "gd", momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_schedule: Optional[Literal["step", "cosine"]] = None, lr_step_size: int = 1000,
                 lr_gamma: float = 0.5, tol: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.feature_names = list(feature_names)
        n = len(self.feature_names)
        if hidden_sizes:
            self.net: HandBackprop = DeepNetwork(n, hidden_sizes, activation, init or "he", l2)
        else:
            self.net = SingleNeuron(n, init or "zeros", l2)
        # standardisation statistics of the training split, kept with the weights (set in setup)
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        metrics = MetricCollection({"accuracy": BinaryAccuracy(), "precision": BinaryPrecision(),
                                    "recall": BinaryRecall(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.tracked_row: Optional[Tensor] = None  # this step's loss, gradient norm and tracked values
        self.converged_at: Optional[int] = None
        self.mlflow_run_id: Optional[str] = None  # the run tracking this training, kept in checkpoints

    # --- what the tracker records per update --------------------------------------------------------------

    def tracked_names(self) -> list[str]:
        """Names of :attr:`tracked_row`'s entries: ``train/loss``, ``train/grad_norm``, then the network's."""
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
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        X, Y = batch
        bp = self.net.forward_backward(X, Y)
        loss, grads = bp.loss, bp.gradients
        if self.trainer.world_size > 1:
            loss, grads = self._all_reduce(X.shape[0], loss, grads)
        grad_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()]))
        # record the state this update starts from: loss(w, b), ‖∇‖ and w, b themselves
        self.tracked_row = torch.cat([loss.view(1), grad_norm.view(1), self.net.tracked_values(bp)])

        for name, p in self.net.named_parameters():
            p.grad = grads[name]
        self.optimizers().step()  # the hand-written rule; Lightning counts it as one global step
        schedule = self.lr_schedulers()
        if schedule is not None:
            schedule.step()

        if self.hparams.tol > 0 and grad_norm.item() < self.hparams.tol:
            self.converged_at = self.global_step
            self.trainer.should_stop = True

    def _all_reduce(self, m: int, loss: Tensor, grads: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Exact full-data gradients under data parallelism: the sum of per-rank sums over the global m.

        Each rank's gradients are means over its own ``m`` rows; ``Σ_r m_r·g_r / Σ_r m_r`` is the mean over
        all rows. The L2 term λ·W, equal on every rank, comes through unchanged.
        """
        reduce = self.trainer.strategy.reduce
        m_total = reduce(torch.tensor(float(m), device=loss.device), reduce_op="sum")
        flat = torch.cat([loss.view(1)] + [g.flatten() for g in grads.values()]) * m
        flat = reduce(flat, reduce_op="sum") / m_total
        loss, offset, reduced = flat[0], 1, {}
        for name, g in grads.items():
            reduced[name] = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        return loss, reduced

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
    """The usual progress bar, showing the training loss without a per-step ``self.log``.

    The loss is read from the module only when the bar refreshes, so steps in between never wait on it.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("updates")  # training is one epoch of max_steps updates

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        row = getattr(pl_module, "tracked_row", None)
        if row is not None:
            metrics["loss"] = f"{row[0].item():.4g}"
        metrics.pop("v_num", None)
        return metrics
