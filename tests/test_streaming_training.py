"""Training on a table streamed from Parquet shards: the same numbers as the loaded table, over DDP too.

A small sharded table (a few hundred KB) with a memory budget far below it forces streaming; the same
command with a large budget loads it. Both split by row index and seed, so the runs must agree update by
update (float64, 1e-10) for every update rule, k classes and weighted rows included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

import conftest
from neuron_torch.cli.commands import train

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
FEATURES = [f"f{j}" for j in range(5)]
STREAM, LOAD = "64KiB", "1GB"  # the table takes ~40 KB of float64, ~160 KB counted as loading holds it
COMMON = ["--data.features", f"[{', '.join(FEATURES)}]", "--trainer.precision", "64-true",
          "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10",
          "--model.updates_per_step", "5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """900 rows in 3 shards of 3 row groups: features on different scales, a binary label, a 3-class label
    ``k`` with string values, and integer sample weights ``w``."""
    rng = np.random.default_rng(0)
    m = 900
    X = rng.normal(size=(m, 5)) * [1, 2, 3, 4, 5] + [0, 1, 2, 3, 4]
    score = X @ rng.normal(size=5) + rng.normal(size=m)
    frame = pd.DataFrame(X, columns=FEATURES).assign(
        label=(score > np.median(score)).astype(int),
        k=np.array(["a", "b", "c"])[np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))],
        w=rng.integers(1, 4, m).astype(float))
    folder = tmp_path_factory.mktemp("shards")
    for i, rows in enumerate(np.array_split(np.arange(m), 3)):
        pq.write_table(pa.Table.from_pandas(frame.iloc[rows], preserve_index=False),
                       folder / f"part-{i}.parquet", row_group_size=100)
    return folder


def trajectory(uri: str, run) -> pd.DataFrame:
    client = MlflowClient(uri)
    folder = Path(client.download_artifacts(run.info.run_id, "trajectory.parquet", str(Path.cwd() / run.info.run_id)))
    return pd.read_parquet(folder)


def run_both(args: list[str], uri: str, runs_of, capsys) -> tuple:
    for budget in (STREAM, LOAD):
        assert train([*args, "--data.memory_budget", budget]) == 0
    out = capsys.readouterr()
    assert "streamed in chunks of" in out.err + out.out  # the first run did stream
    streamed, loaded = sorted(runs_of(uri), key=lambda r: r.info.start_time)
    return streamed, loaded


RULES = {"gd": ["--model.update_rule", "gd"],
         "momentum": ["--model.update_rule", "momentum", "--model.learning_rate", "0.1"],
         "adam": ["--model.update_rule", "adam", "--model.learning_rate", "0.05"],
         "newton": ["--model.update_rule", "newton", "--model.learning_rate", "1", "--model.l2", "0.01"]}


@pytest.mark.parametrize("rule", RULES, ids=list(RULES))
def test_streamed_run_equals_loaded_run(rule, shards, tracking_uri, runs_of, capsys):
    args = ["--data.path", str(shards), "--data.target", "label", "--trainer.max_steps", "30", *COMMON,
            *RULES[rule]]
    streamed, loaded = run_both(args, tracking_uri, runs_of, capsys)
    a, b = trajectory(tracking_uri, streamed), trajectory(tracking_uri, loaded)
    assert len(a) == 31 and list(a.columns) == list(b.columns)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-10, atol=1e-10)
    for key, value in loaded.data.metrics.items():  # validation and test metrics over every row
        # a streamed split's AUROC is binned at 1001 thresholds (a fixed-size state): within a bin's width
        tolerance = 2e-3 if key.endswith("auroc") else 1e-10
        assert streamed.data.metrics[key] == pytest.approx(value, rel=1e-10, abs=tolerance), key


def test_streamed_k_classes_with_weights(shards, tracking_uri, runs_of, capsys):
    args = ["--data.path", str(shards), "--data.target", "k", "--data.weight_column", "w",
            "--model.class_weight", "balanced", "--model.update_rule", "newton", "--model.learning_rate", "1",
            "--model.l2", "0.01", "--trainer.max_steps", "10", *COMMON]
    streamed, loaded = run_both(args, tracking_uri, runs_of, capsys)
    a, b = trajectory(tracking_uri, streamed), trajectory(tracking_uri, loaded)
    assert "w/c/f4" in a.columns and "b/a" in a.columns
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("step,when", [(5, "during update 6"), (10, "validating after update 10")],
                         ids=["training", "validation"])
def test_shard_gone_mid_run_then_resume(step, when, shards, tmp_path, tracking_uri, runs_of, capsys):
    """A shard deleted after ``step`` updates (the next update, or the validation at update 10, needs it): one
    line naming it, the run FAILED, those updates checkpointed; with the shard back, the checkpoint resumes to
    the state of a run never stopped."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(shards, folder)
    args = ["--data.path", str(folder), "--data.target", "label", "--data.memory_budget", STREAM, *COMMON]
    code = train([*args, "--trainer.max_steps", "30", "--trainer.callbacks+=shard_faults.RemoveShard",
                  "--trainer.callbacks.path", str(folder / "part-1.parquet"), "--trainer.callbacks.step", str(step)])
    assert code == 2
    line = conftest.one_error_line(capsys.readouterr().err, "part-1.parquet", when, f"({step} updates)")
    failed, = runs_of(tracking_uri)
    assert failed.info.status == "FAILED"
    checkpoint = line.split(" is in ")[-1].strip()
    assert Path(checkpoint).name == f"failed-step={step}.ckpt"

    shutil.copy(shards / "part-1.parquet", folder / "part-1.parquet")
    assert train([*args, "--trainer.max_steps", "30", "--ckpt_path", checkpoint]) == 0
    assert train([*args, "--trainer.max_steps", "30"]) == 0
    _, resumed, straight = sorted(runs_of(tracking_uri), key=lambda r: r.info.start_time)
    a, b = trajectory(tracking_uri, resumed), trajectory(tracking_uri, straight)
    np.testing.assert_allclose(a.iloc[-1].to_numpy(), b.iloc[-1].to_numpy(), rtol=1e-12, atol=1e-12)


def test_two_process_ddp_streams_its_own_rows(shards, tracking_uri, runs_of):
    """Two gloo ranks, each streaming its own contiguous rows, end at the single process's weights."""
    args = [sys.executable, TRAIN, "--data.path", str(shards), "--data.target", "label", "--data.memory_budget",
            STREAM, "--trainer.max_steps", "20", "--trainer.accelerator", "cpu", *COMMON]
    for extra in (["--trainer.strategy", "ddp", "--trainer.devices", "2"], []):
        done = subprocess.run([*args, *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    ddp, single = sorted(runs_of(tracking_uri), key=lambda r: r.info.start_time)
    a, b = trajectory(tracking_uri, ddp), trajectory(tracking_uri, single)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-10, atol=1e-10)


def test_a_shard_gone_on_one_ddp_rank_stops_every_rank(shards, tmp_path, tracking_uri, runs_of):
    """Rank 1 alone streams the last shard: when it disappears, both ranks stop at the same update, rank 0
    reports the shard in one line, the run is FAILED and the last completed update is checkpointed."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(shards, folder)
    done = subprocess.run([sys.executable, TRAIN, "--data.path", str(folder), "--data.target", "label",
                           "--data.memory_budget", STREAM, "--trainer.max_steps", "30", "--trainer.accelerator", "cpu",
                           "--trainer.strategy", "ddp", "--trainer.devices", "2", *COMMON,
                           "--trainer.callbacks+=shard_faults.RemoveShard", "--trainer.callbacks.path",
                           str(folder / "part-2.parquet"), "--trainer.callbacks.step", "5"],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 2, done.stderr[-3000:]
    line = conftest.one_error_line(done.stderr, "part-2.parquet", "during update 6", "(5 updates)")
    assert Path(line.split(" is in ")[-1].strip()).exists()
    run, = runs_of(tracking_uri)
    assert run.info.status == "FAILED"
