"""The LightningModule: its hooks. A training step's updates are :mod:`neuron_torch.train.loop`'s; validation
and test metrics :mod:`neuron_torch.train.metrics`'."""

from __future__ import annotations

import warnings
from typing import Literal, Optional, Union

import lightning as L
import torch
from torch import Tensor

from neuron_torch.data.summary import DataSummary
from neuron_torch.errors import ConfigError, DataError
from neuron_torch.nn.networks import ActivationName, HandBackprop, Init, build_network
from neuron_torch.nn.optim import NEWTON_MAX_PARAMETERS, UPDATE_RULES, make_update_rule
from neuron_torch.train.loop import UpdateLoop
from neuron_torch.train.metrics import STREAMED_AUROC_THRESHOLDS, classification_metrics, evaluate
from neuron_torch.train.stopping import Stop

UpdateRule = Literal[UPDATE_RULES]


class ConvergenceWarning(UserWarning):
    """Training used every step without the gradient norm falling under ``tol`` (as in scikit-learn)."""


class NeuronModule(L.LightningModule):
    """Trains a :class:`SingleNeuron` or :class:`DeepNetwork` with hand-written gradients and updates.

    ``automatic_optimization`` is off: each training step runs its updates (gradients by hand, then the
    rule) in :class:`~neuron_torch.train.loop.UpdateLoop`, which has Lightning count each update kept in
    ``global_step``. So ``global_step`` and ``trainer.max_steps`` count updates, however many run in one
    training step.

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
        Lightning's fixed cost per step, more than a whole update on a small table, over more updates. The
        Trainer's ``val_check_interval`` counts training steps, so it counts ``updates_per_step`` updates
        each; ``neuron-torch train`` converts it from updates for you.
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
        the training rows. The loss and every gradient are then weighted means. The data fits them and
        weighs its rows with them (``data.class_weight``, which the command line links to this key).
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
        self.save_hyperparameters()
        self.updates_per_step = updates_per_step  # what runs now; the CLI may lower it to fit validation
        self.automatic_optimization = False
        self.feature_names = list(feature_names)
        self.classes = [str(c) for c in classes] if classes is not None else ["0", "1"]
        n, k = len(self.feature_names), len(self.classes)
        if update_rule == "newton" and hidden_sizes:
            raise ConfigError("model.update_rule newton is for networks without hidden layers (their Hessian is "
                              "written by hand); with hidden_sizes use gd, momentum, nesterov or adam")
        n_parameters = (n + 1) * (1 if k == 2 else k)
        if update_rule == "newton" and n_parameters > NEWTON_MAX_PARAMETERS:
            raise ConfigError(f"model.update_rule newton needs a {n_parameters} × {n_parameters} Hessian "
                              f"({n_parameters ** 2 * 8 / 2 ** 30:.1f} GiB in float64) for {n} features"
                              f"{f' and {k} classes' if k > 2 else ''}; the limit is {NEWTON_MAX_PARAMETERS} "
                              "parameters: use gd, nesterov or adam")
        self.net: HandBackprop = build_network(n, k, hidden_sizes, activation, init, l2, fused=fused)
        # standardisation statistics of the training split, kept with the weights (set in setup)
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        self._use_metrics(classification_metrics(k))
        self.tracked_rows: Optional[Tensor] = None  # per update of this step: loss, ‖∇‖, tracked values
        self.tracked_start = 0  # the step of tracked_rows' first row: the state its update started from
        self.converged_at: Optional[int] = None
        self.mlflow_run_id: Optional[str] = None  # the run tracking this training, kept in checkpoints
        self.stop: Optional[Stop] = None  # set by a training step that stopped early (signal or divergence)
        self.stop_signals = None  # neuron_torch.train.stopping.StopSignals while a run's handlers are armed
        self.update_loop: Optional[UpdateLoop] = None  # the running fit's

    def tracked_names(self) -> list[str]:
        """Names of :attr:`tracked_rows`' columns: ``train/loss``, ``train/grad_norm``, then the network's."""
        return ["train/loss", "train/grad_norm", *self.net.tracked_names(self.feature_names, self.classes)]

    def use_data(self, summary: DataSummary) -> None:
        """Take what the model keeps of its data: the standardisation, and metrics that fit the split's size.

        Raises
        ------
        ConfigError
            When the data weighs its rows with other class weights than ``class_weight`` asks for (the data module
            applies them: give it the same ``class_weight``, as the command line does).
        """
        if summary.class_weight != self.hparams.class_weight:
            raise ConfigError(f"model.class_weight is {self.hparams.class_weight!r} but the data module weighs its rows "
                              f"with class_weight {summary.class_weight!r}: give NeuronDataModule the same class_weight")
        self.feature_mean.copy_(torch.as_tensor(summary.mean))
        self.feature_std.copy_(torch.as_tensor(summary.std))
        if summary.streamed:  # splits too large to keep every prediction of
            self._use_metrics(classification_metrics(len(self.classes), thresholds=STREAMED_AUROC_THRESHOLDS))

    def _use_metrics(self, metrics) -> None:
        self.val_metrics, self.test_metrics = metrics.clone(prefix="val/"), metrics.clone(prefix="test/")

    # --- Lightning hooks ------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if str(self.trainer.precision).startswith("64"):
            # float64 before a checkpoint is restored into the parameters (Lightning converts only later),
            # so a resumed float64 run loads its weights without a round trip through float32
            self.double()
        if self.trainer.datamodule is not None:
            self.use_data(self.trainer.datamodule.summary)

    def on_train_start(self) -> None:
        self.stop, self.update_loop = None, UpdateLoop(self)

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
        step = self.update_loop.run(batch, batch_idx)
        self.tracked_rows, self.tracked_start = step.rows, step.start
        if step.stop is not None:
            self.stop = step.stop
        if step.converged_at is not None:
            self.converged_at = step.converged_at

    def on_train_end(self) -> None:
        if self.hparams.tol > 0 and self.converged_at is None:
            warnings.warn(f"the gradient norm did not fall under tol={self.hparams.tol:g} within "
                          f"{self.global_step} updates; raise trainer.max_steps or the learning rate",
                          ConvergenceWarning, stacklevel=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mlflow_run_id"] = self.mlflow_run_id

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run is a new MLflow run with its own checkpoints/<run id>/ folder: the old run's
        # ModelCheckpoint bookkeeping (its folder, its best-k files) does not carry over. Dropping it here,
        # before Lightning restores callbacks, is what keeps Lightning from warning that the folder changed.
        callbacks = checkpoint.get("callbacks") or {}
        for key in [key for key in callbacks if str(key).startswith("ModelCheckpoint")]:
            del callbacks[key]

    def validation_step(self, batch, batch_idx: int) -> None:
        try:
            self._evaluate(batch, self.val_metrics, "val")
        except DataError as err:  # a streamed shard gone or corrupt while validating: stop training here
            self.stop = Stop("failed", f"{err} (validating after update {self.global_step})")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def _evaluate(self, batch, metrics, stage: str) -> None:
        loss = evaluate(self.net, batch, metrics)
        # every rank evaluates the whole split, so syncing only averages equal values
        # batch_size 1: the split is one batch however it was read (Lightning would guess from the tensors)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=1)
        self.log_dict(metrics, prog_bar=False, batch_size=1)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        X = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(X)

    def predict_proba(self, X_raw: Tensor) -> Tensor:
        """Class probabilities for raw (unstandardised) features, shape (m, n) → (m, 1) (of label 1, two
        classes) or (m, k)."""
        with torch.no_grad():
            X = (X_raw.to(self.feature_mean) - self.feature_mean) / self.feature_std
            return self.net(X)
