"""MLflow tracking: the run's life cycle and the callback that streams each update's values to it.

Per-update values stay on the device in a buffer of ``chunk`` rows; a full buffer is copied to the host in
one transfer and handed to the background :class:`~neuron_torch.tracking.writer.MetricWriter`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning as L
import numpy as np
import torch

from neuron_torch.tracking.spool import HOST_TAG, KEPT_EXIT, PID_TAG  # noqa: F401  (KEPT_EXIT: training's exit code)
from neuron_torch.tracking.writer import MetricWriter, Outcome, metric_keys, shown_path

if TYPE_CHECKING:
    import pandas

log = logging.getLogger("neuron_torch")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default; `mlflow ui` reads it with no flags
# Default points per per-update metric in MLflow. Each value costs the store about 0.1 ms of Python (SQLAlchemy),
# so values must not grow with the number of updates; the UI's charts sample a few hundred points anyway, and
# the trajectory artifact has every update.
METRIC_POINTS = 100
MAX_PARAM_LENGTH = 6000
DEFAULT_TRACKING_WAIT = 30.0  # seconds the end of a run waits for a tracking server that stopped answering


def resolve_tracking_uri(configured: Optional[str]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the configured URI, else MLflow's default sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI


class TrackedRun:
    """One MLflow run, as a context manager that always ends it with the right status.

    On leaving: FINISHED; KILLED for Ctrl-C (Lightning turns it into ``SystemExit``); FAILED for any other
    exception, with its message in the ``error`` tag. Buffered metrics are written first on every path.
    Everything is sent by the run's :class:`~neuron_torch.tracking.writer.MetricWriter`; what a silent tracking server
    does not take waits in ``checkpoints/<run id>/spool`` (then :attr:`kept` says what, and
    ``neuron-torch sync`` sends it). The run is tagged with the host and process that run it.

    Parameters
    ----------
    tracking_uri : str
    experiment : str
        Experiment name; created when missing.
    run_name : str, optional
    tags : dict, optional
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: Optional[str] = None,
                 tags: Optional[dict[str, str]] = None):
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        # who runs it: `neuron-torch sync` marks a RUNNING run KILLED once its process is gone from this host
        self.tags = {**(tags or {}), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        self.status: Optional[str] = None
        self.kept: Optional[Outcome] = None  # set when the run ends with records its server did not take
        self._staged = 0

    def __enter__(self) -> "TrackedRun":
        from neuron_torch.tracking.store import open_experiment

        # under a lock next to a sqlite store: runs started together would race to create it and the experiment
        self.client, experiment_id = open_experiment(self.tracking_uri, self.experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id, self.experiment_id = run.info.run_id, experiment_id
        self.run_name = run.info.run_name
        self._folder = tempfile.TemporaryDirectory(prefix="neuron_torch-")
        self.folder = Path(self._folder.name)
        self.writer = MetricWriter(self.client, self.run_id, self.folder)
        return self

    # Everything below goes through the run's writer, in order, off the training thread; files are staged in the
    # run's temporary folder first, so that they can wait in the spool while the server does not answer.

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.log_params({k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()})

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._stage(artifact_file)
        path.write_text(text, encoding="utf-8")
        self.writer.log_artifact(path, _folder_of(artifact_file))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        staged = self._stage(Path(path).name)
        shutil.copyfile(path, staged)
        self.writer.log_artifact(staged, artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        path = self._stage(artifact_file)
        figure.savefig(path)  # what MlflowClient.log_figure does with a matplotlib figure
        self.writer.log_artifact(path, _folder_of(artifact_file))

    def log_model_files(self, folder: Path, register_as: Optional[str] = None) -> None:
        """Log a folder written by :func:`~neuron_torch.tracking.model_files.save_model_files` as the model ``model``."""
        self.writer.log_model_files(folder, register_as)

    def set_tag(self, key: str, value: str) -> None:
        self.writer.set_tags({key: str(value)})

    def staging_folder(self, name: str) -> Path:
        """A new empty folder in the run's temporary folder, for files to log."""
        self._staged += 1
        folder = self.folder / "staged" / str(self._staged) / name
        folder.mkdir(parents=True)
        return folder

    def _stage(self, artifact_file: str) -> Path:
        return self.staging_folder("file") / posixpath.basename(artifact_file)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"
        else:
            status = "FAILED"
        error = f"{type(exc).__name__}: {exc}" if status == "FAILED" and exc is not None else None
        # Ctrl-C means now: a silent server is not waited for, what it did not get stays in the spool
        outcome = self.writer.finish(status, error, wait=0.0 if status == "KILLED" else tracking_wait())
        if outcome.crash is not None:  # the writer failed: end the run directly, as far as the store lets us
            with contextlib.suppress(Exception):
                self.client.set_tag(self.run_id, "error", f"{type(outcome.crash).__name__}: {outcome.crash}"[:5000])
                self.client.set_terminated(self.run_id, "FAILED")
        self.status = outcome.status
        if outcome.kept is not None:
            self.kept = outcome
            where = shown_path(outcome.spool)
            command = "neuron-torch sync" + ("" if where.startswith("checkpoints/") else f" {where}")  # its default
            log.warning("tracking server %s unreachable: %s kept in %s; send them with: %s",
                        self.tracking_uri, outcome.kept, where, command)
        self._folder.cleanup()
        return False


def tracking_wait() -> float:
    """Seconds a run's end waits for a silent tracking server: ``NEURON_TORCH_TRACKING_WAIT``, default 30."""
    try:
        return max(0.0, float(os.environ.get("NEURON_TORCH_TRACKING_WAIT", DEFAULT_TRACKING_WAIT)))
    except ValueError:
        return DEFAULT_TRACKING_WAIT


def _folder_of(artifact_file: str) -> Optional[str]:
    folder = posixpath.dirname(posixpath.normpath(artifact_file))
    return folder or None


class MLflowTracking(L.Callback):
    """Streams each update's tracked values, and the validation and test metrics, into a :class:`TrackedRun`.

    Parameters
    ----------
    run : TrackedRun
    log_every_n_steps : int, optional
        Cadence of the per-update MLflow metrics; default: about :data:`METRIC_POINTS` points per metric over
        ``trainer.max_steps``. The trajectory artifact keeps every update either way.
    max_weight_metrics : int
        How many ``w/<feature>`` get their own MLflow metric (the first ones, in column order).
    chunk : int
        Rows buffered on the device before one transfer to the host.
    flush_seconds : float
        Also hand the buffer over when this long has passed, so the MLflow UI follows a long run live.
    """

    def __init__(self, run: TrackedRun, log_every_n_steps: Optional[int] = None, max_weight_metrics: int = 100,
                 chunk: int = 4096, flush_seconds: float = 2.0):
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"mlflow.log_every_n_steps must be >= 1, got {log_every_n_steps}")
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
            self._first_step = getattr(pl_module, "tracked_start", trainer.global_step - len(rows))
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


@contextlib.contextmanager
def fluent_tracking_uri(uri: str):
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``, ``load_model``) at ``uri`` for a while.

    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` for the whole process, and MLflow's
    module-level URI outranks that variable; both are put back exactly as they were, so a later run in the
    same process still follows its own configuration.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils  # holds the module-level URI; no public getter

    previous_env, previous_global = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = previous_global
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
