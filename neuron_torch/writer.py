"""The background writer: per-update metrics and trajectory rows sent to one MLflow run off the training thread.

A full device buffer reaches this thread as one host array; the thread appends it to the full-resolution
trajectory (Parquet) and sends the metrics to MLflow in batches of up to :data:`MAX_METRICS_PER_BATCH` values.
Training never waits on the store.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call


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
