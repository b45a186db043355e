"""Eight ``python train.py`` started at once in one folder all finish, with every value, in one sqlite store.

Without a lock MLflow's schema creation races on a fresh store (``table ... already exists``) and two runs
create the same new experiment (``UNIQUE constraint failed``). Each case starts eight real processes together
(each with a timeout) and counts what reached the store: eight FINISHED runs, each with 30 points of
``train/loss`` and a 30-row trajectory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from processes import kill_group

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
RUNS, STEPS = 8, 30
ARGS = ["--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "10",
        "--trainer.enable_progress_bar", "false", "--model.updates_per_step", "10"]
TIMEOUT = 400.0  # seconds for all eight together on a busy two-core machine (about 70 s when idle)


def _start_together(folder: Path, extra: list[str]) -> list[tuple[int, str]]:
    """Start RUNS trainings at once in ``folder`` (its default store ``sqlite:///mlflow.db``); wait for all.

    Returns each process's exit code and stderr; a process still running at the deadline is killed and
    fails the test.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the folder's own store
    procs = []
    for i in range(RUNS):
        err = open(folder / f"err{i}.log", "wb")
        procs.append((subprocess.Popen([sys.executable, TRAIN, *ARGS, *extra], cwd=folder, env=env,
                                       stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                       start_new_session=True), err))
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for i, (proc, err) in enumerate(procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"run {i} still running after {TIMEOUT:.0f} s")
            err.close()
            results.append((proc.returncode, (folder / f"err{i}.log").read_text(errors="replace")))
    finally:
        for proc, err in procs:
            kill_group(proc, grace=5.0)
            err.close()
    return results


def _check_every_value(folder: Path, experiment: str, results: list[tuple[int, str]]) -> None:
    from mlflow import MlflowClient

    failed = [f"exit {code}:\n{err[-2000:]}" for code, err in results if code != 0]
    assert not failed, f"{len(failed)} of {RUNS} runs failed; the first:\n{failed[0]}"
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id], max_results=100)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * RUNS
    assert len(client.search_experiments(filter_string=f"name = '{experiment}'")) == 1
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == STEPS + 1  # and the last result
        assert {"val/loss", "test/accuracy"} <= set(run.data.metrics)
        into = folder / "downloaded" / run.info.run_id
        into.mkdir(parents=True)
        trajectory = client.download_artifacts(run.info.run_id, "trajectory.parquet", str(into))
        assert len(pd.read_parquet(trajectory)) == STEPS + 1


def test_eight_runs_on_a_fresh_store(tmp_path):
    """No mlflow.db yet: one process creates and migrates the store, the others wait for it."""
    results = _start_together(tmp_path, [])
    _check_every_value(tmp_path, "neuron_torch", results)
    # the working folder holds what the README says: the lock lives in the cache, not beside the store
    left = sorted(p.name for p in tmp_path.iterdir()  # the logs and downloads are the test's own
                  if not p.name.endswith(".log") and p.name != "downloaded")
    assert left == ["checkpoints", "mlflow.db", "mlruns"]


def test_eight_runs_create_one_new_experiment(tmp_path, empty_store):
    """An initialised store and an experiment none of them has seen: one creates it, all run in it."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    results = _start_together(tmp_path, ["--mlflow.experiment", "together"])
    _check_every_value(tmp_path, "together", results)


def test_losing_the_create_race_takes_the_experiment(monkeypatch):
    """A client outside the lock (a server, another tool) creates the experiment between get and create."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from neuron_torch.tracking.store import open_experiment

    class Client:
        lookups = 0

        def __init__(self, uri):
            pass

        def get_experiment_by_name(self, name):
            Client.lookups += 1
            return None if Client.lookups == 1 else mlflow.entities.Experiment("7", name, "", "active")

        def create_experiment(self, name, tags=None):
            raise MlflowException(f"Experiment(name={name}) already exists.",
                                  mlflow.protos.databricks_pb2.RESOURCE_ALREADY_EXISTS)

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    _, experiment_id = open_experiment("http://127.0.0.1:1", "together")
    assert experiment_id == "7" and Client.lookups == 2


def test_a_held_lock_ends_in_one_line(tmp_path):
    """A process stuck while holding the store's lock is named after the timeout instead of hanging the run."""
    from neuron_torch.tracking.store import StoreError, lock_file, store_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(lock_file(tmp_path / "mlflow.db"))], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(StoreError, match="held by another process for 1 s"):
            with store_lock(uri, timeout=1.0):
                pass
    finally:
        kill_group(holder, grace=1.0)
    with store_lock(uri, timeout=1.0):  # released with its process
        pass
