"""NeuronClassifier: scikit-learn's own estimator checks, and the numbers against LogisticRegression.

The reference is always scikit-learn's ``LogisticRegression`` (lbfgs) on the features standardised by
``StandardScaler().fit(X, sample_weight=...)`` (what ``standardize=True`` does inside the estimator), mapped back to
the caller's scale: ``coef = coef_s/σ``, ``intercept = intercept_s − coef·μ``. Its objective is
``C·Σᵢ sᵢ·logloss_i + ½‖W‖²`` (``sᵢ`` = sample weight × class weight); divided by ``C·Σᵢ sᵢ`` that is the
estimator's weighted mean log-loss ``+ (alpha/2)·‖W‖²`` with ``C = 1/(alpha·Σᵢ sᵢ)``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_iris, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from neuron_torch.sklearn import NeuronClassifier

# --- scikit-learn's estimator suite ------------------------------------------------------------------------------

# Small max_iter keeps the suite quick (it fits a few hundred times); tol is rarely met that soon, so the
# suite's fits end in ConvergenceWarnings, ignored below. Three instances: plain gradient descent on the single
# neuron / softmax layer (the default), Newton, and a network with one hidden layer trained by Adam.
CHECKED = [
    NeuronClassifier(max_iter=100),
    NeuronClassifier(solver="newton", learning_rate=1.0, max_iter=20),
    NeuronClassifier(hidden_layer_sizes=(8,), solver="adam", learning_rate=0.01, max_iter=100, random_state=0),
]
# Every check passes; the one scikit-learn skips is check_array_api_input (it runs only with SCIPY_ARRAY_API=1,
# and the estimator takes NumPy arrays, converted to torch inside, not array-API namespaces).
EXPECTED_FAILED: dict[str, str] = {}


@parametrize_with_checks(CHECKED, expected_failed_checks=lambda estimator: EXPECTED_FAILED)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# --- the converged fit equals LogisticRegression --------------------------------------------------------------

ALPHA = 1e-2  # λ: with it the objectives are strongly convex, so every rule reaches the one optimum quickly
# ‖∇‖ < 1e-9 puts the standardised weights within ‖∇‖/λ = 1e-7 of the optimum. The caller's scale divides them by
# σ, down to 0.0026 on breast cancer (a coefficient of 121): 1e-8 was not tight enough there for 1e-4.
GRAD_TOL = 1e-9
MATCH = 1e-4  # lbfgs itself ends 3.5e-5 from the optimum there (against newton-cholesky at tol 1e-14)


@functools.lru_cache(maxsize=None)
def dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    load = {"breast_cancer": load_breast_cancer, "iris": load_iris, "wine": load_wine}[name]
    return load(return_X_y=True)


def weighting(case: str, y: np.ndarray):
    """(sample_weight, class_weight) of a weighting case; integer weights 1..3 so duplicates can stand in."""
    sample_weight = np.random.default_rng(0).integers(1, 4, size=len(y)).astype(float)
    classes = np.unique(y)
    return {
        "none": (None, None),
        "sample_weight": (sample_weight, None),
        "balanced": (None, "balanced"),
        "dict+sample_weight": (sample_weight, {c: 1.0 + i for i, c in enumerate(classes)}),
    }[case]


def sklearn_reference(X, y, alpha, sample_weight=None, class_weight=None):
    """LogisticRegression's optimum for the same objective, as (coef, intercept, predict_proba on X)."""
    sw = np.ones(len(y)) if sample_weight is None else sample_weight
    if class_weight is None:
        s = sw
    elif class_weight == "balanced":  # n/(k·n_c) with weighted counts: every class then weighs Σsw/k
        s = sw * np.array([sw.sum() / (len(np.unique(y)) * sw[y == c].sum()) for c in y])
    else:
        s = sw * np.array([class_weight[c] for c in y])
    scaler = StandardScaler().fit(X, sample_weight=sample_weight)
    Xs = scaler.transform(X)
    ref = LogisticRegression(C=1 / (alpha * s.sum()), class_weight=class_weight, tol=1e-12, max_iter=10_000)
    ref.fit(Xs, y, sample_weight=sample_weight)
    coef = ref.coef_ / scaler.scale_
    return coef, ref.intercept_ - coef @ scaler.mean_, ref.predict_proba(Xs)


def assert_matches(clf, X, reference):
    coef, intercept, proba = reference
    assert np.abs(coef).max() > 0.1  # far from the zero start: the match is not trivial
    np.testing.assert_allclose(clf.coef_, coef, rtol=0, atol=MATCH)
    np.testing.assert_allclose(clf.intercept_, intercept, rtol=0, atol=MATCH)
    np.testing.assert_allclose(clf.predict_proba(X), proba, rtol=0, atol=MATCH)


@pytest.mark.parametrize("weights", ["none", "sample_weight", "balanced", "dict+sample_weight"])
@pytest.mark.parametrize("name", ["breast_cancer", "iris", "wine"])
def test_converged_fit_equals_logistic_regression(name, weights):
    X, y = dataset(name)
    sample_weight, class_weight = weighting(weights, y)
    clf = NeuronClassifier(solver="nesterov", learning_rate=0.5, alpha=ALPHA, tol=GRAD_TOL, max_iter=20_000,
                           class_weight=class_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # it must converge, not stop at max_iter
        clf.fit(X, y, sample_weight=sample_weight)
    k = len(clf.classes_)
    assert clf.coef_.shape == (1 if k == 2 else k, X.shape[1])
    assert clf.intercept_.shape == (1 if k == 2 else k,)
    assert_matches(clf, X, sklearn_reference(X, y, ALPHA, sample_weight, class_weight))


@pytest.mark.parametrize("weights", ["none", "dict+sample_weight"])
@pytest.mark.parametrize("name", ["breast_cancer", "iris", "wine"])
def test_newton_reaches_the_same_optimum_in_few_updates(name, weights):
    X, y = dataset(name)
    sample_weight, class_weight = weighting(weights, y)
    clf = NeuronClassifier(solver="newton", learning_rate=1.0, alpha=ALPHA, tol=1e-10, max_iter=50,
                           class_weight=class_weight).fit(X, y, sample_weight=sample_weight)
    assert clf.n_iter_ <= 10  # quadratic convergence: the gradient goes from O(1) to 1e-10 in a handful of steps
    assert_matches(clf, X, sklearn_reference(X, y, ALPHA, sample_weight, class_weight))


@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_weight_two_equals_a_duplicated_row(name):
    X, y = dataset(name)
    counts = np.random.default_rng(1).integers(0, 3, size=len(y))  # 0: row left out, 2: row counted twice
    rows = np.repeat(np.arange(len(y)), counts)
    params = dict(solver="newton", learning_rate=1.0, alpha=ALPHA, tol=1e-12, max_iter=50)
    weighted = NeuronClassifier(**params).fit(X, y, sample_weight=counts.astype(float))
    repeated = NeuronClassifier(**params).fit(X[rows], y[rows])
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(weighted.intercept_, repeated.intercept_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X), rtol=0, atol=1e-10)


# --- the estimator's own behaviour -----------------------------------------------------------------------------


def test_binary_outputs_follow_classes_order_and_labels():
    X, y = dataset("breast_cancer")
    labels = np.where(y == 1, "benign", "malignant")
    clf = NeuronClassifier(solver="newton", learning_rate=1.0, alpha=ALPHA).fit(X, labels)
    assert list(clf.classes_) == ["benign", "malignant"]
    Z, P = clf.decision_function(X), clf.predict_proba(X)
    assert Z.shape == (len(y),) and P.shape == (len(y), 2)
    np.testing.assert_allclose(Z, X @ clf.coef_[0] + clf.intercept_[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(P[:, 1], 1 / (1 + np.exp(-Z)), rtol=1e-12)  # column 1 is classes_[1]
    np.testing.assert_allclose(P.sum(1), 1.0)
    assert set(clf.predict(X)) == {"benign", "malignant"}
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[P.argmax(1)])
    assert clf.score(X, labels) > 0.97


def test_dataframe_feature_names_and_multiclass_shapes():
    data = load_wine(as_frame=True)
    X, y = data.data, data.target.map({0: "barolo", 1: "grignolino", 2: "barbera"})
    clf = NeuronClassifier(solver="newton", learning_rate=1.0, alpha=ALPHA).fit(X, y)
    assert list(clf.feature_names_in_) == list(X.columns)
    assert clf.n_features_in_ == 13
    assert clf.decision_function(X).shape == (178, 3) and clf.predict_proba(X).shape == (178, 3)
    assert clf.coef_.shape == (3, 13) and clf.intercept_.shape == (3,)
    with pytest.warns(UserWarning, match="feature names"):  # fitted with names, given none
        clf.predict(X.to_numpy())


def test_hidden_layers_fit_without_linear_coefficients():
    X, y = dataset("breast_cancer")
    params = dict(hidden_layer_sizes=(16, 8), activation="tanh", solver="adam", learning_rate=0.01,
                  max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = NeuronClassifier(**params).fit(X, y)
        again = NeuronClassifier(**params).fit(X, y)
    assert not hasattr(clf, "coef_") and not hasattr(clf, "intercept_")
    assert clf.score(X, y) > 0.97
    np.testing.assert_array_equal(clf.predict_proba(X), again.predict_proba(X))  # random_state fixes the start
    with pytest.raises(ValueError, match="newton"):
        NeuronClassifier(hidden_layer_sizes=(4,), solver="newton").fit(X, y)


def test_max_iter_reached_warns_and_counts_updates():
    X, y = dataset("iris")
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        clf = NeuronClassifier(max_iter=7).fit(X, y)
    assert clf.n_iter_ == 7 and len(clf.loss_curve_) == 7
    assert clf.loss_ < clf.loss_curve_[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert NeuronClassifier(max_iter=7, tol=0).fit(X, y).n_iter_ == 7  # tol=0: exactly max_iter, asked for


def test_float32_fit_is_close_to_float64():
    X, y = dataset("iris")
    params = dict(solver="newton", learning_rate=1.0, alpha=ALPHA, tol=1e-5)
    single = NeuronClassifier(dtype="float32", **params).fit(X, y)
    double = NeuronClassifier(**params).fit(X, y)
    assert single.network_.linear.weight.dtype == torch.float32
    np.testing.assert_allclose(single.predict_proba(X), double.predict_proba(X), atol=1e-4)


# --- in a Pipeline and in GridSearchCV ------------------------------------------------------------------------


def test_pipeline_with_standard_scaler():
    X, y = dataset("breast_cancer")
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    params = dict(solver="nesterov", learning_rate=0.5, alpha=ALPHA, tol=GRAD_TOL, max_iter=20_000)
    pipe = make_pipeline(StandardScaler(), NeuronClassifier(standardize=False, **params)).fit(X_train, y_train)
    inside = NeuronClassifier(**params).fit(X_train, y_train)  # the same standardisation, done inside
    np.testing.assert_allclose(pipe.predict_proba(X_test), inside.predict_proba(X_test), rtol=0, atol=1e-10)

    C = 1 / (ALPHA * len(y_train))
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=1e-12, max_iter=10_000)).fit(X_train, y_train)
    np.testing.assert_allclose(pipe.predict_proba(X_test), ref.predict_proba(X_test), rtol=0, atol=MATCH)
    assert pipe.score(X_test, y_test) == ref.score(X_test, y_test)
    assert pipe.score(X_test, y_test) > 0.95


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_grid_search_over_learning_rate_and_l2():
    X, y = dataset("breast_cancer")
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    alphas = [1e-3, 1e-2, 1e-1, 1.0]
    search = GridSearchCV(NeuronClassifier(solver="gd", max_iter=300, tol=1e-6),
                          {"learning_rate": [0.01, 0.5], "alpha": alphas}, scoring="neg_log_loss", cv=cv)
    search.fit(X, y)
    # 300 updates at 0.01 leave the fit far from any optimum: the larger rate wins on every alpha
    scores = search.cv_results_["mean_test_score"].reshape(len(alphas), 2)  # alpha-major, as the grid sorts
    assert (scores[:, 1] > scores[:, 0]).all()
    assert search.best_params_["learning_rate"] == 0.5

    # the same grid for LogisticRegression, its C mapped from alpha on the folds' training size
    n_train = len(y) * 4 // 5
    ref = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000)),
                       {"logisticregression__C": [1 / (a * n_train) for a in alphas]}, scoring="neg_log_loss", cv=cv)
    ref.fit(X, y)
    assert search.best_params_["alpha"] == alphas[ref.best_index_]
    assert abs(search.best_score_ - ref.best_score_) < 0.01  # log-loss ≈ 0.07: the same model, nearly converged


# --- optional MLflow tracking ---------------------------------------------------------------------------------


def test_mlflow_tracking_records_one_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a new experiment keeps its artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    X, y = dataset("iris")
    clf = NeuronClassifier(solver="newton", learning_rate=1.0, alpha=ALPHA, tracking_uri=uri,
                           experiment_name="estimator").fit(X, y)

    client = MlflowClient(uri)
    run = client.get_run(clf.mlflow_run_id_)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "estimator"
    assert run.data.params["solver"] == "newton" and run.data.params["alpha"] == str(ALPHA)
    assert run.data.params["n_classes"] == "3"
    assert run.data.metrics["loss"] == pytest.approx(clf.loss_)
    assert run.data.metrics["n_iter"] == clf.n_iter_
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == clf.n_iter_ + 1
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"network.pt", "coefficients.csv"}

    folder = client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded"))
    saved = torch.load(f"{folder}/network.pt", weights_only=True)
    torch.testing.assert_close(saved["state_dict"]["linear.weight"], clf.network_.linear.weight.detach())
    table = pd.read_csv(f"{folder}/coefficients.csv")
    assert len(table) == 3 * (4 + 1)
    np.testing.assert_allclose(table.query("feature == 'x2'").estimate, clf.coef_[:, 2])


def test_a_write_the_store_refuses_fails_the_fit_and_the_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def refuse(self, run_id, local_path, artifact_path=None):
        raise MlflowException("artifact storage is read-only")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    X, y = dataset("iris")
    clf = NeuronClassifier(solver="newton", learning_rate=1.0, alpha=ALPHA, tracking_uri=uri,
                           experiment_name="estimator")
    with pytest.raises(MlflowException, match="artifact storage is read-only"):
        clf.fit(X, y)

    assert not hasattr(clf, "mlflow_run_id_")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("estimator").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "MlflowException: artifact storage is read-only"


def test_no_tracking_by_default():
    X, y = dataset("iris")
    clf = NeuronClassifier(solver="newton", learning_rate=1.0).fit(X, y)
    assert not hasattr(clf, "mlflow_run_id_")


def test_newton_past_its_hessian_limit_is_refused():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 300)), np.arange(200) % 30  # (300 + 1)·30 = 9,030 parameters
    with pytest.raises(ValueError, match="9030 × 9030 Hessian"):
        NeuronClassifier(solver="newton").fit(X, y)
