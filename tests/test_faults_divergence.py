"""Divergence is caught at the update where it happens: one line, a FAILED run with the reason, a checkpoint of
the last finite state (the same state a run of exactly that many updates ends in), no model logged."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from neuron_torch.cli.commands import train

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "50"]
DEEP = str(Path(__file__).resolve().parents[1] / "configs" / "deep.yaml")

CASES = {
    # ReLU layers at α = 1e10: the gradient norm overflows float32 within a few updates
    "deep-huge-lr": ["--config", DEEP, "--data.n_samples", "300", "--model.learning_rate", "1e10",
                     "--trainer.max_steps", "200"],
    # Newton at α = 1e30: the parameters (or the Hessian) leave the floats
    "newton-huge-lr": ["--model.update_rule", "newton", "--model.learning_rate", "1e30", "--trainer.max_steps", "50"],
    # one neuron at α = 1e30 stays finite (the loss is ~1e26): only the growth policy stops it
    "neuron-growth-stop": ["--model.learning_rate", "1e30", "--model.divergence", "stop",
                           "--trainer.max_steps", "100"],
}


def net_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("net.")}


@pytest.mark.parametrize("case", list(CASES))
def test_divergence_stops_at_the_update_with_the_last_finite_state(case, tracking_uri, runs_of, capsys, tmp_path):
    args = QUIET + CASES[case]
    assert train(args + ["--mlflow.run_name", "diverged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training diverged at update ")
    assert "model.learning_rate" in err[-1] and "lower model.learning_rate" in err[-1]
    assert not any("Traceback" in line for line in err)
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["error"]

    client = MlflowClient(tracking_uri)
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}  # nothing predicting NaN
    ckpt = Path(re.search(r"is in (\S+\.ckpt)", err[-1]).group(1))
    steps = int(re.search(r"step=(\d+)", ckpt.name).group(1))
    kept = net_state(ckpt)
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == steps

    # the trajectory holds exactly the updates kept, all finite
    trajectory = pd.read_parquet(client.download_artifacts(run.info.run_id, "trajectory.parquet", str(tmp_path)))
    assert trajectory["step"].tolist() == list(range(steps))
    assert trajectory.drop(columns="step").apply(lambda c: c.map(float)).notna().all().all()

    # a run of exactly that many updates ends in the very same state
    if steps > 0:
        reference = QUIET + CASES[case] + ["--trainer.max_steps", str(steps), "--model.divergence", "warn",
                                           "--mlflow.run_name", "reference"]
        assert train(reference) == 0
        ref_run = next(r for r in runs_of(tracking_uri) if r.info.run_name == "reference")
        (ref_ckpt,) = Path("checkpoints", ref_run.info.run_id).glob("*.ckpt")
        for name, value in net_state(ref_ckpt).items():
            assert torch.equal(kept[name], value), name


def test_loss_growth_warns_once_and_finishes_by_default(tracking_uri, runs_of, capsys):
    assert train(QUIET + ["--model.learning_rate", "1e30", "--trainer.max_steps", "100",
                          "--trainer.enable_checkpointing", "false"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "the training loss grew" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "model.divergence: stop" in warnings[0]
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "FINISHED"


def test_a_healthy_run_is_untouched(tracking_uri, runs_of, capsys):
    assert train(QUIET + ["--trainer.max_steps", "100", "--model.divergence", "stop",
                          "--trainer.enable_checkpointing", "false"]) == 0
    assert "diverg" not in capsys.readouterr().err
    assert [r.info.status for r in runs_of(tracking_uri)] == ["FINISHED"]
