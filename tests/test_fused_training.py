"""``model.fused``: training through the one-pass CPU kernel and through the reference path give the same run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import neuron_torch.cli.config as cli_module
from neuron_torch.kernels import fused
from neuron_torch.cli.commands import train


@pytest.mark.usefixtures("needs_fused")  # skips, saying why, under NEURON_TORCH_FUSED=0 or without a compiler
def test_fused_and_reference_training_agree(tracking_uri, runs_of, monkeypatch, tmp_path):
    built = []
    build = cli_module.build_cli
    monkeypatch.setattr(cli_module, "build_cli", lambda args=None: built.append(build(args)) or built[-1])
    calls = []
    neuron_pass = fused.neuron_pass
    # each call records whether the kernel gave the result (None: it declined, the reference path ran)
    monkeypatch.setattr(fused, "neuron_pass", lambda *a: calls.append(neuron_pass(*a)) or calls[-1])
    trajectories = {}
    for flag in ("true", "false"):
        args = ["--model.fused", flag, "--trainer.precision", "64-true", "--trainer.max_steps", "60",
                "--trainer.val_check_interval", "30", "--trainer.enable_progress_bar", "false",
                "--mlflow.run_name", f"fused-{flag}"]
        calls.clear()
        assert train(args) == 0
        assert built[-1].model.net.fused is (flag == "true")
        assert (len(calls) == 61) is (flag == "true") and (not calls) is (flag == "false")  # 60 updates and the final state's row
        assert all(out is not None for out in calls)  # the kernel itself computed every fused update
        run = next(r for r in runs_of(tracking_uri) if r.info.run_name == f"fused-{flag}")
        path = MlflowClient(tracking_uri).download_artifacts(run.info.run_id, "trajectory.parquet",
                                                             str(tmp_path))
        trajectories[flag] = pd.read_parquet(path)
    fast, reference = trajectories["true"], trajectories["false"]
    assert fast["step"].tolist() == reference["step"].tolist() == list(range(61))
    # float64: the two paths sum in different orders, so they agree to rounding, not bit for bit
    np.testing.assert_allclose(fast.to_numpy(), reference.to_numpy(), rtol=1e-12, atol=1e-13)
