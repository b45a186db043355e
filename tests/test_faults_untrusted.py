"""Untrusted files run no code: checkpoints, weights and the model's files in the store are read as data.

Each tampered file tries to create a marker file when it is unpickled or imported; the marker must never
appear, and the user gets one ``error:`` line (exit code 2). MLflow's own ``pyfunc.load_model`` does run the
store's Python (its trust model): a subprocess shows that the tampering below would bite there.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import all_runs, one_error_line, own_log_handler
from neuron_torch import load_model
from neuron_torch.cli.commands import predict, train
from neuron_torch.cli.config import _global_step_of
from neuron_torch.errors import ModelLoadError

QUIET = ["--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10",
         "--trainer.enable_checkpointing", "false"]


class Payload:
    """Unpickling this object runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def planting(marker: Path) -> str:
    """Python source that writes ``marker`` when imported or executed."""
    return f"open({str(marker)!r}, 'w').write('code ran')\n"


@pytest.fixture(scope="module")
def logged(tmp_path_factory, empty_store):
    """One run trained into its own store, its model registered as ``untrusted``; the store's model folder."""
    folder = tmp_path_factory.mktemp("untrusted-store")
    shutil.copyfile(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp, own_log_handler():
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(sys, "argv", ["train.py"])
        assert train(QUIET + ["--mlflow.register_as", "untrusted"]) == 0
    (run,) = all_runs(uri)
    (model_folder,) = [p.parent for p in folder.glob("mlruns/*/models/*/artifacts/MLmodel")]
    return SimpleNamespace(uri=uri, run_id=run.info.run_id, folder=folder, model=model_folder)


@pytest.fixture
def store(logged, tmp_path, monkeypatch):
    """The module's store for this test (cwd = tmp_path); the model's files are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.uri)
    backup = tmp_path / "model-backup"
    shutil.copytree(logged.model, backup)
    yield logged
    shutil.rmtree(logged.model)
    shutil.copytree(backup, logged.model)


@pytest.fixture
def rows(tmp_path) -> Path:
    from sklearn.datasets import load_breast_cancer

    path = tmp_path / "rows.csv"
    load_breast_cancer(as_frame=True).data.head(12).to_csv(path, index=False)
    return path


# --- checkpoints ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_pickled_checkpoint_runs_no_code(how, tracking_uri, runs_of, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = {"global_step": 5, "state_dict": {}, "hyper_parameters": Payload(marker)}
    path = tmp_path / "evil.ckpt"
    if how == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))

    assert _global_step_of(str(path)) == 0  # read while the command line is parsed
    code = train(QUIET + ["--ckpt_path", str(path)])
    assert not marker.exists()
    assert code == 2
    one_error_line(capsys.readouterr().err, "evil.ckpt", "weights_only")
    assert runs_of(tracking_uri) == []


# --- the model's files in the store ---------------------------------------------------------------------------------


def test_tampered_weights_are_refused_by_every_loader(store, rows, tmp_path, capsys):
    marker = tmp_path / "marker"
    torch.save({"linear.weight": Payload(marker), "linear.bias": torch.zeros(1)}, store.model / "artifacts" / "weights.pt")
    uri = f"runs:/{store.run_id}/model"

    with pytest.raises(ModelLoadError, match="weights.pt is not a plain tensor file"):
        load_model(uri)
    assert predict(["--model", uri, "--input", str(rows), "--output", str(tmp_path / "out.csv")]) == 2
    err = capsys.readouterr().err
    line = one_error_line(err, "weights.pt", "weights_only=True", "it names exec")
    assert err.strip() == line and "\x1b" not in line  # nothing else on stderr, no terminal codes
    assert not (tmp_path / "out.csv").exists()

    import mlflow

    with pytest.raises(Exception, match="[Ww]eights"):  # the pyfunc model loads weights_only=True as well
        mlflow.pyfunc.load_model(uri)
    assert not marker.exists()


def tamper_code(model: Path, marker: Path) -> None:
    """Make the model's Python in the store (the code file and the copied package) write ``marker``."""
    code_files = [model / "pyfunc_model.py", *sorted((model / "code").rglob("*.py"))]
    assert len(code_files) > 5, code_files
    for path in code_files:
        path.write_text(path.read_text() + "\n" + planting(marker))  # after any __future__ import


def test_tampered_code_in_the_store_runs_in_neither_predict_nor_load_model(store, rows, tmp_path, capsys):
    marker = tmp_path / "marker"
    tamper_code(store.model, marker)

    for uri in (f"runs:/{store.run_id}/model", "models:/untrusted/1", str(store.model)):
        model = load_model(uri)
        probability = model.predict_proba(pd.read_csv(rows))
        assert probability.shape == (12,) and np.all((probability > 0) & (probability < 1))
        out = tmp_path / "scored.csv"
        assert predict(["--model", uri, "--input", str(rows), "--output", str(out)]) == 0, capsys.readouterr().err
        scored = pd.read_csv(out)
        np.testing.assert_allclose(scored["probability"], probability, rtol=1e-12)
        assert set(scored["prediction"]) <= {"malignant", "benign"}
    assert not marker.exists()

    # the same store through MLflow's own loader runs that code: the tampering above would have bitten
    script = f"import mlflow; mlflow.pyfunc.load_model({f'runs:/{store.run_id}/model'!r})"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, timeout=240)
    assert marker.exists()


@pytest.mark.parametrize("name, content, fragment", [
    ("meta.json", "{not json", "meta.json"),
    ("meta.json", '{"feature_names": ["a"], "classes": ["x", "y"], "feature_mean": [0], "feature_std": [1]}',
     "does not fit"),
    ("weights.pt", b"\x80\x04not a tensor file", "weights.pt"),
])
def test_broken_model_files_are_one_line(name, content, fragment, store, rows, tmp_path, capsys):
    target = store.model / "artifacts" / name
    (target.write_bytes if isinstance(content, bytes) else target.write_text)(content)
    with pytest.raises(ModelLoadError, match=fragment.replace(".", r"\.")):
        load_model(str(store.model))
    assert predict(["--model", f"runs:/{store.run_id}/model", "--input", str(rows),
                    "--output", str(tmp_path / "out.csv")]) == 2
    one_error_line(capsys.readouterr().err, fragment)


def test_a_uri_that_names_nothing_is_one_line(store, rows, tmp_path, capsys):
    for uri in ("runs:/0123456789abcdef0123456789abcdef/model", "models:/nobody/3", str(tmp_path / "nowhere")):
        assert predict(["--model", uri, "--input", str(rows), "--output", str(tmp_path / "out.csv")]) == 2
        one_error_line(capsys.readouterr().err)
        with pytest.raises(ModelLoadError):
            load_model(uri)


def test_meta_json_cannot_make_loading_allocate(store):
    """A meta.json describing a huge network is compared with weights.pt by shape before anything is built."""
    import json

    path = store.model / "artifacts" / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "hidden_sizes": [10**6, 10**6], "activation": "relu"}))  # 4 TB float32
    with pytest.raises(ModelLoadError, match=r"does not fit .*layers\.1\.weight \[1000000, 1000000\]"):
        load_model(str(store.model))
