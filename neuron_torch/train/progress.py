"""What training shows while it runs: a bar of updates in a terminal, one line per validation elsewhere."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class UpdateProgressBar(TQDMProgressBar):
    """One bar counting updates (``trainer.max_steps``), with the training loss and the last ``val/loss``.

    It advances by ``global_step`` (several updates run in one training step) and redraws at most every
    ``refresh_seconds`` and after each validation, reading the loss from the module only then, so updates in
    between never wait on it. Validation and test are one batch each: they draw no bar of their own.
    """

    def __init__(self, refresh_seconds: float = 0.1, **kwargs):
        kwargs.setdefault("leave", True)  # the finished bar stays on screen, with the last loss
        super().__init__(**kwargs)
        self.refresh_seconds = refresh_seconds
        self._last_refresh = 0.0

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("updates")  # training is one epoch of max_steps updates
        self.train_progress_bar.total = trainer.max_steps
        self.train_progress_bar.n = self.train_progress_bar.initial = trainer.global_step  # resumed runs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        done = trainer.global_step >= trainer.max_steps or trainer.should_stop
        if time.monotonic() - self._last_refresh >= self.refresh_seconds or done:
            self._redraw(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit":
            self._redraw(trainer, pl_module)

    def _redraw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        self._last_refresh = time.monotonic()
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        loss = last_loss(pl_module)
        if loss is not None:
            metrics["loss"] = f"{loss:.4g}"
        metrics.pop("v_num", None)
        return metrics


class ValidationLines(Callback):
    """For a log file or a pipe (no terminal): one plain line per validation, and none in between.

    ``update 300/1000  loss 0.0871  val/loss 0.0902  val/accuracy 0.9737``
    """

    KEYS = ("val/loss", "val/accuracy")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.global_rank != 0:
            return
        parts = [f"update {trainer.global_step}/{trainer.max_steps}"]
        loss = last_loss(pl_module)
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        parts += [f"{key} {float(trainer.callback_metrics[key]):.4g}" for key in self.KEYS
                  if key in trainer.callback_metrics]
        print("  ".join(parts), file=sys.stdout, flush=True)


def last_loss(pl_module: L.LightningModule) -> float | None:
    """The training loss of the last update run (one host read), or None before the first."""
    rows = getattr(pl_module, "tracked_rows", None)
    return None if rows is None or len(rows) == 0 else float(rows[-1, 0])


def progress_callback(show: bool) -> Callback | None:
    """The bar in a terminal, lines otherwise; None when ``show`` is false (``trainer.enable_progress_bar``)."""
    if not show:
        return None
    return UpdateProgressBar() if sys.stdout.isatty() else ValidationLines()
