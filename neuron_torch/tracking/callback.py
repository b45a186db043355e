"""The Lightning callback that streams each update's tracked values, and the validation and test metrics,
into a :class:`~neuron_torch.tracking.run.TrackedRun`.

Per-update values stay on the device in a buffer of ``chunk`` rows; a full buffer is copied to the host in
one transfer and handed to the run's background :class:`~neuron_torch.tracking.writer.MetricWriter`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Optional

import lightning as L
import numpy as np
import torch

from neuron_torch.tracking.writer import metric_keys

if TYPE_CHECKING:
    import pandas

    from neuron_torch.tracking.run import TrackedRun

# Default points per per-update metric in MLflow. The store spends Python time on every value, so their number
# must not grow with the number of updates; the UI's charts sample a few hundred points anyway, and the
# trajectory artifact has every update.
METRIC_POINTS = 100


class MLflowTracking(L.Callback):
    """Streams each update's tracked values, and the validation and test metrics, into a :class:`TrackedRun`.

    The LightningModule it follows names its tracked columns (``tracked_names()``) and, after each training
    step, holds that step's rows (``tracked_rows``, (updates of the step, columns), on its device) and the step
    of their first row (``tracked_start``).

    Parameters
    ----------
    run : TrackedRun
    log_every_n_steps : int, optional
        Cadence of the per-update MLflow metrics, >= 1 (the config's ``mlflow.log_every_n_steps``, checked with
        the config); default: about :data:`METRIC_POINTS` points per metric over ``trainer.max_steps``. The
        trajectory artifact keeps every update either way.
    max_weight_metrics : int
        How many ``w/<feature>`` get their own MLflow metric (the first ones, in column order).
    chunk : int
        Rows buffered on the device before one transfer to the host.
    flush_seconds : float
        Also hand the buffer over when this long has passed, so the MLflow UI follows a long run live.
    """

    def __init__(self, run: TrackedRun, log_every_n_steps: Optional[int] = None, max_weight_metrics: int = 100,
                 chunk: int = 4096, flush_seconds: float = 2.0):
        self.run, self.every, self.max_weights = run, log_every_n_steps, max_weight_metrics
        self.chunk, self.flush_seconds = chunk, flush_seconds
        self._buffer: Optional[torch.Tensor] = None
        self._count = 0
        self._first_step = 0
        self._last_flush = time.monotonic()
        self._history: list[tuple[np.ndarray, np.ndarray]] = []  # rows at the logging cadence, for figures
        self.validation: list[dict] = []  # {"step": ..., "val/loss": ..., ...} at each validation
        self.names: list[str] = []
        self._metric_columns: list[int] = []
        self._last: Optional[tuple[int, np.ndarray]] = None  # (step, row) of the last row handed over

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = self.names = pl_module.tracked_names()
        weights = [j for j, name in enumerate(names) if name.startswith("w/")]
        metric_columns = [j for j in range(len(names)) if j not in weights[self.max_weights:]]
        if self.every is None:
            self.every = max(1, math.ceil(trainer.max_steps / METRIC_POINTS))
        self._metric_columns = metric_columns
        self.run.writer.set_columns(names, metric_columns, self.every)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        rows = pl_module.tracked_rows  # (updates of this step, columns)
        if self._buffer is None or len(rows) > len(self._buffer):  # the last step may bring one row more
            self._flush()
            self._buffer = rows.new_empty((max(self.chunk, len(rows)), rows.shape[1]))
        if self._count + len(rows) > len(self._buffer):
            self._flush()
        if self._count == 0:  # the step of the buffer's first row: the state the step's first update started from
            self._first_step = pl_module.tracked_start
        self._buffer[self._count:self._count + len(rows)] = rows
        self._count += len(rows)
        if self._count == len(self._buffer) or time.monotonic() - self._last_flush > self.flush_seconds:
            self._flush()

    def _flush(self) -> None:
        if self._count == 0:
            return
        # one transfer for many steps; a copy even when the buffer is already float64 on the CPU, since the
        # writer thread reads these rows while the buffer is refilled
        rows = self._buffer[:self._count].to("cpu", torch.float64, copy=True).numpy()
        steps = np.arange(self._first_step, self._first_step + self._count)
        self.run.writer.log_rows(steps, rows)
        keep = steps % self.every == 0
        self._history.append((steps[keep], rows[keep]))
        self._last = (int(steps[-1]), rows[-1])
        self._count = 0
        self._last_flush = time.monotonic()

    def _log_prefixed(self, trainer: L.Trainer, prefix: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        if metrics:
            self.run.writer.log_metrics(metrics, trainer.global_step)
        if prefix == "val/":
            self.validation.append({"step": trainer.global_step, **metrics})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_prefixed(trainer, "val/")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_prefixed(trainer, "test/")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()
        self._log_last_row()

    def _log_last_row(self) -> None:
        """The last row goes to MLflow whatever the cadence: the metrics end where training ended."""
        if self._last is None or self._last[0] % self.every == 0:
            return
        step, row = self._last
        keys = metric_keys(self.names)
        self.run.writer.log_metrics({keys[j]: float(row[j]) for j in self._metric_columns}, step)
        self._history.append((np.array([step]), row[None, :]))

    def history(self) -> "pandas.DataFrame":
        """The tracked values at the logging cadence: ``step`` and one column per name."""
        import pandas as pd

        if not self._history:
            return pd.DataFrame(columns=["step", *self.names])
        steps = np.concatenate([s for s, _ in self._history])
        rows = np.concatenate([r for _, r in self._history])
        return pd.DataFrame({"step": steps, **{name: rows[:, j] for j, name in enumerate(self.names)}})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._flush()  # nothing buffered is lost, whatever ended the run
