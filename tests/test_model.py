"""The logged MLflow model: pyfunc from code, raw features by name, no pickle; and `neuron-torch predict`."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from neuron_torch.cli.commands import predict, train

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]


@pytest.fixture
def trained(tracking_uri, runs_of):
    assert train(["--trainer.max_steps", "200", *QUIET]) == 0
    (run,) = runs_of(tracking_uri)
    return run


def test_model_scores_raw_features_by_name(trained, tracking_uri):
    model = mlflow.pyfunc.load_model(f"runs:/{trained.info.run_id}/model")
    frame = load_breast_cancer(as_frame=True).data
    probability = model.predict(frame[frame.columns[::-1]])  # columns are matched by name, not position

    # independent reference: standardise with the logged statistics, apply the logged weights by hand
    client = mlflow.MlflowClient(tracking_uri)
    weights = pd.read_csv(client.download_artifacts(trained.info.run_id, "weights.csv", "."))
    X = frame[weights.feature].to_numpy()
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained.info.run_id}/model"))
    meta = json.loads(next(folder.rglob("meta.json")).read_text())
    Z = ((X - meta["feature_mean"]) / meta["feature_std"]) @ weights.weight.to_numpy() + weights.bias[0]
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-Z)), rtol=1e-5, atol=1e-7)
    assert meta["classes"] == ["malignant", "benign"]
    assert "learning_rate: 0.5" in next(folder.rglob("config.yaml")).read_text()  # the config travels along

    # a signature and an input example travel with the model
    assert model.metadata.get_input_schema().input_names() == list(frame.columns)
    assert (folder / "input_example.json").is_file()
    # no pickle: the network is defined by code, the weights load with weights_only=True
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pickle"))
    assert "python_model.pkl" not in {p.name for p in folder.rglob("*")}
    torch.load(next(folder.rglob("weights.pt")), weights_only=True)

    with pytest.raises(Exception, match="mean radius"):
        model.predict(frame.drop(columns=["mean radius"]))


def test_predict_command_writes_probability_and_prediction(trained, tmp_path, capsys):
    frame = load_breast_cancer(as_frame=True).data
    frame.to_csv(tmp_path / "new.csv", index=False)
    uri = f"runs:/{trained.info.run_id}/model"
    assert predict(["--model", uri, "--input", str(tmp_path / "new.csv"), "--output",
                    str(tmp_path / "scored.csv"), "--threshold", "0.7"]) == 0
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert list(scored.columns) == list(frame.columns) + ["probability", "prediction"]
    expected = mlflow.pyfunc.load_model(uri).predict(frame)
    np.testing.assert_allclose(scored.probability, expected, rtol=1e-12)
    # prediction is the original label: label 1 of breast-cancer is 'benign'
    assert (scored.prediction == np.where(expected >= 0.7, "benign", "malignant")).all()

    frame.drop(columns=["worst area"]).to_csv(tmp_path / "short.csv", index=False)
    assert predict(["--model", uri, "--input", str(tmp_path / "short.csv"), "--output",
                    str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "short.csv" in err[-1] and "'worst area'" in err[-1]
    assert not (tmp_path / "x.csv").exists()
    assert predict(["--model", "runs:/0123456789abcdef/model", "--input", str(tmp_path / "new.csv"),
                    "--output", str(tmp_path / "y.csv")]) == 2
