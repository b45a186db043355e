"""The coefficients a statistician reads: estimates on the original feature scale, with standard errors.

A network without hidden layers is a generalised linear model: the single neuron is logistic regression
(statsmodels' ``Logit``), :class:`~neuron_torch.nn.networks.SoftmaxRegression` is multinomial logistic regression
(``MNLogit``). At the maximum-likelihood estimate θ̂ the covariance of θ̂ is the inverse of the Hessian of the
negative log-likelihood (the observed information). The networks train on the weighted MEAN loss
``L = Σ wᵢ·ℓᵢ / Σ wᵢ``, so that Hessian is ``Σ wᵢ·H_mean`` (``m·H_mean`` without weights): the weights
are taken as frequency weights, a weight of 2 standing for a row seen twice (as the training does).

Two reparametrisations sit between the trained weights and the reported numbers:

- **standardisation.** The network saw ``X_std = (X − μ)/σ``. Undone per output unit::

      w_raw = w / σ,       b_raw = b − Σⱼ wⱼ·μⱼ/σⱼ,      i.e. θ_raw = J·θ_std,
      J = [[diag(1/σ), 0], [−(μ/σ)ᵀ, 1]]   on (w, b),

  a linear bijection, so θ̂_raw is the maximum-likelihood estimate on the raw table and its covariance is
  ``J·Cov_std·Jᵀ`` exactly. The Hessian is built and inverted on standardised columns (standardised here
  when the training did not), where its condition number is what the data make it, not what the units and
  offsets of the columns make it (a year near 2000, a length in millimetres next to one in kilometres); then
  carried to the raw scale by ``J``. Computing it on the raw columns instead gives the same numbers in exact
  arithmetic, but loses digits to that artificial ill-conditioning and could not tell it from a flat
  likelihood.
- **the k-class gauge.** Adding one vector to every class's ``(w_c, b_c)`` leaves the softmax unchanged, so
  only differences between classes are estimable. As statsmodels' ``MNLogit`` does, the table reports the
  k − 1 contrasts ``θ_c − θ_0`` against the first class; the model in those parameters is the softmax with
  ``θ_0`` pinned to 0, whose Hessian is the full Hessian's block for classes 1..k−1. ``J`` acts on each class
  alike, so it commutes with taking differences.

A penalised fit (``l2 > 0``) has no such covariance (the inverse Hessian of the penalised loss describes the
penalised estimator's curvature, not its sampling variance): its table holds the estimates alone, one set per
class for k > 2 as scikit-learn's ``coef_`` (the penalty picks one representative of the gauge).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from neuron_torch.nn import layers
from neuron_torch.nn.networks import LinearModel

if TYPE_CHECKING:
    import pandas

INTERCEPT = "(intercept)"
COLUMNS = ["feature", "estimate", "std_error", "z", "p_value", "ci_low", "ci_high"]
Z_975 = 1.959963984540054  # Φ⁻¹(0.975): the 95 % interval is estimate ± 1.96·std_error

# Above this the Hessian's inverse is dominated by one or two directions along which the likelihood is flat:
# a constant or collinear feature, or quasi-complete separation driving some weights towards infinity. On
# standardised columns a well-posed fit sits orders of magnitude below; the inverse itself would still be
# accurate to κ·ε ≈ 1e-6, so the limit is about the statistics, not rounding.
CONDITION_LIMIT = 1e10
# The fit counts as converged when one more Newton step would move it by less than this many standard errors
# (the Newton decrement √(gᵀ·H⁻¹·g · Σw)), whatever the update rule and its tol were.
STEP_LIMIT = 1e-3
# m·N² multiply-adds of the Hessian (N parameters): past this the standard errors are skipped, so that the
# end of a run does not outlast the training it reports on.
WORK_LIMIT = 5e10


def coefficient_table(net: LinearModel, feature_names: Sequence[str], classes: Sequence[str], mean, std,
                      X: Tensor, Y: Tensor, weight: Optional[Tensor] = None,
                      converged: Optional[bool] = None, without_errors: Optional[str] = None
                      ) -> "pandas.DataFrame":
    """Estimates on the original feature scale, with standard errors, z, p-values and 95 % intervals.

    Parameters
    ----------
    net : SingleNeuron or SoftmaxRegression
        The trained network (no hidden layers: a network with them has no coefficients, ``TypeError``).
    feature_names : sequence of str, length n
    classes : sequence of str, length k
        The label values; for two classes ``[negative, positive]``.
    mean, std : array-like, shape (n,)
        The standardisation the network's input went through, ``X = (X_raw − mean)/std`` (zeros and ones
        without standardisation).
    X : Tensor, shape (m, n)
        The rows trained on, as the network saw them (standardised).
    Y : Tensor, shape (m, 1) or (m, k)
        Labels in {0, 1} (two classes) or one-hot (k classes).
    weight : Tensor, shape (m, 1), optional
        Sample weights of the training, taken as frequency weights.
    without_errors : str, optional
        Why no standard errors are taken (estimates only); the table's status says it.
    converged : bool, optional
        Whether the training met its ``tol``: False gives no standard errors (the table says so). Either way
        the estimate must be within ``STEP_LIMIT`` standard errors of the optimum.

    Returns
    -------
    pandas.DataFrame
        Columns ``feature, estimate, std_error, z, p_value, ci_low, ci_high``, and ``class`` first for k > 2;
        ``(intercept)`` then the features, per class. Two classes: the positive class's log-odds, one row per
        parameter. k classes, unpenalised: the k − 1 contrasts against ``classes[0]`` (``class`` names the
        class compared with it). k classes, penalised: all k classes' own coefficients. ``table.attrs`` holds
        ``status`` (one line: where the standard errors come from, or why there are none, and what the
        estimates are contrasts of) and ``reference`` (``classes[0]``, or None for a penalised k-class fit).
    """
    if not isinstance(net, LinearModel):
        raise TypeError(f"{type(net).__name__} has hidden layers: its weights are not coefficients of the "
                        "features; the table is for SingleNeuron and SoftmaxRegression")
    W = net.linear.weight.detach().to("cpu", torch.float64)  # (k_out, n), k_out = 1 for the sigmoid unit
    b = net.linear.bias.detach().to("cpu", torch.float64)  # (k_out,)
    k_out, n = W.shape
    if len(feature_names) != n:
        raise ValueError(f"feature_names has {len(feature_names)} names for {n} weights")
    mu = torch.as_tensor(mean, dtype=torch.float64).reshape(-1).cpu()  # (n,)
    sigma = torch.as_tensor(std, dtype=torch.float64).reshape(-1).cpu()  # (n,)
    theta = torch.cat([W, b[:, None]], 1)  # (k_out, n + 1): per unit (w, b), std scale
    J = _scaling_jacobian(mu, sigma)  # (n + 1, n + 1): θ_raw = J·θ_std
    raw = theta @ J.T  # (k_out, n + 1)

    multinomial = k_out > 1
    penalised = net.l2 > 0
    if not multinomial:  # the sigmoid unit: the log-odds of the positive class against the negative one
        estimate, labels, reference = raw, [str(classes[-1])], str(classes[0])
    elif penalised:  # the penalty has picked one representative per class: report it, as coef_ does
        estimate, labels, reference = raw, [str(c) for c in classes], None
    else:  # the identifiable parameters: contrasts against class 0
        estimate, labels, reference = raw[1:] - raw[0], [str(c) for c in classes[1:]], str(classes[0])

    if without_errors is not None:
        cov, status = None, without_errors
    elif penalised:
        cov, status = None, (f"L2 penalty {net.l2:g}: no standard errors (the inverse Hessian of a penalised "
                             "loss is not the estimates' covariance); estimates only")
    else:
        cov, status = _covariance(theta, J, X, Y, weight, converged)

    statistics = {column: [] for column in COLUMNS[2:]}  # per reported unit, (n + 1,) each, in (w, b) order
    for c in range(len(labels)):
        se = cov[c].diagonal().sqrt() if cov is not None else torch.full((n + 1,), math.nan, dtype=torch.float64)
        est = estimate[c]
        z = est / se
        p = torch.special.erfc(z.abs() / math.sqrt(2))  # two-sided, normal: 2·(1 − Φ(|z|))
        for column, values in (("std_error", se), ("z", z), ("p_value", p), ("ci_low", est - Z_975 * se),
                               ("ci_high", est + Z_975 * se)):
            statistics[column].append(values)
    per_unit = {column: torch.stack(values).numpy() for column, values in statistics.items()}  # (k, n + 1) each
    table = linear_table(estimate[:, :n].numpy(), estimate[:, n].numpy(), [str(f) for f in feature_names], labels,
                         statistics=per_unit)
    if not multinomial:
        table = table.drop(columns="class")
        status += f"; log-odds of {labels[0]!r} against {reference!r}"
    elif reference is not None:
        status += f"; each class contrasted with {reference!r}"
    table.attrs["status"] = status
    table.attrs["reference"] = reference
    return table


def linear_table(W, b, feature_names: Sequence[str], labels: Sequence, intercept: Literal["row", "column"] = "row",
                 statistics: Optional[dict[str, np.ndarray]] = None) -> "pandas.DataFrame":
    """A linear layer's parameters as a table, unit by unit: the one layout of every coefficient and weight table.

    Parameters
    ----------
    W : array-like, shape (k, n)
        One row of weights per output unit.
    b : array-like, shape (k,)
        The units' biases.
    feature_names : sequence, length n
    labels : sequence, length k
        What each unit stands for (its class).
    intercept : {"row", "column"}
        ``"row"``: columns ``class, feature, estimate``, per unit the bias as the row ``(intercept)`` first,
        then one row per feature (statsmodels' and R's order), k·(n + 1) rows. ``"column"``: columns ``class,
        feature, weight, bias``, one row per feature with the unit's bias beside it, k·n rows.
    statistics : dict of str to array-like of shape (k, n + 1), optional
        More columns beside ``estimate`` (``"row"`` only), one value per parameter, each unit's as ``(w, b)``:
        its n weights, then its bias.

    Returns
    -------
    pandas.DataFrame
    """
    import pandas as pd

    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    k, n = W.shape
    names = np.empty(n, dtype=object)
    names[:] = list(feature_names)
    units = np.empty(k, dtype=object)
    units[:] = list(labels)
    if intercept == "column":
        if statistics:
            raise ValueError("statistics are columns of the row layout (intercept='row')")
        return pd.DataFrame({"class": np.repeat(units, n), "feature": np.tile(names, k),
                             "weight": W.reshape(-1), "bias": np.repeat(b, n)})

    def rows(of_w: np.ndarray, of_b: np.ndarray) -> np.ndarray:
        """One column: (k, n) values of the weights and (k,) of the biases, per unit (intercept) first."""
        return np.concatenate([of_b.reshape(k, 1), of_w], axis=1).reshape(-1)  # k·(n + 1)

    columns = {"class": np.repeat(units, n + 1),
               "feature": rows(np.tile(names, (k, 1)), np.full(k, INTERCEPT, dtype=object)),
               "estimate": rows(W, b)}
    for column, values in (statistics or {}).items():
        values = np.asarray(values, dtype=np.float64).reshape(k, n + 1)
        columns[column] = rows(values[:, :n], values[:, n])
    return pd.DataFrame(columns)


def _scaling_jacobian(mu: Tensor, sigma: Tensor) -> Tensor:
    """``J`` (n + 1, n + 1) with ``(w_raw, b_raw) = J·(w_std, b_std)``: ``w/σ`` and ``b − Σ w·μ/σ``."""
    n = mu.numel()
    J = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    J[:n, :n] = torch.diag(1 / sigma)  # ∂w_raw/∂w = diag(1/σ)
    J[n, :n] = -mu / sigma  # ∂b_raw/∂w = −μ/σ
    J[n, n] = 1.0  # ∂b_raw/∂b = 1
    return J


def _covariance(theta: Tensor, J: Tensor, X: Tensor, Y: Tensor, weight: Optional[Tensor],
                converged: Optional[bool]) -> tuple[Optional[Tensor], str]:
    """Per reported unit, the raw-scale covariance (c, n + 1, n + 1) of its ``(w, b)``, or None, and the status.

    ``theta`` (k_out, n + 1) holds the standardised-scale ``(w, b)`` of each output unit.
    """
    k_out, n1 = theta.shape
    n = n1 - 1
    X = X.detach().to("cpu", torch.float64)  # (m, n)
    Y = Y.detach().to("cpu", torch.float64)  # (m, k_out) or (m, k)
    if weight is not None:
        weight = weight.detach().to("cpu", torch.float64).reshape(-1, 1)  # (m, 1)
    m = X.shape[0]
    total = float(weight.sum()) if weight is not None else float(m)  # Σw: the log-likelihood is −Σw·L_mean
    rows = f"{m} rows" + (f", weights summing to {total:g} (as frequencies)" if weight is not None else "")
    if not torch.isfinite(theta).all():
        return None, "the weights are not finite: no standard errors"
    W, b = theta[:, :n], theta[:, n]
    Z = layers.linear_forward(X, W, b)  # (m, k_out)

    if _separated(Z, Y, weight):
        return None, ("the classes are separated by a hyperplane (complete separation): the maximum-likelihood "
                      "estimate does not exist (the weights grow without bound); no standard errors")
    # the Hessian on columns standardised here (a no-op after the training's standardisation): same Z with
    # W·σ₂ and b + W·μ₂, so θ_given = J₂·θ_here and the covariance goes to the raw scale through J·J₂
    mu2, sigma2 = X.mean(0), X.std(0, unbiased=False)  # (n,), (n,)
    sigma2 = torch.where(sigma2 > 0, sigma2, torch.ones_like(sigma2))  # a constant column: centred to 0, H singular
    X = (X - mu2) / sigma2
    W, b = W * sigma2, b + W @ mu2
    J = J @ _scaling_jacobian(mu2, sigma2)
    if converged is False:
        return None, "the fit did not converge (its gradient norm never fell under tol): no standard errors"
    N = (n + 1) * max(1, k_out - 1)  # parameters of the identifiable model
    work = m * (N if k_out == 1 else k_out * (n + 1)) ** 2
    if work > WORK_LIMIT:
        return None, (f"standard errors skipped: the Hessian would take {work:.1e} multiply-adds "
                      f"(m·N² past {WORK_LIMIT:.0e})")

    if k_out == 1:  # the sigmoid unit: θ = (w, b), already in per-unit order
        H = layers.bce_hessian(X, W, b, weight)  # (n + 1, n + 1), of the mean loss
        A = layers.sigmoid(Z)
    else:  # the softmax layer, reduced to classes 1..k−1 (θ_0 pinned to 0), each as (w_c, b_c)
        full = layers.softmax_hessian(X, W, b, weight)  # (k(n + 1))², W row by row, then b
        keep = torch.tensor([i for c in range(1, k_out) for i in [*range(c * n, c * n + n), k_out * n + c]])
        H = full[keep][:, keep]  # ((k − 1)(n + 1))²
        A = layers.softmax(Z)
    dZ = layers.weight_backward(A - Y, weight)  # (m, k_out): the mean loss's dZ, weighted
    dW, db = layers.linear_backward(dZ, X)  # (k_out, n), (k_out,)
    g = torch.cat([dW, db[:, None]], 1)  # (k_out, n + 1), per unit (w, b)
    g = (g if k_out == 1 else g[1:]).reshape(-1)  # (N,), in H's order

    eigenvalues = torch.linalg.eigvalsh(H)  # ascending
    condition = float(eigenvalues[-1] / eigenvalues[0]) if eigenvalues[0] > 0 else math.inf
    if not condition < CONDITION_LIMIT:
        shown = "infinite" if math.isinf(condition) else f"{condition:.1e}"
        return None, (f"the Hessian is singular (condition number {shown}): a constant or collinear feature, "
                      "or classes separated on part of the rows (quasi-complete separation); no standard errors")
    H_inv = torch.linalg.inv(H)  # (N, N), of the mean loss
    steps = math.sqrt(max(0.0, float(g @ H_inv @ g)) * total)  # the Newton decrement, in standard errors
    if not steps < STEP_LIMIT:
        return None, (f"the fit did not converge: one Newton step would move it by {steps:.2g} standard errors "
                      "(train longer, or with model.update_rule newton); no standard errors")
    cov_std = H_inv / total  # (Σw·H_mean)⁻¹: the inverse observed information, std scale
    units = N // (n + 1)
    blocks = cov_std.reshape(units, n + 1, units, n + 1).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    cov_raw = J @ blocks @ J.T  # (units, n + 1, n + 1): J·Cov·Jᵀ per unit
    return cov_raw, f"standard errors from the inverse Hessian at the solution ({rows})"


def _separated(Z: Tensor, Y: Tensor, weight: Optional[Tensor]) -> bool:
    """Whether every row (of positive weight) lies strictly on its own class's side of the fitted boundary.

    Then the data are linearly separable: scaling ``(W, b)`` by any factor > 1 lowers the loss, so no
    finite maximum exists; this holds at whatever point the fit stopped.
    """
    if Z.shape[1] == 1:  # sigmoid unit: label 1 needs Z > 0, label 0 needs Z < 0
        margin = torch.where(Y[:, :1] > 0.5, Z[:, :1], -Z[:, :1])  # (m, 1)
    else:  # softmax: the true class's logit above every other
        true = (Z * Y).sum(1, keepdim=True)  # (m, 1)
        other = torch.where(Y > 0.5, -math.inf, Z).amax(1, keepdim=True)
        margin = true - other
    if weight is not None:
        margin = margin[weight[:, 0] > 0]
    return margin.numel() > 0 and bool((margin > 0).all())


def table_from_module(module, datamodule) -> Optional["pandas.DataFrame"]:
    """:func:`coefficient_table` of a trained :class:`~neuron_torch.train.module.NeuronModule` on its training rows,
    or None for a network with hidden layers (it has no coefficients)."""
    if not isinstance(module.net, LinearModel):
        return None
    X, Y = datamodule.split("train")
    classes = list(module.classes)
    if datamodule.summary.streamed:  # rows are not all in memory: estimates only
        return coefficient_table(module.net, module.feature_names, classes, module.feature_mean,
                                 module.feature_std, X, Y, without_errors="no standard errors for a table "
                                 "streamed from its shards; estimates only")
    weight = datamodule.weights("train")  # the weights trained on: sample weights times class weights
    tol = float(module.hparams.tol)
    converged = (module.converged_at is not None) if tol > 0 else None  # tol 0: judged by the Newton step
    return coefficient_table(module.net, module.feature_names, classes, module.feature_mean, module.feature_std,
                             X, Y, weight, converged)


def format_table(table: "pandas.DataFrame") -> str:
    """The table as aligned text: estimate, std_error, z, p, the 95 % interval, then its status line.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`coefficient_table`.

    Returns
    -------
    str
        Four significant digits per number; p-values under 1e-16 show as ``<1e-16`` (below float64's
        resolution of 1 − Φ).
    """
    has_se = bool(table["std_error"].notna().any())
    header = (["class"] if "class" in table else []) + ["feature", "estimate"]
    if has_se:
        header += ["std_error", "z", "p", "95% interval"]
    cells = []
    for r in table.to_dict("records"):
        line = ([str(r["class"])] if "class" in r else []) + [str(r["feature"]), _number(r["estimate"])]
        if has_se:
            p = r["p_value"]
            line += [_number(r["std_error"]), _number(r["z"], 3),
                     "<1e-16" if p < 1e-16 else f"{p:.3g}",
                     f"[{_number(r['ci_low'])}, {_number(r['ci_high'])}]"]
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    n_text = header.index("feature") + 1  # class and feature read left-aligned, the numbers right-aligned
    text = [_aligned(line, widths, n_text) for line in [header, *cells]]
    return "\n".join(["coefficients (original feature scale):", *text, table.attrs.get("status", "")]).rstrip()


def _number(value: float, digits: int = 4) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}g}"


def _aligned(cells: list[str], widths: list[int], n_text: int) -> str:
    return "  ".join(c.ljust(w) if i < n_text else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
