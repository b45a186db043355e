"""The background writer: everything a run sends to MLflow, sent off the training thread, in order.

Per-update rows reach this thread as host arrays; the thread appends them to the full-resolution trajectory
(Parquet) and sends the metrics in batches of up to 1,000 values. Params, tags, artifacts, the model and the
final status take the same queue, so they reach the store in the order they were logged. Training never
waits on the store.

When the tracking server stops answering, what it should get goes to the run's
:class:`~neuron_torch.tracking.spool.Spool` instead (one warning line), and the thread keeps trying in the
background; when the server answers again the spool is sent, in order, and removed (one more line).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from neuron_torch.tracking.reachability import is_unreachable, reason, why_silent
from neuron_torch.tracking.spool import MAX_METRICS_PER_BATCH, Spool, Tally, deliver, shown_path

log = logging.getLogger("neuron_torch")

RETRY_SECONDS = 2.0  # how often a silent server is asked again (one cheap request, short timeout)
PROBE_SECONDS = 2.0  # how long that request waits for an answer


def metric_keys(names: list[str]) -> list[str]:
    """MLflow metric keys for tracked column names: characters MLflow refuses in a key (anything but letters,
    digits, ``_ - . : /`` and space, as in ``w/setosa/sepal length (cm)``) become ``_``, as do path parts it
    refuses (empty, ``.``, ``..``); a key that two names would share gets ``_2``, ``_3``. The trajectory keeps
    the names as they are."""
    keys, seen = [], set()
    for name in names:
        parts = re.sub(r"[^/\w.\- :]", "_", name).split("/")
        key = "/".join(part if part.strip(".") else part.replace(".", "_") or "_" for part in parts)
        unique, i = key, 1
        while unique in seen:
            i += 1
            unique = f"{key}_{i}"
        seen.add(unique)
        keys.append(unique)
    return keys


@dataclass
class Outcome:
    """How a run's records ended: its status, and what is still kept in its spool (None when all was sent)."""

    status: str
    kept: Optional[Tally] = None
    spool: Optional[Path] = None
    crash: Optional[BaseException] = None  # the writer itself failed: nothing more was sent
    refusal: Optional[BaseException] = None  # the first write the store answered and refused (FINISHED: FAILED)


class MetricWriter:
    """Sends a run's metrics, trajectory, params, tags, artifacts, model and status from a background thread.

    Parameters
    ----------
    client : mlflow.MlflowClient
    run_id : str
    folder : Path
        Where the trajectory Parquet file is written before it is uploaded.
    spool_folder : Path, optional
        Where records wait while the server does not answer; default ``checkpoints/<run id>/spool`` under
        the working folder, next to the run's checkpoints.
    """

    def __init__(self, client, run_id: str, folder: Path, spool_folder: Optional[Path] = None):
        self.client, self.run_id, self.folder = client, run_id, Path(folder)
        self.tracking_uri: str = client.tracking_uri
        self.spool_folder = Path(spool_folder) if spool_folder else Path("checkpoints").resolve() / run_id / "spool"
        self._spool: Optional[Spool] = None  # created with the first record the server does not take
        self._next_try = 0.0
        self._refusal: Optional[BaseException] = None  # the first request the server answered and refused
        self._crash: Optional[BaseException] = None
        self.outcome: Optional[Outcome] = None
        self._queue: queue.Queue = queue.Queue()
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
        self._queue.put(("metrics", [(key, value, step) for key, value in metrics.items()]))

    def log_history(self, key: str, values, first_step: int = 0) -> None:
        """Queue one metric's values (a sequence of floats) at steps ``first_step``, ``first_step + 1``, ..."""
        self._queue.put(("metrics", [(key, value, first_step + i) for i, value in enumerate(values)]))

    def log_params(self, params: dict[str, str]) -> None:
        self._queue.put(("record", {"kind": "params", "params": dict(params)}))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.put(("record", {"kind": "tags", "tags": dict(tags)}))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Queue a file for the run's artifacts; the writer owns it from here (it may move it)."""
        self._queue.put(("record", {"kind": "artifact", "path": str(Path(path).resolve()),
                                    "artifact_path": artifact_path}))

    def log_model_files(self, folder: Path, register_as: Optional[str] = None) -> None:
        """Queue the files of :func:`~neuron_torch.tracking.model_files.save_model_files`, logged as the model ``model``."""
        self._queue.put(("record", {"kind": "model", "path": str(Path(folder).resolve()),
                                    "register_as": register_as}))

    def finish(self, status: str, error: Optional[str] = None, wait: float = 0.0) -> Outcome:
        """Send everything queued, then the trajectory, the ``error`` tag and ``status``; wait up to ``wait``
        seconds for a silent server; return what was kept in the spool. The run's status is FAILED instead of
        FINISHED when the server refused a request."""
        self._queue.put(("finish", (status, error, wait)))
        self._thread.join()
        if self.outcome is None:  # the thread itself failed: nothing after the failure was sent
            self.outcome = Outcome("FAILED", crash=self._crash)
        return self.outcome

    # --- the writer thread -------------------------------------------------------------------------------------

    def _work(self) -> None:
        from mlflow.entities import Metric

        pending: list = []
        item: object = ()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=RETRY_SECONDS if self._silent() else None)
                except queue.Empty:
                    self._resend()
                    continue
                kind, payload = item
                now = int(time.time() * 1000)
                if kind == "finish":
                    self._finish(pending, *payload)
                    break
                if kind == "columns":
                    self._columns, self._metric_columns, self._every = payload
                    self._metric_keys = metric_keys(self._columns)
                elif kind == "record":
                    self._send_metrics(pending)  # what came before it, first
                    pending = []
                    self._send(payload)
                elif kind == "metrics":
                    pending += [Metric(key, float(value), now, step) for key, value, step in payload]
                else:
                    steps, rows = payload
                    self._append_trajectory(steps, rows)
                    keep = steps % self._every == 0
                    for step, row in zip(steps[keep].tolist(), rows[keep][:, self._metric_columns].tolist()):
                        pending += [Metric(self._metric_keys[j], v, now, step)
                                    for j, v in zip(self._metric_columns, row)]
                # send whole batches while more is queued; everything once the queue is idle
                while len(pending) >= MAX_METRICS_PER_BATCH or (pending and self._queue.empty()):
                    batch, pending = pending[:MAX_METRICS_PER_BATCH], pending[MAX_METRICS_PER_BATCH:]
                    self._send_metrics(batch)
                if self._silent():
                    self._resend()
        except BaseException as err:  # a fault of the writer itself: finish() reports it
            self._crash = err
            log.error("the MLflow writer stopped: %s: %s", type(err).__name__, err)
            while not (isinstance(item, tuple) and item and item[0] == "finish"):  # so finish() never blocks
                item = self._queue.get()
        finally:
            if self._trajectory is not None:
                self._trajectory.close()
                self._trajectory = None

    def _finish(self, pending: list, status: str, error: Optional[str], wait: float) -> None:
        self._send_metrics(pending)
        if self._trajectory is not None:
            self._trajectory.close()
            self._trajectory = None
            self._send({"kind": "artifact", "path": str(self.folder / "trajectory.parquet"), "artifact_path": None})
        if self._refusal is not None and status == "FINISHED":  # the store did not take everything
            status = "FAILED"
            error = error or f"{type(self._refusal).__name__}: {self._refusal}"
        if status == "FAILED" and error:
            self._send({"kind": "tags", "tags": {"error": error.splitlines()[0][:5000]}})
        self._send({"kind": "status", "status": status, "end_time": int(time.time() * 1000)})
        if self._silent() and wait > 0:
            log.warning("tracking server %s still does not answer; waiting up to %g s (NEURON_TORCH_TRACKING_WAIT) "
                        "before leaving the rest in %s", self.tracking_uri, wait, shown_path(self.spool_folder))
            deadline = time.monotonic() + wait
            while self._silent() and time.monotonic() < deadline:
                time.sleep(max(0.0, min(self._next_try, deadline) - time.monotonic()))
                self._resend()
        if self._silent():
            kept = self._spool.tally()
            self._spool.unlock()  # `neuron-torch sync` may take it from here, even while this process lives on
            self.outcome = Outcome(status, kept, self._spool.folder, refusal=self._refusal)
        else:
            self.outcome = Outcome(status, refusal=self._refusal)

    def _send_metrics(self, metrics: list) -> None:
        if metrics:
            self._send({"kind": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics]})

    def _send(self, record: dict) -> None:
        """Deliver one record, or keep it in the spool while the server is silent (order is kept)."""
        if self._silent():
            self._spool.append(record)
            return
        try:
            deliver(self.client, self.run_id, record, self.folder)
        except Exception as err:
            if not is_unreachable(err):
                self._refused(err)
                return
            if self._spool is None:
                self._spool = Spool.create(self.spool_folder, self.tracking_uri, self.run_id)
            self._spool.append(record)
            self._next_try = time.monotonic() + RETRY_SECONDS
            log.warning("tracking server %s stopped answering (%s); keeping what it should get in %s and asking "
                        "again every %g s", self.tracking_uri, reason(err), shown_path(self.spool_folder), RETRY_SECONDS)

    def _resend(self) -> None:
        """Ask a silent server again (at most every RETRY_SECONDS); when it answers, send the spool in order."""
        if time.monotonic() < self._next_try:
            return
        silent = why_silent(self.tracking_uri, PROBE_SECONDS)
        # counted from the answer: a hung server takes the whole PROBE_SECONDS, and records keep flowing between
        self._next_try = time.monotonic() + RETRY_SECONDS
        if silent is not None:
            return
        sent = Tally()
        for line, record in self._spool.unsent_batches():
            try:
                deliver(self.client, self.run_id, record, self._spool.folder)
            except Exception as err:
                if is_unreachable(err):
                    return  # silent again: the rest stays, and is asked for again later
                self._refused(err)
            self._spool.mark_sent(line)
            sent.add(record)
        log.warning("tracking server %s answers again; sent the %s kept meanwhile", self.tracking_uri, sent)
        self._spool.remove()
        self._spool = None

    def _silent(self) -> bool:
        return self._spool is not None and self._spool.has_unsent()

    def _refused(self, err: BaseException) -> None:
        """The server answered and refused a request: reported once; the run ends FAILED."""
        if self._refusal is None:
            log.error("writing to MLflow failed: %s", err)
            self._refusal = err

    def _append_trajectory(self, steps: np.ndarray, rows: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"step": pa.array(steps)}
        columns.update({name: pa.array(rows[:, j]) for j, name in enumerate(self._columns)})
        table = pa.table(columns)
        if self._trajectory is None:
            self._trajectory = pq.ParquetWriter(self.folder / "trajectory.parquet", table.schema)
        self._trajectory.write_table(table)
