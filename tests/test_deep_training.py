"""configs/deep.yaml trains a network that separates data the single neuron cannot, and tracks it per layer."""

from pathlib import Path

from mlflow import MlflowClient

from neuron_torch.cli.commands import train

DEEP = str(Path(__file__).resolve().parents[1] / "configs" / "deep.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]


def test_deep_config_solves_circles_where_the_neuron_cannot(tracking_uri, runs_of, capsys):
    assert train(["--config", DEEP, *QUIET]) == 0
    assert train(["--config", DEEP, *QUIET, "--model.hidden_sizes", "[]", "--model.init", "zeros",
                  "--mlflow.run_name", "neuron"]) == 0
    runs = {r.data.tags["network"]: r for r in runs_of(tracking_uri)}
    deep, neuron = runs["DeepNetwork"], runs["SingleNeuron"]
    assert deep.info.status == neuron.info.status == "FINISHED"
    assert deep.data.metrics["test/accuracy"] >= 0.95
    assert neuron.data.metrics["test/accuracy"] <= 0.65  # a line through concentric circles: near chance

    # per-layer tracking: weight and gradient norms, and the dead share of each ReLU layer
    for layer in (1, 2):
        for key in ("weight_norm", "grad_norm", "dead_relu"):
            assert f"layer{layer}/{key}" in deep.data.metrics
        assert 0 <= deep.data.metrics[f"layer{layer}/dead_relu"] <= 1
    assert {"layer3/weight_norm", "layer3/grad_norm"} <= set(deep.data.metrics)
    assert "layer3/dead_relu" not in deep.data.metrics  # the sigmoid output has no ReLU
    assert not any(k.startswith("w/") for k in deep.data.metrics)

    client = MlflowClient(tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(deep.info.run_id)}
    assert {"weights.csv", "trajectory.parquet", "config.yaml"} <= artifacts
    plots = {a.path for a in client.list_artifacts(deep.info.run_id, "plots")}
    assert {f"plots/{name}.png" for name in ("decision_boundary", "loss_curves", "trajectories", "roc",
                                             "confusion_matrix")} <= plots
    for name in plots:
        png = Path(client.download_artifacts(deep.info.run_id, name, "."))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deep_config_on_a_users_csv(tracking_uri, runs_of, write_table):
    """Switching to three layers is config alone, on any CSV: here an XOR table with string labels."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, size=(600, 2))
    label = np.where(X[:, 0] * X[:, 1] > 0, "same", "different")
    write_table("xor.csv", pd.DataFrame({"u": X[:, 0], "v": X[:, 1], "sign": label}))
    assert train(["--config", DEEP, *QUIET, "--data.path", "xor.csv", "--data.target", "sign",
                  "--data.positive_label", "same"]) == 0
    (run,) = runs_of(tracking_uri)
    assert run.data.metrics["test/accuracy"] >= 0.9
