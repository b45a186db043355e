"""What a run sends to MLflow, as records that can wait on disk while the tracking server does not answer.

A record is a small dict: ``metrics`` (``[key, value, timestamp ms, step]`` rows), ``params``, ``tags``,
``artifact`` (a file and the folder it goes to), ``model`` (the files of
:func:`~neuron_torch.tracking.model_files.save_model_files`) or ``status`` (the run's end). :func:`deliver` sends one.
A :class:`Spool` keeps the records that could not be sent, in order, in ``checkpoints/<run id>/spool/``:

- ``run.json``: the store, run, host and process;
- ``journal.jsonl``: one record per line, files named relative to the spool;
- ``sent``: how many journal lines reached the store (a replay resumes after them);
- ``files/<line>/``: the artifacts and model files of those lines;
- ``lock``: held (``flock``) by the process that writes or replays the spool; released when it ends, even
  by SIGKILL.

Replaying a line twice (a replay stopped between sending it and counting it) is harmless: metric points
carry the timestamp they were computed at, and MLflow's store keeps one copy of identical points; params
and tags are set to the same values, artifacts overwrite themselves; only a model logged twice leaves a
second model entry (the run's ``model`` names the newest).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional

MAX_METRICS_PER_BATCH = 1000  # MLflow's limits per log_batch call
MAX_PARAMS_PER_BATCH = 100
HOST_TAG, PID_TAG = "neuron_torch.host", "neuron_torch.pid"  # the machine and process that run a run
KEPT_EXIT = 75  # exit code when records still wait in a spool (sysexits' EX_TEMPFAIL: try again later)


def deliver(client, run_id: str, record: dict, base: Path) -> None:
    """Send one record to the run; files are named relative to ``base`` (or absolute)."""
    from mlflow.entities import Metric, Param, RunTag

    kind = record["kind"]
    if kind == "metrics":
        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in record["metrics"]]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH], synchronous=True)
    elif kind == "params":
        params = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()], synchronous=True)
    elif kind == "artifact":
        client.log_artifact(run_id, str(base / record["path"]), record["artifact_path"])
    elif kind == "model":
        from neuron_torch.tracking.model_files import log_model_files  # MLflow's pyfunc: for a model record only

        log_model_files(client.tracking_uri, run_id, base / record["path"], record["register_as"])
    elif kind == "status":
        client.set_terminated(run_id, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown spool record {kind!r}")


def files_of(record: dict) -> Optional[str]:
    """The file or folder a record names, if any."""
    return record.get("path") if record["kind"] in ("artifact", "model") else None


class Tally:
    """What a set of records holds, for the lines that tell the user: values, artifacts, the model, status."""

    def __init__(self):
        self.values = self.artifacts = 0
        self.model = False
        self.status: Optional[str] = None

    def add(self, record: dict) -> None:
        kind = record["kind"]
        if kind in ("metrics", "params", "tags"):
            self.values += len(record[kind])
        elif kind == "artifact":
            self.artifacts += 1
        elif kind == "model":
            self.model = True
        elif kind == "status":
            self.status = record["status"]

    def __str__(self) -> str:
        parts = [f"{self.values:,} value{'' if self.values == 1 else 's'}"] + (["the model"] if self.model else [])
        if self.artifacts:
            parts.append(f"{self.artifacts} artifact{'s' if self.artifacts > 1 else ''}")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class SpoolBusy(Exception):
    """Another live process holds the spool (the run that writes it, or another sync)."""


class Spool:
    """The records of one run that wait for its tracking server, on disk, in order.

    Parameters
    ----------
    folder : Path
        ``checkpoints/<run id>/spool``.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock_file = None
        self._count: Optional[int] = None  # journal lines, read once, then kept up to date by append
        self._sent: Optional[int] = None  # lines sent, likewise (this process is the spool's only user: lock)

    @classmethod
    def create(cls, folder: Path, tracking_uri: str, run_id: str) -> "Spool":
        """A new spool for a run of this process, locked by it."""
        spool = cls(folder)
        spool.folder.mkdir(parents=True, exist_ok=True)
        spool.lock()
        meta = {"tracking_uri": tracking_uri, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}
        (spool.folder / "run.json").write_text(json.dumps(meta, indent=1))
        return spool

    @property
    def meta(self) -> dict:
        return json.loads((self.folder / "run.json").read_text())

    def lock(self) -> None:
        """Hold the spool for this process; :class:`SpoolBusy` when another live process holds it."""
        handle = open(self.folder / "lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpoolBusy(str(self.folder)) from None
        self._lock_file = handle

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def append(self, record: dict) -> None:
        """Add a record at the end; the file or folder it names is moved into the spool."""
        line = self._lines()
        self._count = line + 1
        source = files_of(record)
        if source is not None:
            target = self.folder / "files" / str(line)
            target.mkdir(parents=True, exist_ok=True)
            moved = shutil.move(str(source), str(target / Path(source).name))
            record = {**record, "path": str(Path(moved).relative_to(self.folder))}
        with open(self.folder / "journal.jsonl", "a") as journal:
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            os.fsync(journal.fileno())  # the record is on disk before the values leave memory

    def unsent(self) -> Iterator[tuple[int, dict]]:
        """``(line, record)`` for every record not yet sent, in order."""
        done = self.sent_count()
        for line, record in enumerate(self._records()):
            if line >= done:
                yield line, record

    def unsent_batches(self) -> Iterator[tuple[int, dict]]:
        """:meth:`unsent`, with runs of consecutive metrics records joined into batches of up to
        :data:`MAX_METRICS_PER_BATCH` values (one request each instead of one per record); the line is the last
        one a batch holds, for :meth:`mark_sent`."""
        batch: Optional[tuple[int, dict]] = None
        for line, record in self.unsent():
            if record["kind"] == "metrics" and batch is not None \
                    and len(batch[1]["metrics"]) + len(record["metrics"]) <= MAX_METRICS_PER_BATCH:
                batch = (line, {"kind": "metrics", "metrics": batch[1]["metrics"] + record["metrics"]})
                continue
            if batch is not None:
                yield batch
                batch = None
            if record["kind"] == "metrics":
                batch = (line, record)
            else:
                yield line, record
        if batch is not None:
            yield batch

    def mark_sent(self, line: int) -> None:
        """Record that journal lines up to ``line`` reached the store (atomically: a rename)."""
        tmp = self.folder / "sent.tmp"
        tmp.write_text(str(line + 1))
        os.replace(tmp, self.folder / "sent")
        files = self.folder / "files" / str(line)
        if files.exists():  # delivered: the copy here is not needed any more
            shutil.rmtree(files, ignore_errors=True)
        self._sent = line + 1

    def sent_count(self) -> int:
        if self._sent is None:
            path = self.folder / "sent"
            self._sent = int(path.read_text()) if path.exists() else 0
        return self._sent

    def tally(self) -> Tally:
        """What the unsent records hold."""
        tally = Tally()
        for _, record in self.unsent():
            tally.add(record)
        return tally

    def has_unsent(self) -> bool:
        return self.sent_count() < self._lines()

    def remove(self) -> None:
        """Delete the spool (everything in it was sent), and the run's folder if nothing else is in it."""
        self.unlock()
        shutil.rmtree(self.folder, ignore_errors=True)
        with_run = self.folder.parent
        if with_run.is_dir() and not any(with_run.iterdir()):
            with_run.rmdir()
            if with_run.parent.name == "checkpoints" and not any(with_run.parent.iterdir()):
                with_run.parent.rmdir()

    def _records(self) -> Iterator[dict]:
        path = self.folder / "journal.jsonl"
        if not path.exists():
            return
        with open(path) as journal:
            for text in journal:
                if text.endswith("\n"):  # a line cut short by a crash mid-write was never counted as kept
                    yield json.loads(text)

    def _lines(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._records())
        return self._count


def shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (as the user would type it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def find(paths: list[Path]) -> list[Spool]:
    """Every spool at or under ``paths`` (a spool folder, a run's checkpoint folder, or any folder)."""
    found: dict[Path, Spool] = {}
    for path in paths:
        path = Path(path)
        candidates = [path] if (path / "run.json").is_file() else [p.parent for p in path.rglob("spool/run.json")]
        for folder in candidates:
            found.setdefault(folder.resolve(), Spool(folder))
    return sorted(found.values(), key=lambda s: s.folder)
