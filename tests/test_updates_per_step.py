"""Several updates in one Lightning training step change how often Lightning's loop turns, never a number.

Every case trains the same config with ``model.updates_per_step`` 1 and larger, in float64 on the CPU, and
asks for identical trajectories (every update's loss, gradient norm and weights), validation metrics at the
same updates, and identical final weights.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow import MlflowClient

from neuron_torch.cli.commands import build_cli, train

BASE = ["--trainer.enable_progress_bar", "false", "--trainer.precision", "64-true",
        "--trainer.enable_checkpointing", "false"]


def trained(tracking_uri, runs_of, tmp_path, name: str, args: list[str]):
    """Train, then return (trajectory, val/loss history as (step, value) pairs, weights.csv) of the run."""
    assert train(BASE + args + ["--mlflow.run_name", name]) == 0
    run = next(r for r in runs_of(tracking_uri) if r.info.run_name == name)
    client = MlflowClient(tracking_uri)
    folder = tmp_path / name
    folder.mkdir()
    trajectory = pd.read_parquet(client.download_artifacts(run.info.run_id, "trajectory.parquet", str(folder)))
    weights = pd.read_csv(client.download_artifacts(run.info.run_id, "weights.csv", str(folder)))
    val = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")]
    return trajectory, sorted(val), weights


@pytest.mark.parametrize("setup", [
    ["--model.learning_rate", "0.5"],
    ["--model.update_rule", "momentum", "--model.learning_rate", "0.05", "--data.batch_size", "64",
     "--model.lr_schedule", "step", "--model.lr_step_size", "7"],
    ["--model.hidden_sizes", "[6]", "--model.update_rule", "adam", "--model.learning_rate", "0.01",
     "--model.lr_schedule", "cosine", "--data.batch_size", "100"],
], ids=["neuron-gd-full-batch", "neuron-momentum-minibatch-step-schedule", "deep-adam-cosine-minibatch"])
def test_updates_per_step_changes_no_number(setup, tracking_uri, runs_of, tmp_path):
    # 47 updates: not a multiple of 7, so the last training step runs fewer updates
    args = setup + ["--trainer.max_steps", "47", "--trainer.val_check_interval", "21"]
    one = trained(tracking_uri, runs_of, tmp_path, "k1", args + ["--model.updates_per_step", "1"])
    seven = trained(tracking_uri, runs_of, tmp_path, "k7", args + ["--model.updates_per_step", "7"])
    assert one[0]["step"].tolist() == list(range(48))
    # exact: updates_per_step changes only how often Lightning's loop turns; the updates are the very same
    # operations on the same batches, in this process (one thread count)
    pd.testing.assert_frame_equal(one[0], seven[0], check_exact=True)
    assert [step for step, _ in one[1]] == [21, 42]
    assert one[1] == seven[1]
    pd.testing.assert_frame_equal(one[2], seven[2], check_exact=True)


def test_tol_stops_at_the_same_update_inside_a_step(tracking_uri, runs_of, tmp_path, capsys):
    args = ["--trainer.max_steps", "500", "--trainer.val_check_interval", "500", "--model.tol", "0.05"]
    one = trained(tracking_uri, runs_of, tmp_path, "k1", args + ["--model.updates_per_step", "1"])
    many = trained(tracking_uri, runs_of, tmp_path, "k50", args + ["--model.updates_per_step", "50"])
    assert 1 < len(one[0]) < 500 and len(one[0]) % 50 != 0  # it stopped, in the middle of a 50-update step
    # exact: the same operations in this process, as in test_updates_per_step_changes_no_number
    pd.testing.assert_frame_equal(one[0], many[0], check_exact=True)
    pd.testing.assert_frame_equal(one[2], many[2], check_exact=True)


@pytest.mark.parametrize("k,val_every,expected", [(50, 100, 50), (50, 10, 10), (50, 25, 25), (8, 12, 4),
                                                  (7, 10, 1), (1, 100, 1)])
def test_updates_per_step_is_lowered_to_divide_the_validation_interval(k, val_every, expected):
    cli = build_cli(["--model.updates_per_step", str(k), "--trainer.val_check_interval", str(val_every),
                     "--trainer.max_steps", "200", "--trainer.enable_progress_bar", "false"])
    assert cli.model.updates_per_step == expected
    assert cli.trainer.val_check_interval == val_every // expected  # Lightning counts training steps
    assert cli.model.hparams.updates_per_step == k  # the config as given is what gets logged


def test_checkpoint_interval_also_divides_updates_per_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--model.updates_per_step", "50", "--trainer.val_check_interval", "100",
                     "--trainer.max_steps", "200", "--trainer.enable_progress_bar", "false",
                     "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                     "--trainer.callbacks.every_n_train_steps=30"])
    assert cli.model.updates_per_step == math.gcd(50, 100, 30)


def test_one_checkpoint_callback_given_alone_as_a_mapping(tmp_path, monkeypatch):
    """``trainer.callbacks`` may be one callback rather than a list: its interval counts, and no second
    checkpoint is added."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "checkpoint.yaml"
    config.write_text("trainer:\n  callbacks:\n    class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                      "    init_args:\n      every_n_train_steps: 30\n")
    cli = build_cli(["--config", str(config), "--model.updates_per_step", "50", "--trainer.val_check_interval",
                     "100", "--trainer.max_steps", "200", "--trainer.enable_progress_bar", "false"])
    assert cli.model.updates_per_step == math.gcd(50, 100, 30)
    assert sum(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks) == 1


def test_updates_per_step_below_one_is_a_clear_error(tracking_uri, runs_of, capsys):
    assert train(["--model.updates_per_step", "0", "--trainer.max_steps", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: model.updates_per_step must be an integer >= 1, got 0"
    assert runs_of(tracking_uri) == []


@pytest.mark.parametrize("max_steps,every", [(30, 1), (1000, 10), (1050, 11)])
def test_default_metric_cadence_gives_about_100_points(max_steps, every, tracking_uri, runs_of):
    """MLflow costs ~0.1 ms per value: by default a run logs ~100 points per metric, however long it is."""
    args = ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
    assert train(args) == 0
    (run,) = runs_of(tracking_uri)
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == sorted({*range(0, max_steps, every), max_steps})  # the last result too
    assert len(steps) <= 101


def test_log_every_n_steps_below_one_is_a_clear_error(tracking_uri, runs_of, capsys):
    assert train(["--mlflow.log_every_n_steps", "0", "--trainer.max_steps", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: mlflow.log_every_n_steps must be an integer >= 1, "
                                                                "or null for about 100 points per metric, got 0")
    assert runs_of(tracking_uri) == []


def test_resume_with_another_updates_per_step_validates_on_the_same_updates(tracking_uri, runs_of, tmp_path):
    """A checkpoint written at one update per step, resumed at ten: validation still falls every 50 updates."""
    from pathlib import Path

    every_20 = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=20", "--trainer.callbacks.save_top_k=-1"]
    args = ["--trainer.enable_progress_bar", "false", "--trainer.precision", "64-true", "--trainer.max_steps",
            "100", "--trainer.val_check_interval", "50"]
    assert train(args + every_20 + ["--model.updates_per_step", "1", "--mlflow.run_name", "straight"]) == 0
    (straight,) = runs_of(tracking_uri)
    ckpt = next(Path("checkpoints", straight.info.run_id).glob("*step=20*.ckpt"))
    assert train(args + ["--model.updates_per_step", "10", "--ckpt_path", str(ckpt),
                         "--mlflow.run_name", "resumed"]) == 0
    resumed = next(r for r in runs_of(tracking_uri) if r.info.run_name == "resumed")
    client = MlflowClient(tracking_uri)
    val = {r.info.run_name: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val/loss"))
           for r in (straight, resumed)}
    assert [step for step, _ in val["straight"]] == [50, 100]
    assert val["resumed"] == val["straight"]  # exact: the same operations in this process (see test_resume.py)


def test_a_plain_dataloader_of_lists_is_one_batch_per_step(tmp_path):
    """``DataLoader(TensorDataset(X, Y))`` yields ``[X, Y]`` lists: each is one batch, never a group."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from neuron_torch.train.module import NeuronModule

    X, Y = torch.randn(40, 3), (torch.rand(40, 1) > 0.5).float()
    model = NeuronModule(["a", "b", "c"], learning_rate=0.1)
    trainer = L.Trainer(max_steps=7, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(X, Y), batch_size=8))
    assert trainer.global_step == 7
    assert model.tracked_rows.shape == (2, 2 + 1 + 3)  # the last update's row and the final state's
