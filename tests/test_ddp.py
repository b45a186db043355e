"""Data parallel training: hand-made gradients are summed over ranks by hand (Lightning only syncs autograd's)."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
ARGS = ["--trainer.max_steps", "40", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.precision", "64-true", "--trainer.enable_checkpointing", "false"]


@pytest.mark.parametrize("rule", [["--model.update_rule", "gd"],
                                  ["--model.update_rule", "newton", "--model.learning_rate", "1", "--model.l2", "0.01"]],
                         ids=["gd", "newton"])
def test_two_process_ddp_matches_one_process(rule, tracking_uri, runs_of, tmp_path):
    """Two CPU ranks, each on half the rows, end at the single-process weights (float64), in one MLflow run;
    Newton's Hessian is summed over the ranks like the gradients."""
    for extra in (["--trainer.strategy", "ddp", "--trainer.devices", "2"], []):
        done = subprocess.run([sys.executable, TRAIN, *ARGS, *rule, *extra], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(runs_of(tracking_uri), key=lambda r: r.info.start_time)
    assert [r.data.params["trainer.strategy"] for r in runs] == ["ddp", "auto"]  # rank 1 made no run
    assert all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient(tracking_uri)
    ddp, single = (pd.read_csv(client.download_artifacts(r.info.run_id, "weights.csv", str(tmp_path / str(i))))
                   for i, r in enumerate(runs))
    assert (ddp.weight - single.weight).abs().max() < 1e-12
    assert abs(ddp.bias[0] - single.bias[0]) < 1e-12
