"""On a CUDA device: the hand-written gradients agree with the CPU in float64, and a GPU run trains and is tracked.

The whole module is skipped, with the reason shown, where ``torch.cuda.is_available()`` is False. The gradient
tests need only torch (benchmarks/gpu_check.sh runs them on a bare GPU machine); the tracked run also needs the
CLI's and MLflow's packages and skips, naming them, without.
"""

from __future__ import annotations

import importlib.util
import math

import lightning as L
import numpy as np
import pytest
import torch

from neuron_torch import DeepNetwork, SingleNeuron

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: torch.cuda.is_available() is False")
RUN_NEEDS = [name for name in ("mlflow", "pandas", "jsonargparse", "sklearn") if importlib.util.find_spec(name) is None]

DEVICE = "cuda"
FAST = ["--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10"]


def breast_cancer_standardised() -> tuple[torch.Tensor, torch.Tensor]:
    """Breast cancer, standardised; without scikit-learn a generated table of its shape (569×30), standardised,
    with labels from a noisy linear rule."""
    if importlib.util.find_spec("sklearn") is None:
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(569, 30, generator=gen, dtype=torch.float64) @ torch.randn(30, 30, generator=gen,
                                                                                   dtype=torch.float64)
        X = (X - X.mean(0)) / X.std(0)
        y = (X[:, :3].sum(1) + torch.randn(569, generator=gen, dtype=torch.float64) > 0).double()
        return X, y.unsqueeze(1)
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return torch.from_numpy(X), torch.from_numpy(y.astype(np.float64)).unsqueeze(1)


@pytest.mark.parametrize("make", [
    lambda n, g: SingleNeuron(n, "xavier", generator=g),
    lambda n, g: SingleNeuron(n, "normal", l2=0.1, generator=g),
    lambda n, g: DeepNetwork(n, [16, 8], "relu", "he", generator=g),
    lambda n, g: DeepNetwork(n, [12], "tanh", "xavier", l2=0.01, generator=g),
], ids=["neuron-xavier", "neuron-l2", "deep-relu", "deep-tanh-l2"])
def test_cuda_float32_gradients_match_cpu_float64(make):
    X, Y = breast_cancer_standardised()
    reference = make(X.shape[1], torch.Generator().manual_seed(0)).double()
    on_device = make(X.shape[1], torch.Generator().manual_seed(1)).float().to(DEVICE)
    on_device.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})

    expected = reference.forward_backward(X, Y)
    got = on_device.forward_backward(X.float().to(DEVICE), Y.float().to(DEVICE))
    assert got.loss.device.type == DEVICE and got.loss.dtype == torch.float32
    assert float(got.loss) == pytest.approx(float(expected.loss), abs=1e-5)
    assert list(got.gradients) == list(expected.gradients)
    for name, grad in expected.gradients.items():
        assert got.gradients[name].device.type == DEVICE
        assert got.gradients[name].shape == grad.shape
        torch.testing.assert_close(got.gradients[name].double().cpu(), grad, atol=1e-5, rtol=0, msg=name)
    # not trivially zero: the comparison means something
    assert max(float(g.abs().max()) for g in expected.gradients.values()) > 1e-3


class OnDevice(L.Callback):
    """Checks every training batch and the parameters sit on the GPU in the run's dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.batches = dtype, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        X, Y = batch
        assert X.device.type == DEVICE and Y.device.type == DEVICE
        assert X.dtype == self.dtype
        assert all(p.device.type == DEVICE and p.dtype == self.dtype for p in pl_module.parameters())
        self.batches += 1


def run_with(monkeypatch, args, callbacks=()):
    import neuron_torch.cli.config as cli_module
    from neuron_torch.cli.commands import train

    original, built = cli_module.build_cli, []

    def keep(a=None):
        cli = original(a)
        cli.trainer.callbacks.extend(callbacks)
        built.append(cli)
        return cli

    monkeypatch.setattr(cli_module, "build_cli", keep)
    code = train(args)
    monkeypatch.setattr(cli_module, "build_cli", original)
    return code, built[-1]


@pytest.mark.skipif(bool(RUN_NEEDS), reason=f"a tracked run needs {', '.join(RUN_NEEDS)} (not installed)")
@pytest.mark.parametrize("precision, dtype, atol", [("32-true", torch.float32, 1e-4),
                                                     ("64-true", torch.float64, 1e-9)])
def test_gpu_run_finishes_and_matches_the_cpu(precision, dtype, atol, tracking_uri, runs_of, monkeypatch,
                                              tmp_path):
    import pandas as pd
    from mlflow import MlflowClient

    check = OnDevice(dtype)
    code, cli = run_with(monkeypatch, FAST + ["--trainer.accelerator", "gpu", "--trainer.devices", "1",
                                              "--trainer.precision", precision], [check])
    assert code == 0
    assert check.batches == 30
    assert cli.trainer.global_step == 30
    gpu_run = runs_of(tracking_uri)[0]
    assert gpu_run.info.status == "FINISHED"
    assert gpu_run.data.params["trainer.accelerator"] == "gpu"
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(client.download_artifacts(gpu_run.info.run_id, "trajectory.parquet", str(tmp_path / "t")))
    assert traj["step"].tolist() == list(range(30))
    assert traj.loc[0, "train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert gpu_run.data.metrics["test/accuracy"] >= 0.9

    # the same 30 updates on the CPU in float64
    code, _ = run_with(monkeypatch, FAST + ["--trainer.accelerator", "cpu", "--trainer.precision", "64-true"])
    assert code == 0
    cpu_run = next(r for r in runs_of(tracking_uri) if r.info.run_id != gpu_run.info.run_id)
    assert cpu_run.info.status == "FINISHED"
    weights = [pd.read_csv(client.download_artifacts(r.info.run_id, "weights.csv", str(tmp_path / f"w{i}")))
               for i, r in enumerate((gpu_run, cpu_run))]
    np.testing.assert_allclose(weights[0]["weight"], weights[1]["weight"], atol=atol)
    np.testing.assert_allclose(weights[0]["bias"], weights[1]["bias"], atol=atol)
    assert [r.info.status for r in runs_of(tracking_uri)] == ["FINISHED", "FINISHED"]


def test_bfloat16_storage_trains_like_float32(tmp_path):
    """X stored as bfloat16 (data.dtype) through Lightning: the loss and accuracy of float32 storage, within
    bfloat16's rounding of the inputs (8 bits of mantissa: relative 2⁻⁸ per value)."""
    pytest.importorskip("sklearn", reason="the breast-cancer table comes from scikit-learn")
    from neuron_torch.data.datamodule import NeuronDataModule
    from neuron_torch.train.module import NeuronModule

    results = {}
    for dtype in ("model", "bfloat16"):
        data = NeuronDataModule(dtype=dtype)
        module = NeuronModule(data.feature_names, classes=data.classes, learning_rate=0.5, updates_per_step=10)
        trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=300, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=data)
        results[dtype] = trainer.test(module, datamodule=data, verbose=False)[0]
    assert abs(results["bfloat16"]["test/loss"] - results["model"]["test/loss"]) < 0.01
    assert abs(results["bfloat16"]["test/accuracy"] - results["model"]["test/accuracy"]) <= 0.02
