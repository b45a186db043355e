"""MLflow tracking: the run's life cycle, metrics written in large batches off the training thread, artifacts.

Per-update values stay on the device in a buffer of ``chunk`` rows; a full buffer is copied to the host in
one transfer and handed to a writer thread, which appends it to the full-resolution trajectory (Parquet)
and sends the metrics to MLflow in batches of up to 1,000 values. Training never waits on the store.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning as L
import numpy as np
import torch

if TYPE_CHECKING:
    import pandas

log = logging.getLogger("neuron_torch")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default; `mlflow ui` reads it with no flags
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
# Default points per per-update metric in MLflow. Each value costs the store about 0.1 ms of Python (SQLAlchemy),
# so values must not grow with the number of updates; the UI's charts sample a few hundred points anyway, and
# the trajectory artifact has every update.
METRIC_POINTS = 100
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(configured: Optional[str]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the configured URI, else MLflow's default sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI


class MetricWriter:
    """Sends metrics and trajectory rows to one MLflow run from a background thread.

    Parameters
    ----------
    client : mlflow.MlflowClient
    run_id : str
    folder : Path
        Where the trajectory Parquet file is written before it is uploaded.
    """

    def __init__(self, client, run_id: str, folder: Path):
        self.client, self.run_id, self.folder = client, run_id, folder
        self._queue: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._trajectory = None  # pyarrow.parquet.ParquetWriter, opened with the first rows
        self._columns: list[str] = []
        self._metric_columns: list[int] = []
        self._every = 1
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    # --- called from the training thread ------------------------------------------------------------------

    def set_columns(self, names: list[str], metric_columns: list[int], every: int) -> None:
        """Name the trajectory's columns; ``metric_columns`` of them also go to MLflow every ``every`` steps."""
        self._queue.put(("columns", (names, metric_columns, every)))

    def log_rows(self, steps: np.ndarray, rows: np.ndarray) -> None:
        """Queue trajectory rows: ``steps`` (k,) and ``rows`` (k, len(names))."""
        self._queue.put(("rows", (steps, rows)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._queue.put(("metrics", (metrics, step)))

    def close(self) -> Optional[Path]:
        """Write everything queued, wait for it, and return the trajectory file (None if no rows came)."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.folder / "trajectory.parquet" if self._trajectory is not None else None

    # --- the writer thread -------------------------------------------------------------------------------------

    def _work(self) -> None:
        from mlflow.entities import Metric

        pending: list = []
        item: object = ()
        try:
            while True:
                item = self._queue.get()
                if item is None:  # closing: send what is still pending, then stop
                    for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
                        self.client.log_batch(self.run_id, metrics=pending[i:i + MAX_METRICS_PER_BATCH],
                                              synchronous=True)
                    break
                kind, payload = item
                now = int(time.time() * 1000)
                if kind == "columns":
                    self._columns, self._metric_columns, self._every = payload
                elif kind == "metrics":
                    values, step = payload
                    pending += [Metric(k, float(v), now, step) for k, v in values.items()]
                else:
                    steps, rows = payload
                    self._append_trajectory(steps, rows)
                    keep = steps % self._every == 0
                    for step, row in zip(steps[keep].tolist(), rows[keep][:, self._metric_columns].tolist()):
                        pending += [Metric(self._columns[j], v, now, step)
                                    for j, v in zip(self._metric_columns, row)]
                # send whole batches while more is queued; everything once the queue is idle
                while len(pending) >= MAX_METRICS_PER_BATCH or (pending and self._queue.empty()):
                    batch, pending = pending[:MAX_METRICS_PER_BATCH], pending[MAX_METRICS_PER_BATCH:]
                    self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except BaseException as err:  # kept and raised in close(), on the training thread
            self._error = err
            while item is not None:  # drain up to the closing marker, so close() never blocks
                item = self._queue.get()
        finally:
            if self._trajectory is not None:
                self._trajectory.close()

    def _append_trajectory(self, steps: np.ndarray, rows: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"step": pa.array(steps)}
        columns.update({name: pa.array(rows[:, j]) for j, name in enumerate(self._columns)})
        table = pa.table(columns)
        if self._trajectory is None:
            self._trajectory = pq.ParquetWriter(self.folder / "trajectory.parquet", table.schema)
        self._trajectory.write_table(table)


class TrackedRun:
    """One MLflow run, as a context manager that always ends it with the right status.

    On leaving: FINISHED; KILLED for Ctrl-C (Lightning turns it into ``SystemExit``); FAILED for any other
    exception, with its message in the ``error`` tag. Buffered metrics are written first on every path.

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
        self.tags = dict(tags or {})
        self.status: Optional[str] = None

    def __enter__(self) -> "TrackedRun":
        from mlflow import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id, self.experiment_id = run.info.run_id, experiment_id
        self.run_name = run.info.run_name
        self._folder = tempfile.TemporaryDirectory(prefix="neuron_torch-")
        self.folder = Path(self._folder.name)
        self.writer = MetricWriter(self.client, self.run_id, self.folder)
        return self

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"
        else:
            status = "FAILED"
        try:
            trajectory = self.writer.close()
            if trajectory is not None:
                self.log_artifact(trajectory)
        except Exception as err:  # the store failed while writing: the run cannot be called finished
            log.error("writing to MLflow failed: %s", err)
            status, exc = "FAILED", exc or err
        if status == "FAILED" and exc is not None:
            self.set_tag("error", f"{type(exc).__name__}: {exc}".splitlines()[0][:5000])
        self.client.set_terminated(self.run_id, status)
        self.status = status
        self._folder.cleanup()
        return False


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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = self.names = pl_module.tracked_names()
        weights = [j for j, name in enumerate(names) if name.startswith("w/")]
        metric_columns = [j for j in range(len(names)) if j not in weights[self.max_weights:]]
        if self.every is None:
            self.every = max(1, math.ceil(trainer.max_steps / METRIC_POINTS))
        self.run.writer.set_columns(names, metric_columns, self.every)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        rows = pl_module.tracked_rows  # (updates of this step, columns)
        if self._buffer is None:  # every step brings the same number of rows, the last one maybe fewer
            self._buffer = rows.new_empty((max(self.chunk, len(rows)), rows.shape[1]))
        if self._count + len(rows) > len(self._buffer):
            self._flush()
        if self._count == 0:
            self._first_step = trainer.global_step - len(rows)  # the step the first update started from
        self._buffer[self._count:self._count + len(rows)] = rows
        self._count += len(rows)
        if self._count == len(self._buffer) or time.monotonic() - self._last_flush > self.flush_seconds:
            self._flush()

    def _flush(self) -> None:
        if self._count == 0:
            return
        rows = self._buffer[:self._count].to("cpu", torch.float64).numpy()  # one transfer for many steps
        steps = np.arange(self._first_step, self._first_step + self._count)
        self.run.writer.log_rows(steps, rows)
        keep = steps % self.every == 0
        self._history.append((steps[keep], rows[keep]))
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


def weight_table(module) -> "pandas.DataFrame":
    """The trained parameters as a table: ``feature, weight, bias`` for the single neuron; one row per entry
    (``parameter, row, column, value``) for deeper networks."""
    import pandas as pd

    from neuron_torch.networks import SingleNeuron

    net = module.net
    if isinstance(net, SingleNeuron):
        w = net.linear.weight.detach().double().cpu().numpy()[0]
        b = float(net.linear.bias.detach().double().cpu())
        return pd.DataFrame({"feature": module.feature_names, "weight": w, "bias": b})
    rows = []
    for name, p in net.named_parameters():
        values = p.detach().double().cpu().numpy().reshape(p.shape[0], -1)
        rows += [(name, i, j, v) for (i, j), v in np.ndenumerate(values)]
    return pd.DataFrame(rows, columns=["parameter", "row", "column", "value"])


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


def log_model(run: TrackedRun, module, X_example: np.ndarray, classes: tuple[str, str], config_yaml: str,
              register_as: Optional[str] = None) -> None:
    """Log the trained network to ``run`` as a pyfunc model under ``model``, from code, with no pickle.

    Parameters
    ----------
    run : TrackedRun
    module : NeuronModule
        The trained module: weights, standardisation statistics, feature names and hyperparameters.
    X_example : ndarray, shape (k, n)
        A few raw rows, for the input example and the signature.
    classes : tuple of str
        The label values mapped to 0 and to 1.
    config_yaml : str
        The resolved config, kept with the model as ``config.yaml``.
    register_as : str, optional
        Register the model under this name in the Model Registry.
    """
    import json

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    import neuron_torch
    from neuron_torch import pyfunc_model

    hp = module.hparams
    folder = run.folder / "model-files"
    folder.mkdir(exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in module.net.state_dict().items()}, folder / "weights.pt")
    meta = {"feature_names": module.feature_names, "classes": list(classes),
            "feature_mean": module.feature_mean.double().cpu().tolist(),
            "feature_std": module.feature_std.double().cpu().tolist(),
            "hidden_sizes": list(hp.hidden_sizes), "activation": hp.activation}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    (folder / "config.yaml").write_text(config_yaml)
    example = pd.DataFrame(X_example, columns=module.feature_names)
    with torch.no_grad():
        X = (torch.from_numpy(X_example).to(module.feature_mean) - module.feature_mean) / module.feature_std
        probability = module.net(X.to(next(module.net.parameters()).dtype))[:, 0].double().cpu().numpy()
    with fluent_tracking_uri(run.tracking_uri), mlflow.start_run(run_id=run.run_id):
        # start_run resumes our run; TrackedRun sets its final status again when it ends
        mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.__file__,
            artifacts={"weights": str(folder / "weights.pt"), "meta": str(folder / "meta.json"),
                       "config": str(folder / "config.yaml")},
            registered_model_name=register_as,
            code_paths=[str(Path(neuron_torch.__file__).parent)],
            signature=infer_signature(example, probability),
            input_example=example,
            pip_requirements=["torch", "pandas", "numpy", "mlflow"],
        )


def log_figures(run: TrackedRun, tracker: MLflowTracking, module, datamodule) -> None:
    """Loss curves, w/b trajectories, ROC and confusion matrix of the test split, and the decision boundary
    for two-feature data, as PNG artifacts under ``plots/``."""
    import pandas as pd

    from neuron_torch import plots

    history = tracker.history()
    if len(history):
        run.log_figure(plots.loss_curves(history, pd.DataFrame(tracker.validation)), "plots/loss_curves.png")
        run.log_figure(plots.trajectories(history), "plots/trajectories.png")
    X_raw, y = datamodule.raw_split("test")
    probability = module.predict_proba(torch.from_numpy(X_raw))[:, 0].double().cpu().numpy()
    if len(np.unique(y)) == 2:  # a ROC curve needs both labels among the test rows
        run.log_figure(plots.roc_curve(y, probability), "plots/roc.png")
    run.log_figure(plots.confusion_matrix(y, probability, datamodule.classes), "plots/confusion_matrix.png")
    if len(module.feature_names) == 2:
        run.log_figure(plots.decision_boundary(module, *datamodule.raw_split("train"), module.feature_names),
                       "plots/decision_boundary.png")
