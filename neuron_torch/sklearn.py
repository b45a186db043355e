"""A scikit-learn classifier on the project's own networks, update rules and hand-written gradients.

:class:`NeuronClassifier` fits in memory, full batch, in a plain loop: one
:func:`~neuron_torch.nn.update.apply_update` per iteration (the gradients by hand, then the update rule's
``step()``), the function the Lightning module's training steps call, without a trainer and its start-up. The
estimator works wherever scikit-learn expects one (``Pipeline``, ``GridSearchCV``, ``cross_val_score``).

>>> from sklearn.datasets import load_iris
>>> from neuron_torch.sklearn import NeuronClassifier
>>> X, y = load_iris(return_X_y=True)
>>> clf = NeuronClassifier(solver="newton", learning_rate=1.0, alpha=1e-3).fit(X, y)
>>> clf.coef_.shape, clf.predict_proba(X[:2]).shape
((3, 4), (2, 3))
"""

from __future__ import annotations

import numbers
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from neuron_torch.nn.layers import ACTIVATIONS
from neuron_torch.nn.networks import build_network
from neuron_torch.nn.optim import NEWTON_MAX_PARAMETERS, UPDATE_RULES, StepFailed, make_update_rule
from neuron_torch.nn.update import apply_update, gradient_norm

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class NeuronClassifier(ClassifierMixin, BaseEstimator):
    """Logistic regression as one sigmoid neuron (softmax for k > 2 classes), or a deeper network, trained by
    hand-written gradients and update rules.

    With ``hidden_layer_sizes=()`` this is (multinomial) logistic regression, and at convergence it is
    scikit-learn's :class:`~sklearn.linear_model.LogisticRegression` with the same penalty (see ``alpha``).
    Each iteration is one full-batch update: the loss and gradients come from
    :meth:`neuron_torch.nn.networks.HandBackprop.forward_backward` (no autograd), the step from the update rule
    of :mod:`neuron_torch.nn.optim`.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=()
        Width of each hidden layer. Empty: no hidden layer, logistic regression (a single sigmoid neuron for
        two classes, a softmax layer for more).
    activation : {"relu", "tanh", "sigmoid", "leaky_relu"}, default="relu"
        Activation of the hidden layers (unused without them).
    solver : {"gd", "momentum", "nesterov", "adam", "newton"}, default="gd"
        Update rule. ``"newton"`` (iteratively reweighted least squares, exact Hessian) is for networks without
        hidden layers; use ``learning_rate=1.0`` with it for the full Newton step.
    learning_rate : float, default=0.5
        Constant step size ``α`` of every update (no schedule). A float named as in scikit-learn's gradient
        boosting, where it is a constant too; ``MLPClassifier``'s ``learning_rate_init`` names the start of a
        schedule, which this estimator does not have. 0.5 is safe for gradient descent on standardised
        features (the mean log-loss is L-smooth with L ≤ ¼·λ_max(XᵀX/m) + alpha).
    alpha : float, default=1e-4
        L2 strength ``λ``: the objective is the (weighted) mean log-loss plus ``(alpha/2)·Σ‖W‖²`` over every
        weight matrix, biases not penalised; ``alpha`` is the networks' ``l2``, with the meaning
        :class:`~sklearn.linear_model.SGDClassifier`'s ``alpha`` has. scikit-learn's ``LogisticRegression``
        minimises ``C·Σᵢ sᵢ·logloss_i + ½‖W‖²`` with ``sᵢ = sample_weightᵢ·class_weight[yᵢ]`` (scikit-learn
        1.9 divides by ``C·Σᵢ sᵢ`` and solves with ``l2_reg_strength = 1/(C·Σᵢ sᵢ)``), so the two have the same
        minimiser when ``alpha = 1/(C·Σᵢ sᵢ)``: ``C = 1/(alpha·n_samples)`` without weights. Unlike ``C``,
        ``alpha`` is a penalty per row, so a value chosen on a cross-validation fold means the same on all rows.
        With ``standardize=True`` the penalty is on the standardised coefficients, as in
        ``make_pipeline(StandardScaler(), LogisticRegression())``.
    max_iter : int, default=1000
        Most updates.
    tol : float, default=1e-4
        Stop when the Euclidean norm of the gradient of the objective over all parameters is below ``tol``.
        When ``max_iter`` updates end above it, a :class:`~sklearn.exceptions.ConvergenceWarning` is raised
        (not with ``tol=0``, which asks for exactly ``max_iter`` updates).
    momentum : float, default=0.9
        ``μ`` of the ``"momentum"`` and ``"nesterov"`` rules.
    beta_1, beta_2 : float, default=0.9, 0.999
        Moment decay rates of ``"adam"``.
    epsilon : float, default=1e-8
        ``ε`` of ``"adam"``.
    standardize : bool, default=True
        Standardise the features inside the estimator (mean and standard deviation of the training rows,
        weighted by ``sample_weight``, as ``StandardScaler().fit(X, sample_weight=sample_weight)``); ``coef_`` and
        ``intercept_`` are reported on the caller's scale.
    class_weight : dict, "balanced" or None, default=None
        Weights per class, multiplied into ``sample_weight``, with scikit-learn's meaning (``"balanced"``:
        ``n_samples / (n_classes·bincount(y))``, counted with the sample weights).
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation of hidden layers (He normal). Without hidden layers the start is all zeros and
        the fit is deterministic.
    dtype : {"float64", "float32"}, default="float64"
        Precision of the network and of the data inside the fit.
    tracking_uri : str or None, default=None
        MLflow tracking URI (e.g. ``"sqlite:///mlflow.db"``). When given, each fit records one run in
        ``experiment_name``: the parameters, the loss of every update, the final loss, gradient norm and
        iterations, and the weights (``network.pt``, a ``state_dict`` with the standardisation; and
        ``coefficients.csv`` on the caller's scale without hidden layers). None: no tracking, MLflow is not
        imported.
    experiment_name : str, default="neuron_torch"
        MLflow experiment of the tracked runs.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels, sorted.
    coef_ : ndarray of shape (1, n_features) or (n_classes, n_features)
        Weights on the caller's feature scale; one row (for ``classes_[1]``) with two classes. Only without
        hidden layers.
    intercept_ : ndarray of shape (1,) or (n_classes,)
        Biases on the caller's feature scale. Only without hidden layers.
    n_iter_ : int
        Updates run.
    loss_ : float
        Objective (mean log-loss plus the penalty) at the fitted parameters.
    loss_curve_ : list of float
        Objective before each update, ``n_iter_`` values.
    network_ : neuron_torch.nn.networks.HandBackprop
        The fitted network; it takes standardised features when ``standardize=True``.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of the features seen during fit, when ``X`` has string column names.
    mlflow_run_id_ : str
        The run recorded, when ``tracking_uri`` is set.

    See Also
    --------
    sklearn.linear_model.LogisticRegression : the same model without hidden layers, solved by L-BFGS.
    sklearn.neural_network.MLPClassifier : a deeper network with autograd-free backprop in NumPy.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from neuron_torch.sklearn import NeuronClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> clf = NeuronClassifier(solver="nesterov", alpha=1e-2).fit(X, y)
    >>> round(clf.score(X, y), 2)
    0.99
    """

    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "solver": [StrOptions(set(UPDATE_RULES))],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "momentum": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_1": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_2": [Interval(numbers.Real, 0, 1, closed="left")],
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
        "standardize": ["boolean"],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "random_state": ["random_state"],
        "dtype": [StrOptions(set(DTYPES))],
        "tracking_uri": [str, None],
        "experiment_name": [str],
    }

    def __init__(self, hidden_layer_sizes=(), activation="relu", solver="gd", learning_rate=0.5, alpha=1e-4,
                 max_iter=1000, tol=1e-4, momentum=0.9, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 standardize=True, class_weight=None, random_state=None, dtype="float64", tracking_uri=None,
                 experiment_name="neuron_torch"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.momentum = momentum
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.standardize = standardize
        self.class_weight = class_weight
        self.random_state = random_state
        self.dtype = dtype
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name

    # --- fit ------------------------------------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the network by full-batch updates until the gradient norm is below ``tol`` or ``max_iter``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features.
        y : array-like of shape (n_samples,)
            Class labels, at least two distinct values.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights per row: the loss and every gradient become weighted means, so a weight of 2
            counts a row twice.

        Returns
        -------
        self : NeuronClassifier
            The fitted estimator.
        """
        hidden = self._hidden_sizes()
        if self.solver == "newton" and hidden:
            raise ValueError(f"solver='newton' needs hidden_layer_sizes=() (its Hessian is written for networks "
                             f"without hidden layers); got hidden_layer_sizes={self.hidden_layer_sizes!r}")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError(f"NeuronClassifier needs samples of at least 2 classes in the data, but the data "
                             f"contains only one class: {self.classes_[0]!r}")
        n_parameters = (X.shape[1] + 1) * (1 if k == 2 else k)
        if self.solver == "newton" and n_parameters > NEWTON_MAX_PARAMETERS:
            raise ValueError(f"solver='newton' would solve with a {n_parameters} × {n_parameters} Hessian; the limit "
                             f"is {NEWTON_MAX_PARAMETERS} parameters: use solver='nesterov' or 'adam'")

        weight = None  # None keeps the single neuron's fused pass (it is for unweighted rows)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
            weight = sample_weight
        if self.class_weight is not None:
            # scikit-learn's meaning: "balanced" counts the classes with the sample weights, and the class
            # weight multiplies each row's sample weight (as LogisticRegression does)
            per_class = compute_class_weight(self.class_weight, classes=self.classes_, y=y,
                                             sample_weight=sample_weight)
            weight = per_class[y_index] if weight is None else weight * per_class[y_index]
        if weight is not None and not weight.sum() > 0:
            raise ValueError("the sample weights (times the class weights) sum to 0: no row counts in the fit")

        if self.standardize:
            # the same mean and scale as StandardScaler().fit(X, sample_weight=...): a row of weight 2 is two rows
            scaler = StandardScaler().fit(X, sample_weight=sample_weight)
            self._mean, self._scale = scaler.mean_, scaler.scale_
        else:
            self._mean, self._scale = np.zeros(X.shape[1]), np.ones(X.shape[1])

        dtype = DTYPES[self.dtype]
        Xt = self._tensor(X)
        if k == 2:
            Y = torch.from_numpy((y_index == 1).astype(np.float64)).to(dtype)[:, None]  # (m, 1), 1 = classes_[1]
        else:
            Y = torch.nn.functional.one_hot(torch.from_numpy(y_index), k).to(dtype)  # (m, k)
        W = None if weight is None else torch.from_numpy(weight).to(dtype)[:, None]  # (m, 1)

        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        generator = torch.Generator().manual_seed(int(seed))
        net = build_network(X.shape[1], n_classes=k, hidden_sizes=hidden, activation=self.activation,
                            l2=float(self.alpha), generator=generator).to(dtype)
        self.network_ = net
        self._train(Xt, Y, W)
        if not hidden:
            self._linear_coefficients()
        if self.tracking_uri is not None:
            self._track(X.shape[0])
        return self

    def _train(self, X: torch.Tensor, Y: torch.Tensor, weight: torch.Tensor | None) -> None:
        """The loop: one :func:`~neuron_torch.nn.update.apply_update` per iteration, full batch, stopping before
        the update whose gradient norm is under ``tol``."""
        net = self.network_
        params = dict(net.named_parameters())
        rule = make_update_rule(self.solver, params.values(), float(self.learning_rate), momentum=self.momentum,
                                betas=(self.beta_1, self.beta_2), eps=self.epsilon)
        batch = (X, Y) if weight is None else (X, Y, weight)
        losses, grad_norm = [], float("nan")

        def under_tol(gradients: dict[str, torch.Tensor]) -> bool:  # read before each step: stop before it
            nonlocal grad_norm
            grad_norm = gradient_norm(gradients).item()
            if grad_norm < self.tol:
                return True
            if not np.isfinite(grad_norm):
                raise ValueError(f"the fit diverged: the gradient is not finite after {len(losses)} updates of "
                                 f"solver={self.solver!r}; lower learning_rate (now {self.learning_rate})")
            return False

        with torch.no_grad():  # the gradients are written by hand: no autograd graph
            for _ in range(self.max_iter):
                try:
                    update = apply_update(net, rule, batch, hessian=self.solver == "newton", before_step=under_tol,
                                          snapshot=False, parameters=params)
                except StepFailed as err:
                    raise ValueError(f"the Newton step failed after {len(losses) + 1} updates: {err}") from err
                if not update.stepped:
                    loss = update.loss
                    break
                losses.append(update.loss)
            else:  # max_iter updates: where they ended decides convergence, and gives the final loss
                bp = net.forward_backward(*batch)
                loss, grad_norm = bp.loss, gradient_norm(bp.gradients).item()
        converged = grad_norm < self.tol
        for p in params.values():
            p.grad = None  # the gradients belong to the fit, not to the fitted network
        self.n_iter_ = len(losses)
        self.loss_ = loss.item()
        self.loss_curve_ = torch.stack(losses).tolist() if losses else []
        self._grad_norm = grad_norm
        if not np.isfinite(self.loss_):
            raise ValueError(f"the fit diverged: the loss is not finite after {self.n_iter_} updates of "
                             f"solver={self.solver!r}; lower learning_rate (now {self.learning_rate})")
        if not converged and self.tol > 0:
            warnings.warn(f"NeuronClassifier: {self.n_iter_} updates (max_iter) ended with gradient norm "
                          f"{grad_norm:.3g} > tol={self.tol:g}; raise max_iter or learning_rate, or use "
                          f"solver='newton'", ConvergenceWarning)

    def _linear_coefficients(self) -> None:
        """``coef_``, ``intercept_`` on the caller's scale: ``z = W·(x − μ)/σ + b = (W/σ)·x + (b − W·μ/σ)``."""
        linear = self.network_.linears[-1]
        W = linear.weight.detach().to(torch.float64).numpy()  # (1, n) or (k, n)
        b = linear.bias.detach().to(torch.float64).numpy()  # (1,) or (k,)
        self.coef_ = W / self._scale
        self.intercept_ = b - self.coef_ @ self._mean

    # --- predict --------------------------------------------------------------------------------------------

    def decision_function(self, X):
        """Logits of the output layer.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_classes)
            Two classes: the logit of ``classes_[1]`` (positive means ``classes_[1]``). More: one logit per class,
            in ``classes_`` order.
        """
        Z = self._logits(X)  # (m, 1) or (m, k)
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def predict_proba(self, X):
        """Class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in ``classes_`` order; each row sums to 1.
        """
        Z = torch.from_numpy(self._logits(X))
        if Z.shape[1] == 1:
            p = torch.sigmoid(Z)  # (m, 1), probability of classes_[1]
            return torch.cat([torch.sigmoid(-Z), p], dim=1).numpy()  # σ(−Z) = 1 − σ(Z), without the cancellation
        return torch.softmax(Z, dim=1).numpy()

    def predict(self, X):
        """Most probable class of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        Z = self.decision_function(X)
        index = (Z > 0).astype(int) if Z.ndim == 1 else Z.argmax(axis=1)
        return self.classes_[index]

    def _logits(self, X) -> np.ndarray:
        """Output logits (m, 1) or (m, k) in float64, for features on the caller's scale."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        with torch.no_grad():
            return self.network_.logits(self._tensor(X)).to(torch.float64).numpy()

    def _tensor(self, X: np.ndarray) -> torch.Tensor:
        """Standardised features as a contiguous tensor of ``dtype``, (m, n); never a view of the caller's X."""
        X = (X - self._mean) / self._scale if self.standardize else np.array(X, dtype=np.float64)
        return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64)).to(DTYPES[self.dtype])

    def _hidden_sizes(self) -> tuple[int, ...]:
        sizes = self.hidden_layer_sizes
        sizes = (sizes,) if isinstance(sizes, numbers.Integral) else tuple(sizes)
        if not all(isinstance(s, numbers.Integral) and s >= 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must hold positive integers, got {self.hidden_layer_sizes!r}")
        return tuple(int(s) for s in sizes)

    # --- tracking -------------------------------------------------------------------------------------------

    def _track(self, n_samples: int) -> None:
        """One MLflow run, written as a training run is (:class:`~neuron_torch.tracking.run.TrackedRun`): the
        parameters, the loss of each update and the final values, the weights as artifacts. A tracking server
        that stops answering leaves the rest in the run's spool (``neuron-torch sync`` sends it); a write the store
        refuses ends the run FAILED and is raised here."""
        from neuron_torch.tracking.run import TrackedRun

        params = {name: repr(value) if isinstance(value, (tuple, list, dict)) else str(value)
                  for name, value in self.get_params().items() if name != "tracking_uri"}
        params.update(n_samples=str(n_samples), n_features=str(self.n_features_in_),
                      n_classes=str(len(self.classes_)))
        with TrackedRun(self.tracking_uri, self.experiment_name, tags={"estimator": type(self).__name__}) as run:
            run.log_params(dict(sorted(params.items())))
            run.log_history("loss", self.loss_curve_)  # the objective before each update, steps 0 … n_iter − 1
            run.log_metrics({"loss": self.loss_, "grad_norm": self._grad_norm, "n_iter": float(self.n_iter_)},
                            self.n_iter_)
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder, "network.pt")
                torch.save({"state_dict": self.network_.state_dict(),
                            "mean": torch.from_numpy(self._mean), "scale": torch.from_numpy(self._scale),
                            "classes": [str(c) for c in self.classes_]}, path)
                run.log_artifact(path)
            if hasattr(self, "coef_"):
                run.log_text(self._coefficients_csv(), "coefficients.csv")
        if run.write_error is not None:  # the store refused a write (the run ended FAILED): the fit did not finish
            raise run.write_error
        self.mlflow_run_id_ = run.run_id

    def _coefficients_csv(self) -> str:
        """``coefficients.csv``: ``class, feature, estimate`` on the caller's scale, ``(intercept)`` first in each
        class (:func:`~neuron_torch.nn.coefficients.linear_table`); for two classes the one class ``classes_[1]``."""
        from neuron_torch.nn.coefficients import linear_table

        names = getattr(self, "feature_names_in_", [f"x{j}" for j in range(self.n_features_in_)])
        labels = self.classes_[1:] if len(self.classes_) == 2 else self.classes_
        table = linear_table(self.coef_, self.intercept_, names, labels)
        return table.to_csv(index=False, na_rep="nan", lineterminator="\r\n")  # as Python's csv module writes
