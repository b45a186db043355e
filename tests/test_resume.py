"""Resuming from a Lightning checkpoint continues training exactly, and the new run names the one it came from."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from neuron_torch.cli.commands import train

EVERY_20 = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=20", "--trainer.callbacks.save_top_k=-1"]


@pytest.mark.parametrize("setup", [
    ["--model.update_rule", "momentum", "--model.learning_rate", "0.05", "--data.batch_size", "64",
     "--model.lr_schedule", "step", "--model.lr_step_size", "7"],
    ["--model.hidden_sizes", "[8]", "--model.update_rule", "adam", "--model.learning_rate", "0.01",
     "--model.lr_schedule", "cosine", "--data.batch_size", "100"],
], ids=["neuron-momentum-minibatch", "deep-adam-cosine"])
def test_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(setup, tracking_uri, runs_of, tmp_path):
    """float64 on the CPU: weights, update-rule state, schedule and mini-batch order all carry over."""
    args = ["--trainer.enable_progress_bar", "false", "--trainer.precision", "64-true",
            "--trainer.max_steps", "40", *setup]
    assert train(args + EVERY_20 + ["--mlflow.run_name", "straight"]) == 0
    (straight,) = runs_of(tracking_uri)
    ckpt = next(Path("checkpoints", straight.info.run_id).glob("*step=20*.ckpt"))
    assert train(args + ["--ckpt_path", str(ckpt), "--mlflow.run_name", "resumed"]) == 0
    resumed = next(r for r in runs_of(tracking_uri) if r.info.run_name == "resumed")
    assert resumed.data.tags["resumed_from"] == straight.info.run_id

    client = MlflowClient(tracking_uri)
    final = [pd.read_csv(client.download_artifacts(r.info.run_id, "weights.csv", str(tmp_path / name)))
             for name, r in (("a", straight), ("b", resumed))]
    # exact: both runs take the same operations on the same batches in this process (one thread count); the
    # checkpoint stores float64 tensors as they are. Across processes with other thread settings it would not hold.
    pd.testing.assert_frame_equal(final[0], final[1], check_exact=True)
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(20, 41))  # the resumed run's axis continues from step 20, to the end


def test_missing_checkpoint_is_a_clear_error(tracking_uri, runs_of, capsys):
    assert train(["--trainer.max_steps", "5", "--ckpt_path", "nowhere.ckpt"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: nowhere.ckpt: checkpoint not found"
    assert runs_of(tracking_uri) == []
