"""SIGINT and SIGTERM to a real ``python train.py``: training stops after the update in progress, a checkpoint of
that update is written and printed with the command that resumes it, the run ends KILLED; a sweep stops its
children the same way and starts no new one."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from processes import kill_group

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
# float64, one update per Lightning step (slow enough to be caught mid-run), a checkpoint every 200 updates
LONG = ["--trainer.precision", "64-true", "--trainer.enable_progress_bar", "false", "--model.updates_per_step", "1",
        "--trainer.val_check_interval", "1000", "--trainer.max_steps", "10000",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=200", "--trainer.callbacks.save_top_k=-1"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_checkpoints(proc: subprocess.Popen, folder: Path, count: int = 1, timeout: float = 120.0) -> None:
    """Until ``count`` run folders under ``folder`` hold a checkpoint: the runs are then mid-training."""
    deadline = time.monotonic() + timeout
    while len({p.parent for p in folder.glob("*/*.ckpt")}) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            out, err = proc.communicate()
            pytest.fail(f"no periodic checkpoint appeared (exit {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str, float]:
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail("the process did not exit after the signal")
    return proc.returncode, out, err, time.monotonic() - started


def trajectory(client: MlflowClient, run_id: str, folder: Path) -> pd.DataFrame:
    folder.mkdir(exist_ok=True)
    frame = pd.read_parquet(client.download_artifacts(run_id, "trajectory.parquet", str(folder)))
    return frame.sort_values("step", ignore_index=True)  # written in chunks, as they were handed over


def test_sigint_checkpoints_and_the_printed_command_resumes_without_a_gap(tracking_uri, runs_of, tmp_path):
    proc = start(LONG + ["--mlflow.run_name", "interrupted"], tmp_path)
    wait_for_checkpoints(proc, tmp_path / "checkpoints")
    proc.send_signal(signal.SIGINT)
    code, out, err, seconds = finish(proc)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    ckpt = Path(re.search(r"^checkpoint: (.+)$", err, re.M).group(1))
    assert ckpt.is_file()
    stopped_at = int(re.search(r"step=(\d+)", ckpt.name).group(1))
    assert 200 <= stopped_at < 10000
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "KILLED"
    client = MlflowClient(tracking_uri)
    first = trajectory(client, run.info.run_id, tmp_path / "a")
    assert first["step"].tolist() == list(range(stopped_at))  # every update up to the checkpoint, none after

    command = shlex.split(re.search(r"^resume with: (.+)$", err, re.M).group(1))
    assert command[:2] == ["python", "train.py"] and command[-2:] == ["--trainer.max_steps", "10000"]
    resumed = subprocess.run([sys.executable, TRAIN, *command[2:], "--mlflow.run_name", "resumed"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run([sys.executable, TRAIN, *LONG, "--mlflow.run_name", "straight"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    runs = {r.info.run_name: r for r in runs_of(tracking_uri)}
    second = trajectory(client, runs["resumed"].info.run_id, tmp_path / "b")
    # continues without a gap (the row of the final state, step 10000, may close it)
    assert second["step"].tolist() == list(range(stopped_at, stopped_at + len(second)))
    assert len(second) in (10000 - stopped_at, 10000 - stopped_at + 1)
    whole = trajectory(client, runs["straight"].info.run_id, tmp_path / "c")
    pd.testing.assert_frame_equal(pd.concat([first, second], ignore_index=True), whole, check_exact=True)
    weights = [pd.read_csv(client.download_artifacts(runs[name].info.run_id, "weights.csv", str(tmp_path / name)))
               for name in ("resumed", "straight")]
    pd.testing.assert_frame_equal(*weights, check_exact=True)


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["sigterm", "twice"])
def test_sigterm_and_a_second_sigint_end_the_run_killed(signals, tracking_uri, runs_of, tmp_path):
    proc = start(LONG, tmp_path)
    wait_for_checkpoints(proc, tmp_path / "checkpoints")
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.01)
    code, out, err, seconds = finish(proc)
    assert code == 128 + signals[0], err[-3000:]
    assert "Traceback" not in err and seconds < 30
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "KILLED"
    if len(signals) == 1:
        assert Path(re.search(r"^checkpoint: (.+)$", err, re.M).group(1)).is_file()


def test_interrupted_sweep_stops_its_children_and_starts_no_new_one(tracking_uri, runs_of, tmp_path):
    grid = "{model.learning_rate: [0.1, 0.2, 0.3, 0.4]}"
    proc = start(["--sweep.grid", grid, "--sweep.workers", "2", *LONG, "--trainer.max_steps", "1000000"], tmp_path)
    wait_for_checkpoints(proc, tmp_path / "checkpoints", count=2)  # both children are training
    signalled = time.time()
    proc.send_signal(signal.SIGINT)
    code, out, err, seconds = finish(proc)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    assert seconds < 30
    runs = runs_of(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED"
    assert len(children) == 2 and all(c.info.status == "KILLED" for c in children)
    assert all(c.info.start_time / 1000 < signalled for c in children)
    if os.name == "posix":  # no child is left behind
        assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b""
