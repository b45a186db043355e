"""Training against a real ``mlflow server`` over HTTP, with artifacts proxied to the server's own folder.

The server listens on 127.0.0.1 at a free port, stores runs in its own sqlite file and artifacts under
``--artifacts-destination``; the client side (``train``, ``predict``, ``MlflowClient``) sees nothing but
``http://127.0.0.1:PORT``. Starting the server takes 10-30 s on a small machine, so it is started once for the
module and always stopped with its whole process group.
"""

from __future__ import annotations

import math
import shutil
import sys
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.datasets import load_breast_cancer

from neuron_torch.cli.commands import predict, train
from processes import free_port, http_get, kill_group, start_mlflow

FAST = ["--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10"]
START_TIMEOUT = 90.0  # seconds for the server to answer /health (it migrates nothing: the store is pre-made)
ARTIFACT_NAMES = {"config.yaml", "weights.csv", "trajectory.parquet", "MLmodel", "weights.pt", "meta.json"}

@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_store):
    """A tracking server on 127.0.0.1:<free port>: sqlite store and proxied artifacts in its own folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(empty_store, folder / "server.db")  # tables already made: no migrations at start-up
    artifacts = folder / "artifacts"
    port = free_port()
    proc = start_mlflow([sys.executable, "-m", "mlflow", "server",
                         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                         "--artifacts-destination", str(artifacts),
                         "--serve-artifacts",
                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], port, folder,
                        START_TIMEOUT)
    try:
        yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", artifacts=artifacts, folder=folder, proc=proc)
    finally:
        kill_group(proc)


@pytest.fixture
def client_of(server, tmp_path, monkeypatch):
    """The test runs in tmp_path with ``MLFLOW_TRACKING_URI`` at the server; mlflow's global URI is put back."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # a hung server fails the test, not the session
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    saved = tracking_utils._tracking_uri  # train() calls mlflow.set_tracking_uri; do not leak a dead server
    yield MlflowClient(server.uri)
    tracking_utils._tracking_uri = saved


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_training_logs_to_a_tracking_server_with_proxied_artifacts(server, client_of, tmp_path):
    client = client_of
    assert train(FAST) == 0

    experiment = client.get_experiment_by_name("neuron_torch")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's proxy, not a local path
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED", run.data.tags.get("error")

    # metrics at every update (the default cadence gives ~100 points, so a 30-update run logs each one);
    # zero weights start at log(2)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert [step for step, _ in loss] == list(range(31))  # and the last update's result
    assert all(math.isfinite(value) for _, value in loss)
    assert loss[0][1] == pytest.approx(math.log(2), rel=1e-5) and loss[-1][1] < loss[0][1]
    assert {"val/loss", "val/accuracy", "test/accuracy", "test/auroc"} <= set(run.data.metrics)
    assert run.data.metrics["test/accuracy"] > 0.8
    # params: the resolved config, dotted
    assert run.data.params["model.learning_rate"] == "0.5"
    assert run.data.params["trainer.max_steps"] == "30"
    assert run.data.params["mlflow.experiment"] == "neuron_torch"

    # artifacts: listed and downloaded through the server
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "weights.csv", "trajectory.parquet"} <= listed, listed
    downloads = tmp_path.parent / f"{tmp_path.name}-downloads"  # outside the cwd checked below
    downloads.mkdir()
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(downloads))).read_text())
    assert config["model"]["learning_rate"] == 0.5 and config["trainer"]["max_steps"] == 30
    weights = pd.read_csv(client.download_artifacts(run_id, "weights.csv", str(downloads)))
    assert list(weights.columns) == ["feature", "weight", "bias"] and len(weights) == 30
    trajectory = pd.read_parquet(client.download_artifacts(run_id, "trajectory.parquet", str(downloads)))
    assert trajectory["step"].tolist() == list(range(31))  # 30 updates' start states, and the last result
    np.testing.assert_allclose(trajectory["train/loss"], [value for _, value in loss], rtol=1e-6)
    # the same bytes from the server's plain HTTP endpoint, the one its UI uses
    query = urllib.parse.urlencode({"path": "weights.csv", "run_uuid": run_id})
    assert http_get(f"{server.uri}/get-artifact?{query}") == (downloads / "weights.csv").read_bytes()

    # the files live in the server's --artifacts-destination; none was written where the client ran
    stored = files_under(server.artifacts)
    for name in ("config.yaml", "weights.csv", "trajectory.parquet", "MLmodel", "weights.pt"):
        assert any(Path(path).name == name for path in stored), (name, sorted(stored))
    local = files_under(tmp_path)
    assert not {path for path in local if Path(path).name in ARTIFACT_NAMES}, sorted(local)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to the default local store
    assert {Path(path).parts[0] for path in local} <= {"checkpoints"}, sorted(local)

    # predict with the model the server holds, against MLflow's own loader
    import mlflow
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).data.iloc[::7].reset_index(drop=True)
    source, scored_path = downloads / "new.csv", downloads / "scored.csv"
    frame.to_csv(source, index=False)
    uri = f"runs:/{run_id}/model"
    assert predict(["--model", uri, "--input", str(source), "--output", str(scored_path)]) == 0
    scored = pd.read_csv(scored_path)
    assert list(scored.columns) == list(frame.columns) + ["probability", "prediction"]
    expected = mlflow.pyfunc.load_model(uri).predict(frame)
    np.testing.assert_allclose(scored["probability"], expected, rtol=1e-12)
    assert (scored["prediction"] == np.where(np.asarray(expected) >= 0.5, "benign", "malignant")).all()
    assert scored["prediction"].nunique() == 2  # both classes among the scored rows
    assert {Path(path).parts[0] for path in files_under(tmp_path)} <= {"checkpoints"}


def test_sweep_and_registered_model_over_http(server, client_of, tmp_path):
    """A two-point sweep into the server (parent, children, overlay and table as proxied artifacts), its
    best child's model registered by config and scored through a models:/ URI."""
    client = client_of
    assert train(FAST + ["--mlflow.experiment", "sweep-over-http", "--sweep.grid",
                         "{model.learning_rate: [0.05, 0.5]}", "--mlflow.register_as", "neuron-http"]) == 0
    experiment = client.get_experiment_by_name("sweep-over-http")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == ["lr=0.05", "lr=0.5"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep_results.csv", "plots"}
    versions = client.search_model_versions("name = 'neuron-http'")
    assert sorted(v.run_id for v in versions) == sorted(c.info.run_id for c in children)

    frame = load_breast_cancer(as_frame=True).data.head(20)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    assert predict(["--model", "models:/neuron-http/1", "--input", str(tmp_path / "rows.csv"),
                    "--output", str(tmp_path / "scored.csv")]) == 0
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert scored.probability.between(0, 1).all() and len(scored) == 20
