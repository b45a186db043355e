"""The coefficient table against statsmodels' ``Logit`` and ``MNLogit``, fitted by the project's own Newton.

The fits use every row (no hold-out) and run Newton to convergence without Lightning; the end-to-end test
trains through ``train()`` and reads ``coefficients.csv`` back from the run.
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest
import torch

sm = pytest.importorskip("statsmodels.api")

from neuron_torch.nn.coefficients import INTERCEPT, coefficient_table, format_table  # noqa: E402
from neuron_torch.nn.networks import build_network  # noqa: E402
from neuron_torch.nn.optim import Newton  # noqa: E402

RTOL = 1e-4


def newton_fit(X: torch.Tensor, Y: torch.Tensor, n_classes: int, l2: float = 0.0, weight=None, steps: int = 40):
    """The network fitted by full Newton steps on every row, as the LightningModule's update does."""
    net = build_network(X.shape[1], n_classes, l2=l2).double()
    optimizer = Newton(net.parameters())
    for _ in range(steps):
        bp = net.forward_backward(X, Y, weight)
        for name, p in net.named_parameters():
            p.grad = bp.gradients[name]
        optimizer.step(hessian=net.hessian(X, weight))
    return net


def scaled(X_raw: np.ndarray, standardize: bool):
    """``(X_std, mean, std)`` as the data module makes them (population std)."""
    mean = X_raw.mean(0) if standardize else np.zeros(X_raw.shape[1])
    std = X_raw.std(0) if standardize else np.ones(X_raw.shape[1])
    return torch.tensor((X_raw - mean) / std), mean, std


def binary_table():
    """Four breast-cancer columns: overlapping classes, a well-posed logistic regression."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    columns = [0, 1, 4, 8]
    return data.data[:, columns], data.target.astype(np.float64), [str(data.feature_names[j]) for j in columns]


def three_class_table(m: int = 400, seed: int = 0):
    """Three classes drawn from a known softmax model on three features of different scales."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, 3)) * [1.0, 10.0, 0.1] + [5.0, -20.0, 0.0]
    W = np.array([[0.0, 0.0, 0.0], [0.8, -0.05, 4.0], [-0.5, 0.1, -6.0]])
    b = np.array([0.0, -3.5, 4.5])
    logits = X @ W.T + b
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in P])
    return X, y, ["x1", "x2", "x3"]


def one_hot(y: np.ndarray, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(y), k).double()


def close(ours, theirs, rtol: float = RTOL) -> None:
    np.testing.assert_allclose(np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float), rtol=rtol)


# --- against statsmodels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("standardize", [False, True])
def test_binary_equals_statsmodels_logit(standardize):
    X_raw, y, names = binary_table()
    X, mean, std = scaled(X_raw, standardize)
    Y = torch.tensor(y)[:, None]
    table = coefficient_table(newton_fit(X, Y, 2), names, ["malignant", "benign"], mean, std, X, Y)

    ref = sm.Logit(y, sm.add_constant(X_raw)).fit(disp=0)
    assert list(table.columns) == ["feature", "estimate", "std_error", "z", "p_value", "ci_low", "ci_high"]
    assert list(table.feature) == [INTERCEPT, *names]  # statsmodels' order: the constant first
    close(table.estimate, ref.params)
    close(table.std_error, ref.bse)
    close(table.z, ref.tvalues)
    close(table.p_value, ref.pvalues)
    close(table[["ci_low", "ci_high"]], ref.conf_int(0.05))
    assert table.attrs["status"].startswith("standard errors from the inverse Hessian")


@pytest.mark.parametrize("standardize", [False, True])
def test_three_classes_equal_statsmodels_mnlogit(standardize):
    X_raw, y, names = three_class_table()
    X, mean, std = scaled(X_raw, standardize)
    Y = one_hot(y, 3)
    table = coefficient_table(newton_fit(X, Y, 3), names, ["a", "b", "c"], mean, std, X, Y)

    ref = sm.MNLogit(y, sm.add_constant(X_raw)).fit(disp=0, maxiter=100)
    assert list(table.columns)[:2] == ["class", "feature"]
    # the k − 1 contrasts against the first class, class by class; statsmodels' params are (n + 1, k − 1)
    assert list(table["class"]) == ["b"] * 4 + ["c"] * 4
    assert list(table.feature) == [INTERCEPT, *names] * 2
    close(table.estimate, ref.params.T.reshape(-1))
    close(table.std_error, ref.bse.T.reshape(-1))
    close(table.p_value, ref.pvalues.T.reshape(-1))
    assert table.attrs["reference"] == "a"
    assert "contrasted with 'a'" in table.attrs["status"]


def test_frequency_weights_equal_repeated_rows():
    """A weight of 2 is the row seen twice: same estimates and standard errors as statsmodels on the
    duplicated table (the covariance is (Σw·H_mean)⁻¹, not (m·H_mean)⁻¹)."""
    X_raw, y, names = binary_table()
    counts = np.random.default_rng(1).integers(1, 4, size=len(y)).astype(np.float64)
    X, mean, std = scaled(X_raw, True)
    Y, weight = torch.tensor(y)[:, None], torch.tensor(counts)[:, None]
    table = coefficient_table(newton_fit(X, Y, 2, weight=weight), names, ["0", "1"], mean, std, X, Y, weight)

    rows = np.repeat(np.arange(len(y)), counts.astype(int))
    ref = sm.Logit(y[rows], sm.add_constant(X_raw[rows])).fit(disp=0)
    close(table.estimate, ref.params)
    close(table.std_error, ref.bse)
    assert "as frequencies" in table.attrs["status"]


# --- when there are no standard errors ----------------------------------------------------------------------


def test_complete_separation_gives_no_standard_errors():
    rng = np.random.default_rng(0)
    X_raw = rng.normal(size=(60, 2))
    y = (X_raw[:, 0] + X_raw[:, 1] > 0).astype(np.float64)  # a line splits the classes exactly
    X, mean, std = scaled(X_raw, True)
    Y = torch.tensor(y)[:, None]
    table = coefficient_table(newton_fit(X, Y, 2), ["u", "v"], ["0", "1"], mean, std, X, Y)

    assert table.std_error.isna().all() and table.p_value.isna().all() and table.ci_low.isna().all()
    assert table.estimate.notna().all()
    assert "complete separation" in table.attrs["status"]
    text = format_table(table)
    assert "nan" not in text and "std_error" not in text  # the estimates and the reason, no column of nan
    assert text.splitlines()[-1] == table.attrs["status"]


def test_quasi_separation_gives_a_singular_hessian():
    """Iris by its sepals: setosa is cut off from the others by a line, the other two overlap. The contrasts
    with setosa run off towards infinity while the fit's gradient vanishes; statsmodels warns and prints
    standard errors of 1e8 or nan."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    X, mean, std = scaled(iris.data[:, :2], True)
    Y = one_hot(iris.target, 3)
    table = coefficient_table(newton_fit(X, Y, 3), ["sepal length", "sepal width"], list(iris.target_names),
                              mean, std, X, Y)
    assert table.std_error.isna().all()
    assert "the Hessian is singular" in table.attrs["status"]


def test_penalised_fit_reports_every_class_without_standard_errors():
    X_raw, y, names = three_class_table()
    X, mean, std = scaled(X_raw, True)
    Y = one_hot(y, 3)
    net = newton_fit(X, Y, 3, l2=0.1)
    table = coefficient_table(net, names, ["a", "b", "c"], mean, std, X, Y)

    assert list(table["class"]) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # k rows per feature, as coef_
    assert table[["std_error", "z", "p_value", "ci_low", "ci_high"]].isna().all().all()
    assert "L2 penalty 0.1" in table.attrs["status"]
    W, b = net.linear.weight.detach().numpy(), net.linear.bias.detach().numpy()
    weights = table[table.feature != INTERCEPT].estimate.to_numpy().reshape(3, 3)
    intercepts = table[table.feature == INTERCEPT].estimate.to_numpy()
    close(weights, W / std, 1e-12)  # standardisation undone: w/σ and b − Σ w·μ/σ
    close(intercepts, b - W @ (mean / std), 1e-12)
    # on the raw scale the fitted probabilities are the network's
    logits = X_raw @ weights.T + intercepts
    close(torch.softmax(torch.tensor(logits), 1), net(X).detach(), 1e-10)


def test_penalised_binary_fit_has_one_row_per_parameter():
    X_raw, y, names = binary_table()
    X, mean, std = scaled(X_raw, True)
    Y = torch.tensor(y)[:, None]
    table = coefficient_table(newton_fit(X, Y, 2, l2=0.01), names, ["0", "1"], mean, std, X, Y)
    assert list(table.feature) == [INTERCEPT, *names] and "class" not in table
    assert table.std_error.isna().all()


def test_an_unfinished_fit_gives_no_standard_errors():
    X_raw, y, names = binary_table()
    X, mean, std = scaled(X_raw, True)
    Y = torch.tensor(y)[:, None]
    few = newton_fit(X, Y, 2, steps=2)
    table = coefficient_table(few, names, ["0", "1"], mean, std, X, Y)
    assert table.std_error.isna().all()
    assert "did not converge: one Newton step would move it by" in table.attrs["status"]

    done = newton_fit(X, Y, 2)
    told = coefficient_table(done, names, ["0", "1"], mean, std, X, Y, converged=False)  # tol not met
    assert told.std_error.isna().all() and "did not converge" in told.attrs["status"]


def test_a_constant_feature_gives_a_singular_hessian():
    X_raw, y, names = binary_table()
    X_raw = np.column_stack([X_raw, np.full(len(y), 3.0)])  # collinear with the intercept
    X, mean, std = scaled(X_raw, False)
    Y = torch.tensor(y)[:, None]
    table = coefficient_table(newton_fit(X, Y, 2), [*names, "three"], ["0", "1"], mean, std, X, Y)
    assert table.std_error.isna().all()
    assert "the Hessian is singular" in table.attrs["status"]


def test_hidden_layers_have_no_coefficients():
    net = build_network(3, 2, hidden_sizes=(4,))
    X, Y = torch.zeros(5, 3), torch.zeros(5, 1)
    with pytest.raises(TypeError, match="hidden layers"):
        coefficient_table(net, ["a", "b", "c"], ["0", "1"], np.zeros(3), np.ones(3), X, Y)


def test_format_table_is_compact_and_ends_with_the_status():
    X_raw, y, names = binary_table()
    X, mean, std = scaled(X_raw, False)
    Y = torch.tensor(y)[:, None]
    table = coefficient_table(newton_fit(X, Y, 2), names, ["0", "1"], mean, std, X, Y)
    lines = format_table(table).splitlines()
    assert lines[1].split() == ["feature", "estimate", "std_error", "z", "p", "95%", "interval"]
    assert lines[2].startswith(INTERCEPT) and len(lines) == 2 + len(table) + 1
    assert max(map(len, lines[:-1])) <= 100
    assert lines[-1] == table.attrs["status"]


# --- a run logs it -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_a_run_logs_coefficients_csv(tracking_uri, fast_args, tmp_path, monkeypatch, k):
    """Newton on every row, without standardisation: the run's coefficients.csv is statsmodels' table, and the
    end of the run prints it."""
    from mlflow import MlflowClient

    from neuron_torch.tracking import figures, model_files
    from neuron_torch.cli.commands import main

    # the model and the figures have tests of their own; this one reads the coefficients alone, in half the time
    monkeypatch.setattr(model_files, "log_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(figures, "log_figures", lambda *args, **kwargs: None)

    X_raw, y, names = binary_table() if k == 2 else three_class_table(150)
    labels = np.array(["no", "yes"])[y.astype(int)] if k == 2 else np.array(["a", "b", "c"])[y]
    path = tmp_path / "table.csv"
    pd.DataFrame({**dict(zip(names, X_raw.T)), "label": labels}).to_csv(path, index=False)
    args = [*fast_args, "--data.path", str(path), "--data.target", "label", "--data.standardize", "false",
            "--data.val_fraction", "0", "--data.test_fraction", "0",
            "--model.update_rule", "newton", "--model.learning_rate", "1"]
    out = io.StringIO()
    with redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", *args])
    assert code == 0, out.getvalue()
    assert "standard errors from the inverse Hessian" in out.getvalue(), out.getvalue()

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert {"coefficients.csv", "coefficients.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "coefficients.csv", str(tmp_path)))
    if k == 2:
        ref = sm.Logit(y, sm.add_constant(X_raw)).fit(disp=0)
        assert list(table.feature) == [INTERCEPT, *names]
        close(table.estimate, ref.params)
        close(table.std_error, ref.bse)
    else:
        ref = sm.MNLogit(y, sm.add_constant(X_raw)).fit(disp=0, maxiter=100)
        assert list(table["class"]) == ["b"] * 4 + ["c"] * 4
        close(table.estimate, ref.params.T.reshape(-1))
        close(table.std_error, ref.bse.T.reshape(-1))
    assert "coefficients (original feature scale):" in out.getvalue()  # ≤ 20 rows: printed at the end


def test_a_deep_run_logs_no_coefficients(tracking_uri, fast_args):
    from mlflow import MlflowClient

    from neuron_torch.cli.commands import main

    with redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", *fast_args, "--model.hidden_sizes", "[3]"]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert "coefficients.csv" not in {a.path for a in client.list_artifacts(run.info.run_id)}
