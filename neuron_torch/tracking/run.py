"""An MLflow run's life cycle: created, written through its background writer, always ended with a status."""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from neuron_torch.tracking.reachability import bound_http_retries
from neuron_torch.tracking.spool import HOST_TAG, PID_TAG, shown_path
from neuron_torch.tracking.store import open_experiment
from neuron_torch.tracking.writer import MetricWriter, Outcome

log = logging.getLogger("neuron_torch")

MAX_PARAM_LENGTH = 6000  # MLflow refuses a longer param value
DEFAULT_TRACKING_WAIT = 30.0  # seconds the end of a run waits for a tracking server that stopped answering


class TrackedRun:
    """One MLflow run, as a context manager that always ends it with the right status.

    On leaving: FINISHED; KILLED for Ctrl-C (Lightning turns it into ``SystemExit``); FAILED for any other
    exception, with its message in the ``error`` tag; FAILED too instead of FINISHED when the store refused a
    write or the writer itself failed (:attr:`write_error` then holds that error). Buffered metrics are written
    first on every path.
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
        self.write_error: Optional[BaseException] = None  # the first write the store refused, or the writer's fault
        self._staged = 0

    def __enter__(self) -> "TrackedRun":
        # a server that went away costs seconds per request, not MLflow's minutes: the spool takes over sooner
        bound_http_retries()
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

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.writer.log_metrics(metrics, step)

    def log_history(self, key: str, values: Sequence[float], first_step: int = 0) -> None:
        """One metric's values at consecutive steps from ``first_step``, sent in batches."""
        self.writer.log_history(key, values, first_step)

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._stage(artifact_file)
        path.write_text(text, encoding="utf-8", newline="")  # as given: an explicit "\r\n" stays, "\n" stays
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
        self.write_error = outcome.refusal or outcome.crash
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
