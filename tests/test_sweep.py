"""Sweeps: one parent run, one child per grid point, the overlay plot, the results table and the best child."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from neuron_torch.cli.commands import train

SWEEP = str(Path(__file__).resolve().parents[1] / "configs" / "lr_sweep.yaml")
SHORT = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "10", "--trainer.enable_progress_bar",
         "false", "--trainer.enable_checkpointing", "false"]


@pytest.mark.parametrize("workers", [1, 2])
def test_learning_rate_sweep(workers, tracking_uri, runs_of, tmp_path):
    grid = "[0.01, 0.1, 1.0]" if workers == 1 else "[0.1, 1.0]"
    assert train(["--config", SWEEP, *SHORT, "--sweep.grid", f"{{model.learning_rate: {grid}}}",
                  "--sweep.workers", str(workers)]) == 0
    runs = runs_of(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rates = [0.01, 0.1, 1.0] if workers == 1 else [0.1, 1.0]
    assert sorted(c.info.run_name for c in children) == sorted(f"lr={lr}" for lr in rates)
    assert len(runs) == len(rates) + 1 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(float(c.data.params["model.learning_rate"]) for c in children) == rates
    keys = {frozenset(c.data.metrics) for c in children}
    assert len(keys) == 1 and {"train/loss", "val/loss", "test/accuracy", "w/mean radius"} <= next(iter(keys))

    client = MlflowClient(tracking_uri)
    results = pd.read_csv(client.download_artifacts(parent.info.run_id, "sweep_results.csv", str(tmp_path)))
    assert sorted(results["model.learning_rate"]) == rates
    for child in children:  # the table holds each child's final metrics as MLflow has them
        row = results[results.run_id == child.info.run_id].iloc[0]
        assert row["val/loss"] == pytest.approx(child.data.metrics["val/loss"], rel=1e-12)
    best = min(children, key=lambda c: c.data.metrics["val/loss"])
    assert [c.info.run_id for c in children if "best" in c.data.tags] == [best.info.run_id]
    assert best.info.run_id in parent.data.tags["best_run"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/sweep_loss_curves.png" in plots


def test_sweep_over_an_unknown_key_is_refused_before_any_run(tracking_uri, runs_of, capsys):
    assert train([*SHORT, "--sweep.grid", "{model.lr: [0.1, 1.0]}"]) == 2
    assert "sweep.grid: 'model.lr'" in capsys.readouterr().err
    assert runs_of(tracking_uri) == []
