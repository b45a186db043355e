"""A tracking server that goes away: refused in one line at the start, waited for in the background during a
run, and what it missed kept in the run's spool until it is back (or until ``neuron-torch sync``).

A real ``mlflow server`` listens on 127.0.0.1; the tests kill its whole process group with SIGKILL at chosen
updates (a hook on the tracking callback: no sleeps decide when) and start it again on the same port and
store. Every run does 2,000 updates and keeps 100 points of each per-update metric, 20 validations and the
test metrics, so "every value arrived" is a count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from neuron_torch.tracking import callback, reachability, spool
from neuron_torch.cli.commands import train
from processes import free_port, kill_group, log_tail, start_mlflow

START_TIMEOUT = 120.0  # seconds for the server to answer /health on a busy two-core machine
STEPS, EVERY, VAL_EVERY = 2000, 20, 100  # updates; default cadence ceil(2000 / 100); validation interval
ARGS = ["--trainer.max_steps", str(STEPS), "--trainer.enable_progress_bar", "false"]
PER_UPDATE = ["train/loss", "train/grad_norm", "b", "w/mean radius", "w/worst fractal dimension"]
SYNC = [sys.executable, "-m", "neuron_torch.cli.commands", "sync"]  # what the neuron-torch console script runs


class Server:
    """``mlflow server`` on one port and one sqlite store, that a test can kill and start again."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.uri, self.proc = folder, port, f"http://127.0.0.1:{port}", None
        self.command = [sys.executable, "-m", "mlflow", "server",
                        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                        "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
                        "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    def start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = start_mlflow(self.command, self.port, self.folder, START_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL to the server's process group, then wait until nothing listens on its port."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _listening(self.port):
            assert time.monotonic() < deadline, "the killed server's port still answers"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_store):
    folder = tmp_path_factory.mktemp("faulty-server")
    shutil.copyfile(empty_store, folder / "server.db")  # tables already made: no migrations at each start
    server = Server(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Lines(logging.Handler):
    """The project's log lines, as the training thread and the writer thread emit them."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def wait_for(self, fragment: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if fragment in line]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no line with {fragment!r} within {timeout:.0f} s: {self.lines}")


@pytest.fixture
def near_server(server, tmp_path, monkeypatch):
    """The test runs in tmp_path against the server (up), with the project's own HTTP retry defaults."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    server.start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "NEURON_TORCH_TRACKING_WAIT"):
        monkeypatch.delenv(name, raising=False)
    lines = Lines()
    logging.getLogger("neuron_torch").addHandler(lines)
    saved = tracking_utils._tracking_uri
    yield SimpleNamespace(client=MlflowClient(server.uri), server=server, lines=lines)
    tracking_utils._tracking_uri = saved


def at_updates(monkeypatch, actions: dict[int, callable]) -> None:
    """Run ``actions[k](tracker)`` on the training thread once the run has done k updates."""
    original = callback.MLflowTracking.on_train_batch_end
    due = dict(actions)

    def hooked(self, trainer, pl_module, outputs, batch, batch_idx):
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        for k in sorted(due):
            if trainer.global_step >= k:
                due.pop(k)(self)

    monkeypatch.setattr(callback.MLflowTracking, "on_train_batch_end", hooked)


def send_then_kill(env):
    """Hand the writer the rows so far, wait until the server has them, then kill the server."""

    def action(tracker):
        tracker._flush()  # the tracker hands rows over every 2 s; the run is faster than that
        points = sum(len(steps) for steps, _ in tracker._history)  # train/loss points handed to the writer
        deadline = time.monotonic() + 60
        while len(env.client.get_metric_history(tracker.run.run_id, "train/loss")) < points:
            assert time.monotonic() < deadline, "the rows before the kill did not reach the server"
            time.sleep(0.1)
        env.server.kill()
    return action


def notice(env):
    """Hand the writer the rows since the kill and wait until it says the server went silent."""

    def action(tracker):
        tracker._flush()
        env.lines.wait_for("stopped answering")
    return action


def kill_at(env, k: int) -> dict:
    """The server killed after ``k`` updates, and the writer aware of it 200 updates later."""
    return {k: send_then_kill(env), k + 200: notice(env)}


def the_run(client, experiment="neuron_torch"):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def metric_points(client, run_id: str) -> dict[str, list[int]]:
    run = client.get_run(run_id)
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


def assert_everything_arrived(client, run_id: str, tmp_path: Path) -> None:
    """Every value the run computed is in the store: per-update metrics at every 20th update, 20 validations,
    the test metrics, params, artifacts with the full trajectory, and a model that loads and scores."""
    import mlflow

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    points = metric_points(client, run_id)
    for key in PER_UPDATE:
        assert points[key] == sorted({*range(0, STEPS, EVERY), STEPS}), key  # and the last update's result
    assert len([k for k in points if k.startswith("w/")]) == 30
    assert points["val/loss"] == list(range(VAL_EVERY, STEPS + 1, VAL_EVERY))
    assert {"test/accuracy", "test/auroc", "test/loss"} <= set(points)
    assert run.data.params["trainer.max_steps"] == str(STEPS)
    listed = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"config.yaml", "weights.csv", "trajectory.parquet", "plots/loss_curves.png", "plots/roc.png"} <= listed
    downloads = tmp_path.parent / f"{tmp_path.name}-downloads"
    downloads.mkdir(exist_ok=True)
    trajectory = pd.read_parquet(client.download_artifacts(run_id, "trajectory.parquet", str(downloads)))
    assert trajectory["step"].tolist() == list(range(STEPS + 1))
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    np.testing.assert_allclose(trajectory["train/loss"].to_numpy()[::EVERY], [v for _, v in loss], rtol=1e-6)
    data = load_breast_cancer(as_frame=True)
    probability = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(data.data)
    assert ((np.asarray(probability) >= 0.5) == (data.target == 1)).mean() > 0.95


def test_the_cause_walk_ends_on_a_chain_that_loops_back():
    """An error that wraps its own wrapper (as an argument, a reason and a cause): each error once, no recursion
    without end."""
    inner, outer = ConnectionResetError("reset"), OSError("wrapped")
    outer.args = (inner,)
    inner.args = (outer,)
    inner.reason = outer
    inner.__cause__ = outer
    outer.__context__ = inner
    assert list(reachability.causes(outer)) == [outer, inner]
    assert reachability.is_unreachable(outer)


def test_server_down_at_the_start_is_one_line_within_seconds(tmp_path):
    """No server on the port: exit 2 and one ``error:`` line, without MLflow's minutes of retries; no run,
    nothing written where it ran."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "NEURON_TORCH_"))}
    env.update(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "neuron_torch.cli.commands", "train",
                           "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    print(f"\nserver down at the start: exit {done.returncode} after {took:.1f} s (imports included)")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: tracking server http://127.0.0.1:{port} does not answer (connection refused); "
                      f"start it, or choose another store with MLFLOW_TRACKING_URI (set in this environment)"]
    assert done.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in done.stderr
    assert took < 60  # imports and the data take seconds; MLflow's own retries alone took 253 s
    assert list(tmp_path.iterdir()) == []  # no run, no store, no checkpoints


def test_server_back_during_the_run_gets_every_value(near_server, tmp_path, monkeypatch, capsys):
    env = near_server
    at_updates(monkeypatch, {**kill_at(env, 600),
                             1400: lambda tracker: (env.server.start(), env.lines.wait_for("answers again"))})
    started = time.monotonic()
    assert train(ARGS) == 0
    took = time.monotonic() - started
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nserver killed at update 600, back at 1400: the run took {took:.1f} s\n{err}")
    assert "Traceback" not in err
    # one line when it went away, one when it came back: not one per request or batch
    assert len([line for line in env.lines.lines if "stopped answering" in line]) == 1, env.lines.lines
    assert len([line for line in env.lines.lines if "answers again" in line]) == 1, env.lines.lines
    run = the_run(env.client)
    assert_everything_arrived(env.client, run.info.run_id, tmp_path)
    assert not (tmp_path / "checkpoints" / run.info.run_id / "spool").exists()  # sent, so removed
    assert {p.name for p in tmp_path.iterdir()} <= {"checkpoints"}


def journal_values(spool: Path) -> dict[str, int]:
    """What a spool's journal holds: values of its metrics, params and tags records, and how many of the
    other records (artifacts, model, status)."""
    counts: dict[str, int] = {}
    for text in (spool / "journal.jsonl").read_text().splitlines():
        record = json.loads(text)
        kind = record["kind"]
        counts[kind] = counts.get(kind, 0) + (len(record[kind]) if kind in ("metrics", "params", "tags") else 1)
    return counts


def interrupted_sync(client, run_id: str, folder: Path) -> None:
    """A sync stopped half way: the first quarter of the records sent and counted, the second quarter sent but
    stopped before it was counted (so the next sync sends it again)."""
    from neuron_torch.tracking.spool import Spool, deliver

    spool = Spool(folder)
    spool.lock()
    records = list(spool.unsent())
    assert len(records) >= 8 and all(r["kind"] == "metrics" for _, r in records[:len(records) // 2])
    for i, (line, record) in enumerate(records[:len(records) // 2]):
        deliver(client, run_id, record, folder)
        if i < len(records) // 4:
            spool.mark_sent(line)
    spool.unlock()


def test_server_back_after_the_run_gets_every_value_from_sync(near_server, tmp_path, monkeypatch, capsys):
    env = near_server
    monkeypatch.setenv("NEURON_TORCH_TRACKING_WAIT", "1")  # the server stays away: do not wait 30 s for it
    at_updates(monkeypatch, kill_at(env, 600))
    started = time.monotonic()
    code = train(ARGS)
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 75, err
    assert "Traceback" not in err
    (run_id,) = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    spool = tmp_path / "checkpoints" / run_id / "spool"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tracking server {env.server.uri} unreachable: ") and last.endswith(
        f" kept in checkpoints/{run_id}/spool; send them with: neuron-torch sync"), last
    # weights.csv, coefficients.csv and .txt, 4 plots, trajectory.parquet (config went first)
    assert "the model and 8 artifacts" in last
    kept = journal_values(spool)
    assert f"{kept['metrics'] + kept['tags']:,} values" in last
    assert kept["status"] == 1 and len(list((spool / "files").rglob("weights.pt"))) == 1
    with capsys.disabled():
        print(f"\nserver killed at update 600, not back: the run took {took:.1f} s and exited {code}; "
              f"{kept['metrics']:,} metric values kept in the spool\n{err}")

    env.server.start()
    run = env.client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the server never heard the end
    before = sum(len(steps) for steps in metric_points(env.client, run_id).values())
    interrupted_sync(env.client, run_id, spool)
    done = subprocess.run(SYNC, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run {run_id}: sent " in done.stdout and done.stdout.strip().endswith("FINISHED"), done.stdout
    assert "Traceback" not in done.stderr
    assert_everything_arrived(env.client, run_id, tmp_path)
    points = metric_points(env.client, run_id)
    per_update = len(points["train/loss"])  # each per-update key's count, checked exactly just above
    computed = sum(per_update if not key.startswith(("val/", "test/")) else STEPS // VAL_EVERY
                   if key.startswith("val/") else 1 for key in points)
    after = sum(len(steps) for steps in points.values())
    with capsys.disabled():
        print(f"metric values computed {computed:,}, in the store {after:,}: sent during the run {before:,}, kept "
              f"and synced {kept['metrics']:,} ({before + kept['metrics'] - after} of them both: a batch the "
              f"server stored but could not acknowledge, stored once)\n{done.stdout}")
    assert after == computed
    assert before + kept["metrics"] >= computed  # none lost; a point both sent and kept is stored once
    assert not spool.exists()

    again = subprocess.run(SYNC, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to send" in again.stdout, again.stdout + again.stderr


def test_sync_marks_runs_of_dead_processes_killed(near_server, tmp_path):
    """SIGKILL cannot be caught: the run stays RUNNING; sync finds its process gone from this host."""
    from neuron_torch.cli.sync import ENDED_TAG

    client, host = near_server.client, socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    experiment = client.create_experiment("stale-runs")
    runs = {name: client.create_run(experiment, run_name=name, tags={spool.HOST_TAG: h, spool.PID_TAG: pid})
            for name, h, pid in [("dead", host, str(gone.pid)), ("alive", host, str(os.getpid())),
                                 ("elsewhere", "another-host", str(gone.pid))]}
    done = subprocess.run(SYNC, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    dead = client.get_run(runs["dead"].info.run_id)
    assert dead.info.status == "KILLED"
    assert f"process {gone.pid} on {host}" in dead.data.tags[ENDED_TAG]
    assert f"run {dead.info.run_id}: its process {gone.pid} on {host} is gone; marked KILLED" in done.stdout
    for name in ("alive", "elsewhere"):  # a live process, or a machine whose processes cannot be seen
        assert client.get_run(runs[name].info.run_id).info.status == "RUNNING"
        client.set_terminated(runs[name].info.run_id, "FINISHED")


def kept_loss_points(journal: Path) -> int:
    """``train/loss`` points in a spool's journal so far (complete lines only: the writer may be appending)."""
    if not journal.exists():
        return 0
    lines = [line for line in journal.read_text().split("\n")[:-1] if line]
    return sum(key == "train/loss" for line in lines for key, *_ in json.loads(line).get("metrics", []))


def test_run_killed_while_its_server_is_away_is_sent_and_marked_killed(near_server, tmp_path):
    """The worst case: the server goes, then the training process is SIGKILLed. What its writer had kept is in
    the spool; sync sends it (the history has no gap) and ends the run KILLED, as its process is gone."""
    from neuron_torch.cli.sync import ENDED_TAG

    env, steps = near_server, 3_000_000  # minutes of training: it is killed long before the end
    every = steps // 100
    with open(tmp_path / "train.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "neuron_torch.cli.commands", "train", "--trainer.max_steps", str(steps),
                                 "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10000"],
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        run_id = None
        while run_id is None or not env.client.get_metric_history(run_id, "train/loss"):
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(tmp_path / "train.log")
            experiment = env.client.get_experiment_by_name("neuron_torch")
            runs = env.client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") \
                if experiment else []
            run_id = runs[0].info.run_id if runs else None
            time.sleep(0.2)
        sent = len(env.client.get_metric_history(run_id, "train/loss"))
        env.server.kill()
        journal = tmp_path / "checkpoints" / run_id / "spool" / "journal.jsonl"
        while not kept_loss_points(journal):  # the writer has kept some of what came after
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(tmp_path / "train.log")
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing the process can catch: it cannot end its run
        proc.wait(timeout=30)
    env.server.start()
    assert env.client.get_run(run_id).info.status == "RUNNING"

    done = subprocess.run(SYNC, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run {run_id}: sent " in done.stdout and "no final status in the spool" in done.stdout, done.stdout
    assert f"run {run_id}: its process {proc.pid} on {socket.gethostname()} is gone; marked KILLED" in done.stdout
    run = env.client.get_run(run_id)
    assert run.info.status == "KILLED" and str(proc.pid) in run.data.tags[ENDED_TAG]
    loss = sorted(m.step for m in env.client.get_metric_history(run_id, "train/loss"))
    assert len(loss) > sent and loss == list(range(0, loss[-1] + 1, every))  # sent, then kept: no gap between
    assert not journal.parent.exists()
