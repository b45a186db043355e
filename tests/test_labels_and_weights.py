"""From the command line: k-class labels, a weight column, class weights and fits on every row.

The weighted fit is checked end to end against scikit-learn (Newton to convergence through Lightning, every
row trained on, no standardisation), the way a user would compare the two; the refusals are one line each.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

import conftest
from neuron_torch.cli.commands import train

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
SHORT = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10", *QUIET]


def exit_code(args: list[str]) -> int:
    try:
        return train(args)
    except SystemExit as exc:
        return exc.code


def labelled(m: int = 60, k: int = 3, seed: int = 0) -> pd.DataFrame:
    """Two informative features, string labels ``c0`` … and a weight column ``w``."""
    rng = np.random.default_rng(seed)
    y = np.arange(m) % k
    return pd.DataFrame({"f1": rng.normal(size=m) + y, "f2": rng.normal(size=m) - y,
                         "w": rng.integers(1, 4, m).astype(float), "label": [f"c{c}" for c in y]})


def held_out_row(m: int) -> int:
    """A row the default split (seed 0, 0.2 / 0.2) holds out of training."""
    from neuron_torch.data.split import TRAIN, split_of

    return int(np.flatnonzero(split_of(np.arange(m), 0, 0.2, 0.2) != TRAIN)[0])


CASES = {
    "negative weight": (lambda f: f.assign(w=f.w.where(f.index != 4, -1.0)), ["--data.weight_column", "w"],
                        ["data.csv", "'w'", "row 5", "negative"]),
    "all weights zero": (lambda f: f.assign(w=0.0), ["--data.weight_column", "w"], ["'w'", "every sample weight is 0"]),
    "text weight": (lambda f: f.astype({"w": object}).assign(w=f.w.where(f.index != 2, "heavy")),
                    ["--data.weight_column", "w"], ["'w'", "row 3"]),
    "no weight column": (lambda f: f, ["--data.weight_column", "ww"], ["no column 'ww'", "data.weight_column"]),
    "weight as feature": (lambda f: f, ["--data.weight_column", "w", "--data.features", "[f1, w]"],
                          ["'w'", "sample weights", "cannot also be a feature"]),
    "weight is target": (lambda f: f, ["--data.weight_column", "label"], ["'label'", "target"]),
    "positive label with k": (lambda f: f, ["--data.positive_label", "c1"], ["positive_label", "3 classes"]),
    "continuous label": (lambda f: f.assign(label=np.linspace(0, 1, len(f))), [],
                         ["'label'", "60 distinct values", "not a class label"]),
    "class without training rows": (lambda f: f.assign(label=f.label.where(f.index != held_out_row(len(f)), "c9")),
                                    [], ["class 'c9' has no training rows", "(1 in all)"]),
    "unknown class weight": (lambda f: f, ["--model.class_weight", "{c7: 2}"], ["model.class_weight", "'c7'"]),
    "negative class weight": (lambda f: f, ["--model.class_weight", "{c1: -2}"], ["model.class_weight", "'c1'", ">= 0"]),
    "fraction 1": (lambda f: f, ["--data.val_fraction", "1"], ["data.val_fraction", "[0, 1)"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_refused_in_one_line(case, tracking_uri, runs_of, write_table, capsys):
    change, args, fragments = CASES[case]
    path = write_table("data.csv", change(labelled()))
    code = exit_code(["--data.path", str(path), "--data.target", "label", *args, *SHORT])
    assert code == 2
    conftest.one_error_line(capsys.readouterr().err, *fragments)
    assert runs_of(tracking_uri) == []  # refused before any run exists


def test_every_row_trained_and_said(tracking_uri, runs_of, write_table, capsys):
    path = write_table("data.csv", labelled())
    code = exit_code(["--data.path", str(path), "--data.target", "label", "--data.val_fraction", "0",
                      "--data.test_fraction", "0", *SHORT])
    assert code == 0
    out = capsys.readouterr()
    assert "train/val/test 60/0/0 rows" in out.err + out.out
    assert "on the training rows" in out.out
    run, = runs_of(tracking_uri)
    assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics


def test_weighted_newton_run_equals_sklearn(tracking_uri, runs_of, write_table):
    """Sample weights and balanced class weights, every row, raw features: scikit-learn's optimum to 1e-4."""
    import neuron_torch

    X, y = load_breast_cancer(return_X_y=True)
    X = X[:, :4] / X[:, :4].std(0)  # four columns on a unit scale, so the raw-feature fit is well conditioned
    rng = np.random.default_rng(1)
    w = rng.integers(0, 4, len(y)).astype(float)
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"]).assign(w=w, label=y)
    path = write_table("weighted.parquet", frame)
    l2 = 0.05
    code = exit_code(["--data.path", str(path), "--data.target", "label", "--data.weight_column", "w",
                      "--model.class_weight", "balanced", "--data.val_fraction", "0", "--data.test_fraction", "0",
                      "--data.standardize", "false", "--model.update_rule", "newton", "--model.learning_rate", "1",
                      "--model.l2", str(l2), "--trainer.precision", "64-true", "--trainer.max_steps", "25",
                      "--trainer.val_check_interval", "25", *QUIET])
    assert code == 0
    run, = runs_of(tracking_uri)
    from sklearn.utils.class_weight import compute_class_weight

    s = w * compute_class_weight("balanced", classes=np.array([0, 1]), y=y, sample_weight=w)[y]
    clf = LogisticRegression(C=1 / (l2 * s.sum()), class_weight="balanced", tol=1e-12, max_iter=10_000)
    clf.fit(X, y, sample_weight=w)
    model = neuron_torch.load_model(f"runs:/{run.info.run_id}/model", tracking_uri)
    probability = model.predict_proba(frame[["a", "b", "c", "d"]])
    np.testing.assert_allclose(np.ravel(probability), clf.predict_proba(X)[:, 1], rtol=0, atol=1e-4)


def test_bfloat16_storage_is_refused_where_no_kernel_reads_it(tracking_uri, runs_of, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine bfloat16 storage applies")
    code = exit_code(["--data.dtype", "bfloat16", *SHORT])
    assert code == 2
    conftest.one_error_line(capsys.readouterr().err, "data.dtype 'bfloat16'", "CUDA")
    assert runs_of(tracking_uri) == []


@pytest.mark.parametrize("class_weight,fragment", [("{c0: 0, c1: 0, c2: 0}", "every training row weight 0"),
                                                   ("balanced", "class 'c1' has training weight 0")])
def test_class_weights_that_leave_nothing_to_train_on(class_weight, fragment, tracking_uri, runs_of,
                                                      write_table, capsys):
    frame = labelled()
    frame["w"] = np.where(frame.label == "c1", 0.0, frame.w)  # class c1's rows all weigh 0
    path = write_table("data.csv", frame)
    code = exit_code(["--data.path", str(path), "--data.target", "label", "--data.weight_column", "w",
                      "--model.class_weight", class_weight, *SHORT])
    assert code == 2
    conftest.one_error_line(capsys.readouterr().err, "model.class_weight", fragment)
    assert runs_of(tracking_uri) == []


def test_class_weighted_fit_gets_standard_errors(tracking_uri, runs_of, write_table, capsys):
    """The coefficient table judges the fit with the weights it was trained on (class weights included): an
    unpenalised balanced Newton fit has converged and gets its standard errors."""
    X, y = load_breast_cancer(return_X_y=True)
    frame = pd.DataFrame(X[:, :3] / X[:, :3].std(0), columns=["a", "b", "c"]).assign(label=y)
    path = write_table("three.csv", frame)
    code = exit_code(["--data.path", str(path), "--data.target", "label", "--model.class_weight", "balanced",
                      "--model.update_rule", "newton", "--model.learning_rate", "1", "--trainer.precision", "64-true",
                      "--trainer.max_steps", "30", "--trainer.val_check_interval", "30", *QUIET])
    assert code == 0
    run, = runs_of(tracking_uri)
    from mlflow import MlflowClient

    table = pd.read_csv(MlflowClient(tracking_uri).download_artifacts(run.info.run_id, "coefficients.csv"))
    assert table["std_error"].notna().all() and (table["std_error"] > 0).all()


def test_a_model_and_data_with_different_class_weights_is_refused():
    # the data module weighs the rows; a model asking for other class weights than the data applies would train
    # on weights it does not know of (the command line links model.class_weight to the data's, so they agree)
    import lightning as L

    from neuron_torch.data.datamodule import NeuronDataModule
    from neuron_torch.errors import ConfigError
    from neuron_torch.train.module import NeuronModule

    data = NeuronDataModule(dataset="breast_cancer")
    model = NeuronModule(list(data.feature_names), classes=list(data.classes), class_weight="balanced")
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ConfigError, match="model.class_weight is 'balanced' but the data module weighs its rows "
                                          "with class_weight None"):
        trainer.fit(model, datamodule=data)
