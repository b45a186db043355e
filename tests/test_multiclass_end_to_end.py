"""k classes from the command line to a scored file: train, the run's records, predict, load, resume, Newton.

Two runs are shared by most tests: iris written to CSV with string labels (4 features, 3 classes), and a
synthetic table of 2 features with 4 numeric labels (so the decision regions are drawn and the predictions
must come back as numbers). Both train through ``neuron_torch.cli.commands.main(["train", ...])``, as the console
script does, into throw-away sqlite stores; the Lightning module is kept to compare against what was logged.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import conftest
import neuron_torch
import neuron_torch.cli.config as cli_module
from neuron_torch.cli.commands import main
from neuron_torch.errors import ModelLoadError
from neuron_torch.tracking.uri import fluent_tracking_uri

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
IRIS_CLASSES = ["setosa", "versicolor", "virginica"]
NUMERIC_LABELS = [2, 4, 6, 8]  # sorted order is class order; written back as integers, not "2"
STEPS = 60


def iris_frame() -> pd.DataFrame:
    """Iris with plain column names and the species names as labels, (150, 5)."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    frame = pd.DataFrame(iris.data, columns=IRIS_FEATURES)
    frame["species"] = np.asarray(iris.target_names)[iris.target]
    return frame


def numeric_frame(m: int = 240, seed: int = 0) -> pd.DataFrame:
    """Four well-separated blobs in the plane, labels 2, 4, 6, 8, (m, 3)."""
    rng = np.random.default_rng(seed)
    index = np.arange(m) % 4
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
    X = centres[index] + rng.normal(scale=0.6, size=(m, 2))
    return pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "label": np.asarray(NUMERIC_LABELS)[index]})


class KeepCLI:
    """Stands in for ``neuron_torch.cli.config.build_cli`` and keeps what it built (the trained module)."""

    def __init__(self, original):
        self.original, self.built = original, []

    def __call__(self, args=None):
        self.built.append(self.original(args))
        return self.built[-1]


def train_into(folder: Path, store: Path, args: list[str]) -> SimpleNamespace:
    """``neuron-torch train ARGS`` in ``folder`` into a copy of ``store``: exit code, run, module and URI."""
    db = folder / "mlflow.db"
    shutil.copyfile(store, db)
    uri = f"sqlite:///{db}"
    keeper = KeepCLI(cli_module.build_cli)
    with pytest.MonkeyPatch.context() as mp, conftest.own_log_handler():
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(sys, "argv", ["neuron-torch"])  # main() rewrites sys.argv for LightningCLI
        mp.setattr(cli_module, "build_cli", keeper)
        code = main(["train", *args])
    runs = conftest.all_runs(uri)
    assert len(runs) == 1, [r.info.status for r in runs]
    return SimpleNamespace(code=code, uri=uri, folder=folder, run=runs[0], run_id=runs[0].info.run_id,
                           module=keeper.built[-1].model, client=MlflowClient(uri))


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory, empty_store, fast_args):
    folder = tmp_path_factory.mktemp("iris")
    iris_frame().to_csv(folder / "iris.csv", index=False)
    args = ["--data.path", "iris.csv", "--data.target", "species", *fast_args, "--trainer.max_steps", str(STEPS),
            "--mlflow.log_every_n_steps", "1"]
    done = train_into(folder, empty_store, args)
    done.table, done.classes, done.features, done.target = "iris.csv", IRIS_CLASSES, IRIS_FEATURES, "species"
    done.values = IRIS_CLASSES
    return done


@pytest.fixture(scope="module")
def numeric_run(tmp_path_factory, empty_store, fast_args):
    folder = tmp_path_factory.mktemp("numeric")
    numeric_frame().to_csv(folder / "blobs.csv", index=False)
    args = ["--data.path", "blobs.csv", "--data.target", "label", *fast_args, "--trainer.max_steps", str(STEPS),
            "--trainer.enable_checkpointing", "false"]
    done = train_into(folder, empty_store, args)
    done.table, done.classes, done.features, done.target = "blobs.csv", ["2", "4", "6", "8"], ["x1", "x2"], "label"
    done.values = NUMERIC_LABELS
    return done


@pytest.fixture(params=["iris", "numeric"])
def trained(request):
    return request.getfixturevalue(f"{request.param}_run")


def raw_rows(run) -> pd.DataFrame:
    """The training table as written, read back (features and label)."""
    return pd.read_csv(run.folder / run.table)


def in_store(run, tmp_path, monkeypatch) -> None:
    """Run the rest of the test in ``tmp_path`` against ``run``'s store, as a user scoring with it would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run.uri)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    paths = []
    for item in client.list_artifacts(run_id, path):
        paths += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return paths


# --- what the run records -----------------------------------------------------------------------------------------


def test_run_finishes_with_multiclass_metrics_and_per_class_parameters(trained):
    assert trained.code == 0
    assert trained.run.info.status == "FINISHED"
    assert trained.module.classes == trained.classes
    metrics = trained.run.data.metrics
    for name in ("val/accuracy", "val/loss", "val/f1", "test/accuracy", "test/precision", "test/recall",
                 "test/f1", "test/auroc", "train/loss"):
        assert name in metrics, name
    expected = {f"b/{c}" for c in trained.classes} | {f"w/{c}/{f}" for c in trained.classes for f in trained.features}
    assert expected <= set(metrics)
    assert not {"b", *(f"w/{f}" for f in trained.features)} & set(metrics)  # binary names are not reused

    # the last logged w/<class>/<feature> and b/<class> are the trained parameters (float32 to float64)
    W = trained.module.net.linear.weight.detach().double().numpy()  # (k, n)
    b = trained.module.net.linear.bias.detach().double().numpy()  # (k,)
    for j, c in enumerate(trained.classes):
        assert metrics[f"b/{c}"] == pytest.approx(b[j], abs=1e-6)
        for i, f in enumerate(trained.features):
            assert metrics[f"w/{c}/{f}"] == pytest.approx(W[j, i], abs=1e-6)


def test_weights_table_has_a_class_column(trained, tmp_path):
    table = pd.read_csv(trained.client.download_artifacts(trained.run_id, "weights.csv", str(tmp_path)),
                        dtype={"class": str})
    k, n = len(trained.classes), len(trained.features)
    assert list(table.columns) == ["class", "feature", "weight", "bias"] and len(table) == k * n
    assert list(table["class"].unique()) == trained.classes
    W = trained.module.net.linear.weight.detach().double().numpy()
    b = trained.module.net.linear.bias.detach().double().numpy()
    np.testing.assert_allclose(table["weight"].to_numpy().reshape(k, n), W, rtol=0, atol=1e-7)
    np.testing.assert_allclose(table.groupby("class", sort=False)["bias"].first().to_numpy(), b, rtol=0, atol=1e-7)


def test_figures_include_a_confusion_matrix(trained):
    plots = {p for p in artifact_paths(trained.client, trained.run_id) if p.startswith("plots/")}
    assert {"plots/confusion_matrix.png", "plots/roc.png", "plots/trajectories.png", "plots/loss_curves.png"} <= plots
    assert ("plots/decision_boundary.png" in plots) == (len(trained.features) == 2)


def test_confusion_matrix_names_every_class():
    from neuron_torch.tracking import figures as plots

    y = np.array([0, 1, 2, 2, 1])
    P = np.eye(3)[[0, 2, 2, 1, 1]]  # (5, 3): one row wrong each way between classes 1 and 2
    fig = plots.confusion_matrix(y, P, ["setosa", "versicolor", "virginica"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["true setosa", "true versicolor", "true virginica"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pred setosa", "pred versicolor", "pred virginica"]
    counts = ax.images[0].get_array()
    np.testing.assert_array_equal(counts, [[1, 0, 0], [0, 1, 1], [0, 1, 1]])


def test_model_meta_holds_every_class(trained, tmp_path):
    import json

    with fluent_tracking_uri(trained.uri):  # runs:/ of a logged model resolves through the fluent API's store
        folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained.run_id}/model", dst_path=str(tmp_path)))
    meta = json.loads(next(folder.rglob("meta.json")).read_text())
    assert meta["classes"] == trained.classes and meta["feature_names"] == trained.features
    schema = mlflow.models.Model.load(folder).get_output_schema()
    assert schema.input_names() == [f"probability_{c}" for c in trained.classes]


# --- prediction ---------------------------------------------------------------------------------------------------


def test_predict_writes_a_probability_per_class_and_the_original_label(trained, tmp_path, monkeypatch):
    in_store(trained, tmp_path, monkeypatch)
    rows = raw_rows(trained)
    source, output = tmp_path / "new.csv", tmp_path / "scored.csv"
    rows.drop(columns=trained.target).to_csv(source, index=False)
    with conftest.project_log() as log:
        code = main(["predict", "--model", f"runs:/{trained.run_id}/model", "--input", str(source),
                     "--output", str(output)])
    assert code == 0
    scored = pd.read_csv(output)
    columns = [f"probability_{c}" for c in trained.classes]
    assert list(scored.columns) == trained.features + columns + ["prediction"]
    P = scored[columns].to_numpy()  # (m, k)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert set(scored["prediction"]) <= set(trained.values)
    # the original label values: numbers stay numbers in the file (2, not "2" or 2.0)
    assert pd.api.types.is_integer_dtype(scored["prediction"]) == (trained.values == NUMERIC_LABELS)
    np.testing.assert_array_equal(scored["prediction"].to_numpy(), np.asarray(trained.values, dtype=object)[P.argmax(1)])
    assert (scored["prediction"].to_numpy() == rows[trained.target].to_numpy()).mean() > 0.8  # it learned

    said = log.getvalue()
    counts = scored["prediction"].value_counts()
    assert f"{len(rows)} rows scored" in said
    for label, value in zip(trained.classes, trained.values):
        assert f"{counts.get(value, 0)} {label!r}" in said


def test_load_model_and_pyfunc_give_the_modules_probabilities(trained):
    rows = raw_rows(trained).drop(columns=trained.target)
    expected = trained.module.predict_proba(torch.tensor(rows.to_numpy())).double().numpy()  # (m, k)

    loaded = neuron_torch.load_model(f"runs:/{trained.run_id}/model", trained.uri)
    P = loaded.predict_proba(rows)
    assert P.shape == (len(rows), len(trained.classes))
    # the module runs in float32, the loaded network in float64: a float32 rounding apart
    np.testing.assert_allclose(P, expected, rtol=0, atol=1e-6)
    assert list(loaded.predict(rows)) == [trained.classes[j] for j in P.argmax(1)]

    with fluent_tracking_uri(trained.uri):
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{trained.run_id}/model")
        frame = pyfunc.predict(rows)
    assert list(frame.columns) == [f"probability_{c}" for c in trained.classes]
    np.testing.assert_allclose(frame.to_numpy(), P, rtol=0, atol=1e-12)  # the same float64 network


def test_a_deep_k_class_network_loads_and_scores(tmp_path, empty_store, fast_args, monkeypatch):
    iris_frame().to_csv(tmp_path / "iris.csv", index=False)
    done = train_into(tmp_path, empty_store, ["--data.path", "iris.csv", "--data.target", "species", *fast_args,
                                              "--model.hidden_sizes", "[5]", "--trainer.enable_checkpointing",
                                              "false"])
    assert done.code == 0 and done.run.info.status == "FINISHED"
    assert "plots/confusion_matrix.png" in artifact_paths(done.client, done.run_id, "plots")
    rows = iris_frame().drop(columns="species")
    expected = done.module.predict_proba(torch.tensor(rows.to_numpy())).double().numpy()  # (150, 3)
    P = neuron_torch.load_model(f"runs:/{done.run_id}/model", done.uri).predict_proba(rows)
    np.testing.assert_allclose(P, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("classes, fragment", [
    (["setosa"], "at least two labels"),
    (["setosa", "setosa", "virginica"], "twice"),
    (["setosa", "versicolor", "virginica", "other"], "does not fit"),  # 4 classes, weights for 3
    (["setosa", "versicolor"], "does not fit"),  # a sigmoid unit, weights for a softmax of 3
], ids=["one class", "a label twice", "more classes than outputs", "two classes for three outputs"])
def test_a_meta_json_that_does_not_describe_the_weights_is_refused(classes, fragment, iris_run, tmp_path):
    import json

    with fluent_tracking_uri(iris_run.uri):
        folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{iris_run.run_id}/model", dst_path=str(tmp_path)))
    meta_path = next(folder.rglob("meta.json"))
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "classes": classes}))
    with pytest.raises(ModelLoadError, match=fragment):
        neuron_torch.load_model(str(folder))


def test_threshold_is_refused_for_a_k_class_model(iris_run, tmp_path, capsys, monkeypatch):
    in_store(iris_run, tmp_path, monkeypatch)
    source = tmp_path / "new.csv"
    raw_rows(iris_run).to_csv(source, index=False)
    code = main(["predict", "--model", f"runs:/{iris_run.run_id}/model", "--input", str(source),
                 "--output", str(tmp_path / "out.csv"), "--threshold", "0.7"])
    assert code == 2
    conftest.one_error_line(capsys.readouterr().err, "--threshold", "3 classes")
    assert not (tmp_path / "out.csv").exists()


def test_a_taken_probability_column_is_refused(iris_run, tmp_path, capsys, monkeypatch):
    in_store(iris_run, tmp_path, monkeypatch)
    source = tmp_path / "new.csv"
    raw_rows(iris_run).assign(probability_setosa=0.5).to_csv(source, index=False)
    code = main(["predict", "--model", f"runs:/{iris_run.run_id}/model", "--input", str(source),
                 "--output", str(tmp_path / "out.csv")])
    assert code == 2
    conftest.one_error_line(capsys.readouterr().err, "new.csv", "'probability_setosa'")


# --- resume, Newton -----------------------------------------------------------------------------------------------


def test_a_k_class_run_resumes_from_its_checkpoint(iris_run, tmp_path, empty_store, fast_args):
    (ckpt,) = Path(iris_run.folder, "checkpoints", iris_run.run_id).glob(f"*step={STEPS}*.ckpt")
    shutil.copyfile(iris_run.folder / "iris.csv", tmp_path / "iris.csv")
    resumed = train_into(tmp_path, empty_store, ["--data.path", "iris.csv", "--data.target", "species", *fast_args,
                                                 "--trainer.max_steps", str(2 * STEPS), "--ckpt_path", str(ckpt),
                                                 "--mlflow.log_every_n_steps", "1"])
    assert resumed.code == 0 and resumed.run.info.status == "FINISHED"
    assert resumed.run.data.tags["resumed_from"] == iris_run.run_id
    steps = sorted(m.step for m in resumed.client.get_metric_history(resumed.run_id, "b/setosa"))
    assert steps[0] == STEPS and steps[-1] == 2 * STEPS  # the axis continues where the first run stopped
    first_loss = iris_run.run.data.metrics["train/loss"]
    assert resumed.run.data.metrics["train/loss"] < first_loss  # training went on, it did not start over


def test_newton_reaches_scikit_learns_multinomial_optimum(tmp_path, empty_store):
    """Every row, raw features, float64: the converged loss is scikit-learn's penalised optimum."""
    from sklearn.linear_model import LogisticRegression

    frame = iris_frame()
    frame.to_csv(tmp_path / "iris.csv", index=False)
    l2 = 0.01
    done = train_into(tmp_path, empty_store, [
        "--data.path", "iris.csv", "--data.target", "species", "--data.val_fraction", "0", "--data.test_fraction",
        "0", "--data.standardize", "false", "--model.update_rule", "newton", "--model.learning_rate", "1",
        "--model.l2", str(l2), "--trainer.precision", "64-true", "--trainer.max_steps", "25",
        "--trainer.val_check_interval", "25", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_checkpointing", "false", "--mlflow.log_every_n_steps", "1"])
    assert done.code == 0 and done.run.info.status == "FINISHED"

    X, y = frame[IRIS_FEATURES].to_numpy(), frame["species"].map(IRIS_CLASSES.index).to_numpy()
    m = len(y)
    clf = LogisticRegression(C=1 / (l2 * m), tol=1e-12, max_iter=100_000).fit(X, y)
    Z = X @ clf.coef_.T + clf.intercept_  # (m, k)
    # scikit-learn minimises C·Σ cross-entropy + ½‖W‖²; divided by C·m it is this run's loss
    optimum = np.mean(np.logaddexp.reduce(Z, axis=1) - Z[np.arange(m), y]) + l2 / 2 * np.sum(clf.coef_ ** 2)
    history = sorted((h.step, h.value) for h in done.client.get_metric_history(done.run_id, "train/loss"))
    assert history[-1][0] == 25
    assert history[-1][1] == pytest.approx(optimum, abs=1e-6)

    P = neuron_torch.load_model(f"runs:/{done.run_id}/model", done.uri).predict_proba(frame[IRIS_FEATURES])
    np.testing.assert_allclose(P, clf.predict_proba(X), rtol=0, atol=1e-5)


def test_newton_too_large_for_its_hessian_is_one_line(tracking_uri, runs_of, write_table, capsys):
    rng = np.random.default_rng(0)
    m, n, k = 400, 300, 30
    frame = pd.DataFrame(rng.normal(size=(m, n)), columns=[f"f{i}" for i in range(n)]).assign(label=np.arange(m) % k)
    path = write_table("wide.parquet", frame)
    code = main(["train", "--data.path", str(path), "--data.target", "label", "--model.update_rule", "newton",
                 "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    assert code == 2
    conftest.one_error_line(capsys.readouterr().err, "newton", f"{(n + 1) * k}", "30 classes")
    assert runs_of(tracking_uri) == []  # refused before any run exists


def test_metric_keys_take_names_mlflow_refuses():
    """Feature and label names with characters MLflow's keys refuse (iris: ``sepal length (cm)``) are tracked
    under keys with ``_`` in their place, one key per name; the trajectory keeps the names."""
    from neuron_torch.tracking.writer import metric_keys

    names = ["train/loss", "w/setosa/sepal length (cm)", "b/a+b", "w/../x", "w//y", "a(b", "a)b"]
    keys = metric_keys(names)
    assert keys == ["train/loss", "w/setosa/sepal length _cm_", "b/a_b", "w/__/x", "w/_/y", "a_b", "a_b_2"]
    from mlflow.utils.validation import _validate_metric_name

    for key in keys:
        _validate_metric_name(key)  # raises on a key MLflow refuses
