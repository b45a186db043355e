"""Seconds to reach scikit-learn's optimum loss + 1e-4 with k classes and weighted rows, and the scikit-learn
estimator's fit time, against scikit-learn, statsmodels, glum and skorch.

    python benchmarks/multiclass.py                      # every case; the synthetic tables at 1M rows
    python benchmarks/multiclass.py --rows 200000        # the synthetic tables smaller
    python benchmarks/multiclass.py --cases iris wine    # some cases only
    python benchmarks/multiclass.py --quick              # 100k-row synthetic tables, short caps

Needs the ``bench`` extra (``pip install -e .[bench]``: glum, skorch, statsmodels). The cases:

- ``iris``, ``wine``: scikit-learn's 3-class tables, standardised, float64, scikit-learn's default ``C = 1``.
- ``synthetic``: ``--rows``×64, 10 classes drawn from a softmax of random logits, float32, ``λ = 1e-4``.
- ``unpenalised``: the same table with ``λ = 0``, where statsmodels' ``MNLogit(...).fit(method="newton")``
  solves the same problem (statsmodels has no L2 for it; iris and wine have no unpenalised optimum: some
  classes are linearly separable, the coefficients grow without end).
- ``weighted``: wine (3 classes) and a ``--rows``×64 imbalanced binary table (10 % positives), each with
  integer sample weights 0–3 times ``class_weight="balanced"``; glum (no multinomial family in glum 3.4) on
  the binary one.
- ``estimator``: fit time on breast cancer of ``NeuronClassifier`` against ``LogisticRegression`` and skorch's
  ``NeuralNetBinaryClassifier`` around one ``nn.Linear(30, 1)``, median of several fits.

The objective is the same for every contender: the weighted mean cross-entropy plus ``(λ/2)·‖W‖²`` (biases not
penalised). scikit-learn gets it through ``C = 1/(λ·Σ sᵢ)``, glum through ``alpha = λ`` (its objective is
``deviance/(2·Σ sᵢ) + (alpha/2)·‖w‖²``). ``L*`` is the project's float64 loss at a tightly converged lbfgs
solution (``tol=1e-10``). The clock of each contender stops at the first iterate within ``L* + 1e-4``:

- the project's rules (gd, nesterov, adam, newton) from zeros, full batch, through ``forward_backward`` and the
  rule's ``step()`` (Newton with ``net.hessian``), no Lightning; the loss comes with the gradients. Each rule
  runs over a small learning-rate grid, each point capped at ``--cap`` seconds; the best is reported.
- lbfgs and glum have no per-iteration hook: their iterates are deterministic and the loss falls along them, so
  the fewest ``max_iter`` that reaches the target is found by bisection and that fit is timed (also the fit with
  the library's defaults).
- statsmodels: one ``fit`` with a callback that keeps a copy of each iterate and its time; the losses are
  computed afterwards. Its whole ``fit`` (which ends with one more Hessian for the standard errors) is shown too.

As in optimum.py, a timing taken while other processes used more than 10 % of the CPUs is repeated (up to
three tries, the fastest kept), and the JSON keeps that share. Prints tables, writes JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from optimum import describe_load, fastest_uncontended  # noqa: E402  (the same contention guard)

from neuron_torch.nn.networks import build_network  # noqa: E402
from neuron_torch.nn.optim import make_update_rule  # noqa: E402

GAP = 1e-4
RULES = ("gd", "nesterov", "adam", "newton")
# learning-rate grids. Standardised features: the cross-entropy's Hessian in the logits is at most ½·I (¼ for
# the sigmoid), so gradient descent is stable up to about 2/(½·λ_max(x̃x̃ᵀ)): ~1 on wine (λ_max ≈ 5),
# ~4 on the synthetic N(0, I) features. Nesterov (μ = 0.9) takes ~10× the effective step; Adam moves each
# weight by about α per update; Newton takes its own full step.
GRIDS_SMALL = {"gd": [0.5, 1.0, 2.0, 4.0], "nesterov": [0.1, 0.3, 1.0], "adam": [0.03, 0.1, 0.3],
               "newton": [1.0]}
GRIDS_LARGE = {"gd": [2.0, 4.0, 8.0], "nesterov": [0.5, 1.0], "adam": [0.03, 0.1], "newton": [1.0]}


@dataclass
class Problem:
    """One objective: features, labels, weights and λ, with the float64 copies the losses are checked on."""

    name: str
    X: np.ndarray  # (m, n), the dtype every contender gets (statsmodels converts to float64 itself)
    y: np.ndarray  # (m,) class index 0..k-1
    l2: float
    sample_weight: np.ndarray | None = None  # (m,) what the caller passes as sample_weight
    class_weight: str | None = None  # scikit-learn's class_weight
    grids: dict = field(default_factory=lambda: GRIDS_SMALL)
    s: np.ndarray = None  # (m,) the effective weight of each row: sample weight × class weight

    def __post_init__(self):
        m = len(self.y)
        self.k = int(self.y.max()) + 1
        s = np.ones(m) if self.sample_weight is None else self.sample_weight.astype(np.float64)
        if self.class_weight == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            per_class = compute_class_weight("balanced", classes=np.arange(self.k), y=self.y,
                                             sample_weight=self.sample_weight)
            s = s * per_class[self.y]
        self.s = s
        self.weighted = self.sample_weight is not None or self.class_weight is not None
        self.C = math.inf if self.l2 == 0 else 1.0 / (self.l2 * s.sum())
        dtype = torch.from_numpy(self.X[:1]).dtype
        self.Xt = torch.from_numpy(self.X)
        self.Yt = self._Y(dtype)
        self.Wt = torch.from_numpy(s).to(dtype)[:, None] if self.weighted else None
        self.X64 = self.Xt.double()
        self.Y64 = self._Y(torch.float64)
        self.W64 = torch.from_numpy(s)[:, None] if self.weighted else None
        self.dtype = str(dtype).removeprefix("torch.")

    def _Y(self, dtype):
        y = torch.from_numpy(self.y)
        if self.k == 2:
            return y.to(dtype)[:, None]  # (m, 1)
        return torch.nn.functional.one_hot(y.long(), self.k).to(dtype)  # (m, k)

    def loss_at(self, coef, intercept) -> float:
        """The project's float64 objective at scikit-learn-shaped (coef_, intercept_)."""
        net = build_network(self.X.shape[1], self.k, l2=self.l2, fused=False).double()
        with torch.no_grad():
            net.linear.weight.copy_(torch.as_tensor(np.asarray(coef, dtype=np.float64)).reshape(net.linear.weight.shape))
            net.linear.bias.copy_(torch.as_tensor(np.asarray(intercept, dtype=np.float64)).reshape(-1))
        return net.loss(self.X64, self.Y64, self.W64).item()

    def sklearn(self, **kw):
        from sklearn.linear_model import LogisticRegression

        if self.l2 == 0:
            return LogisticRegression(solver="lbfgs", C=math.inf, class_weight=self.class_weight, **kw)
        return LogisticRegression(solver="lbfgs", C=self.C, class_weight=self.class_weight, **kw)


# --- the data -----------------------------------------------------------------------------------------------


def small_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return StandardScaler().fit_transform(X), y.astype(np.int64)


def synthetic(m: int, n: int = 64, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X ~ N(0, I) float32; y drawn from softmax(X·W₀ᵀ + b₀), W₀ ~ N(0, 0.3²) (logits of standard deviation
    about 2.4, so no class is separable)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=gen)
    W0, b0 = 0.3 * torch.randn(k, n, generator=gen), 0.5 * torch.randn(k, generator=gen)
    y = torch.multinomial(torch.softmax(X @ W0.T + b0, dim=1), 1, generator=gen)[:, 0]
    return X.numpy(), y.numpy().astype(np.int64)


def imbalanced_binary(m: int, n: int = 64, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """X ~ N(0, I) float32; P(y = 1) = σ(x·w₀ − 3), about 10 % positives."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=gen)
    w0 = 0.3 * torch.randn(n, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ w0 - 3.0), generator=gen)
    return X.numpy(), y.numpy().astype(np.int64)


def integer_weights(m: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, m).astype(np.float64)  # 0–3; zeros drop a row out


# --- the contenders -----------------------------------------------------------------------------------------


def reference(p: Problem) -> dict:
    """scikit-learn's tightly converged optimum on float64 X, and the project's loss there."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = p.sklearn(tol=1e-10, max_iter=100_000).fit(p.X.astype(np.float64), p.y, sample_weight=p.sample_weight)
    return {"loss": p.loss_at(clf.coef_, clf.intercept_), "n_iter": int(clf.n_iter_[0]),
            "seconds": time.perf_counter() - t0}


def lbfgs(p: Problem, L: float, max_iter: int = 100) -> dict:
    """One timed lbfgs fit on the contenders' X, scikit-learn's defaults but for ``max_iter``."""
    clf = p.sklearn(max_iter=max_iter)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning at max_iter is part of the result
        clf.fit(p.X, p.y, sample_weight=p.sample_weight)
    seconds = time.perf_counter() - t0
    gap = p.loss_at(clf.coef_, clf.intercept_) - L
    return {"seconds": seconds, "n_iter": int(clf.n_iter_[0]), "gap": gap, "reached": gap <= GAP}


def glum_fit(p: Problem, L: float, max_iter: int = 100) -> dict:
    """glum's binomial GLM with ``alpha = λ`` (ridge), the effective weights as sample weights."""
    from glum import GeneralizedLinearRegressor

    model = GeneralizedLinearRegressor(family="binomial", alpha=p.l2, l1_ratio=0.0, max_iter=max_iter)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(p.X, p.y.astype(p.X.dtype), sample_weight=p.s.astype(p.X.dtype))  # one dtype throughout
    seconds = time.perf_counter() - t0
    gap = p.loss_at(model.coef_, [model.intercept_]) - L
    return {"seconds": seconds, "n_iter": int(model.n_iter_), "gap": gap, "reached": gap <= GAP,
            "solver": model._solver}


def fewest_iterations(fit, p: Problem, L: float) -> dict | None:
    """The defaults' fit, then the fewest ``max_iter`` that reaches L* + GAP (bisection), each timed."""
    default = fastest_uncontended(lambda: fit(p, L))
    result = {"default": default, "at_target": None}
    hi = default["n_iter"] if default["reached"] else None
    if hi is None:
        return result
    lo = 0  # max_iter = lo does not reach the target, hi does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fit(p, L, max_iter=mid)["reached"]:
            hi = mid
        else:
            lo = mid
    result["at_target"] = {**fastest_uncontended(lambda: fit(p, L, max_iter=hi)), "max_iter": hi}
    return result


def run_rule(p: Problem, rule: str, lr: float, L: float, cap: float) -> dict:
    """The project's rule from zeros until the loss at the current parameters is ≤ L* + GAP, or the cap."""
    net = build_network(p.X.shape[1], p.k, l2=p.l2).to(p.Xt.dtype)
    params = dict(net.named_parameters())
    opt = make_update_rule(rule, params.values(), lr)
    X, Y, W = p.Xt, p.Yt, p.Wt
    target = L + GAP
    status, updates, first = "not reached", 0, None
    t0 = time.perf_counter()
    with torch.no_grad():
        while True:
            bp = net.forward_backward(X, Y, W)
            loss = bp.loss.item()  # the loss before update `updates`, free with the gradients
            first = loss if first is None else first
            if loss <= target:
                status = "reached"
                break
            if not math.isfinite(loss) or loss > 10 * first:
                status = "diverged"
                break
            if time.perf_counter() - t0 > cap:
                break
            for name, g in bp.gradients.items():
                params[name].grad = g
            if rule == "newton":
                opt.step(hessian=net.hessian(X, W))  # at the parameters of the gradient
            else:
                opt.step()
            updates += 1
    seconds = time.perf_counter() - t0
    gap64 = net.double().loss(p.X64, p.Y64, p.W64).item() - L
    return {"rule": rule, "lr": lr, "status": status, "seconds": seconds, "updates": updates,
            "gap": loss - L, "gap_float64": gap64}


def best_rules(p: Problem, L: float, cap: float, rules) -> dict:
    build_network(p.X.shape[1], p.k, l2=p.l2).to(p.Xt.dtype).forward_backward(p.Xt, p.Yt, p.Wt)  # warm-up
    best, runs = {}, []
    for rule in rules:
        tried = []
        for lr in p.grids[rule]:
            r = fastest_uncontended(lambda: run_rule(p, rule, lr, L, cap))
            print(f"    {rule:<9} lr={lr:<5g} {r['status']:<11} {r['updates']:>6} updates {r['seconds']:8.3f} s  "
                  f"loss − L* = {r['gap']:.1e}  {describe_load(r)}", flush=True)
            tried.append(r)
        runs += tried
        reached = [r for r in tried if r["status"] == "reached"]
        best[rule] = min(reached, key=lambda r: r["seconds"]) if reached else \
            min(tried, key=lambda r: r["gap"] if math.isfinite(r["gap"]) else math.inf)
    return {"best": best, "runs": runs}


def statsmodels_newton(p: Problem, L: float) -> dict:
    """statsmodels' MNLogit (k > 2) or Logit, Newton, with a callback that keeps each iterate and its time."""
    import statsmodels.api as sm

    X = sm.add_constant(p.X.astype(np.float64), prepend=False)  # the intercept last, as the project orders it
    model = (sm.MNLogit if p.k > 2 else sm.Logit)(p.y, X)
    stamps = []
    t0 = time.perf_counter()

    def callback(params, *args):
        stamps.append((time.perf_counter() - t0, np.array(params, copy=True)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = model.fit(method="newton", maxiter=100, disp=False, callback=callback)
    total = time.perf_counter() - t0
    n = p.X.shape[1]
    out = {"fit_seconds": total, "n_iter": int(result.mle_retvals["iterations"]),
           "converged": bool(result.mle_retvals["converged"]), "seconds": None, "iterations_to_target": None}
    for i, (t, params) in enumerate(stamps):
        B = params.reshape(n + 1, -1, order="F") if p.k > 2 else params.reshape(n + 1, 1)  # (n + 1, k − 1)
        if p.k > 2:
            B = np.hstack([np.zeros((n + 1, 1)), B])  # class 0 is statsmodels' base: logits 0
        gap = p.loss_at(B[:n].T, B[n]) - L
        if gap <= GAP and out["seconds"] is None:
            out.update(seconds=t, iterations_to_target=i + 1, gap=gap)
    out["final_gap"] = gap
    return out


# --- one case -----------------------------------------------------------------------------------------------


def run_case(p: Problem, cap: float, rules, glum: bool = False, statsmodels: bool = False) -> dict:
    m, n = p.X.shape
    print(f"\n== {p.name}: {m}×{n}, {p.k} classes, {p.dtype}, λ = {p.l2:g} (C = {p.C:.6g})"
          f"{', weighted' if p.weighted else ''}", flush=True)
    ref = reference(p)
    L = ref["loss"]
    print(f"  L* = {L:.10f}  (lbfgs tol=1e-10 on float64: {ref['n_iter']} iterations, {ref['seconds']:.2f} s)",
          flush=True)
    out = {"size": [m, n], "k": p.k, "dtype": p.dtype, "l2": p.l2, "C": p.C, "weighted": p.weighted,
           "reference": ref}
    out["lbfgs"] = fewest_iterations(lbfgs, p, L)
    show("lbfgs", out["lbfgs"])
    if glum:
        out["glum"] = fewest_iterations(glum_fit, p, L)
        show("glum", out["glum"])
    if statsmodels:
        out["statsmodels"] = fastest_uncontended(lambda: statsmodels_timed(p, L))
        sm = out["statsmodels"]
        print(f"  statsmodels newton: to target {fmt(sm['seconds'])} ({sm['iterations_to_target']} iterations); "
              f"whole fit {sm['fit_seconds']:.3f} s, {sm['n_iter']} iterations", flush=True)
    out["rules"] = best_rules(p, L, cap, rules)
    return out


def statsmodels_timed(p: Problem, L: float) -> dict:
    r = statsmodels_newton(p, L)
    return {**r, "seconds": r["seconds"] if r["seconds"] is not None else r["fit_seconds"]}


def show(name: str, r: dict) -> None:
    d, t = r["default"], r["at_target"]
    print(f"  {name} defaults: {d['seconds']:.3f} s, {d['n_iter']} iterations, loss − L* = {d['gap']:.1e}"
          + (f"; fewest to target: max_iter={t['max_iter']}, {t['seconds']:.3f} s" if t else "; target not reached"),
          flush=True)


def fmt(seconds) -> str:
    return "—" if seconds is None else f"{seconds:.3f} s"


# --- the estimator on breast cancer -------------------------------------------------------------------------


def estimator_fits(repeats: int) -> dict:
    """Median fit time of NeuronClassifier, LogisticRegression and skorch on standardised breast cancer."""
    import skorch
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from neuron_torch.sklearn import NeuronClassifier

    X, y = load_breast_cancer(return_X_y=True)
    m, n = X.shape
    alpha = 1e-4  # NeuronClassifier's default λ; LogisticRegression's C = 1/(λ·m) is the same objective

    class Linear(torch.nn.Module):  # one sigmoid neuron's logit, shape (m,), for BCEWithLogitsLoss
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(n, 1)

        def forward(self, X):
            return self.linear(X)[:, 0]

    gd = NeuronClassifier().fit(X, y)  # the defaults: gradient descent, α = 0.5, tol 1e-4 on ‖∇‖
    epochs = gd.n_iter_
    torch.manual_seed(0)
    makers = {
        "NeuronClassifier() (gd, α = 0.5)": lambda: NeuronClassifier(),
        "NeuronClassifier(solver='newton', learning_rate=1)": lambda: NeuronClassifier(solver="newton",
                                                                                      learning_rate=1.0),
        "NeuronClassifier(dtype='float32')": lambda: NeuronClassifier(dtype="float32"),
        "make_pipeline(StandardScaler(), LogisticRegression(C = 1/(λ·m)))": lambda: make_pipeline(
            StandardScaler(), LogisticRegression(C=1.0 / (alpha * m))),
        f"skorch NeuralNetBinaryClassifier, SGD α = 0.5, full batch, {epochs} epochs": lambda: make_pipeline(
            StandardScaler(), skorch.NeuralNetBinaryClassifier(
                Linear, max_epochs=epochs, lr=0.5, batch_size=-1, train_split=None, verbose=0,
                optimizer=torch.optim.SGD, optimizer__weight_decay=alpha)),
    }
    results = {}
    for name, make in makers.items():
        Xf = X.astype(np.float32) if "skorch" in name else X
        yf = y.astype(np.float32) if "skorch" in name else y
        times, est = [], None
        for _ in range(repeats):
            est = make()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.fit(Xf, yf)
            times.append(time.perf_counter() - t0)
        proba = est.predict_proba(Xf)[:, 1]
        last = est[-1] if hasattr(est, "steps") else est
        iters = getattr(last, "n_iter_", None)
        iters = int(np.max(iters)) if iters is not None else epochs
        results[name] = {"median_s": statistics.median(times), "times": times, "updates": iters,
                         "log_loss": float(log_loss(y, proba)), "accuracy": float(((proba > 0.5) == y).mean())}
        r = results[name]
        print(f"  {name:<78} {r['median_s'] * 1e3:9.2f} ms  {iters:>5} updates  log-loss {r['log_loss']:.4f}",
              flush=True)
    return {"size": [m, n], "alpha": alpha, "repeats": repeats, "fits": results}


# --- the tables ---------------------------------------------------------------------------------------------


def print_case_table(name: str, c: dict) -> None:
    lb = c["lbfgs"]["at_target"] or c["lbfgs"]["default"]
    base = lb["seconds"]
    print(f"\n{name}: {c['size'][0]}×{c['size'][1]}, {c['k']} classes  (÷ = ratio to lbfgs's time to the target)")
    print(f"  {'contender':<34} {'to target':>11} {'updates':>9} {'÷ lbfgs':>8}")
    rows = [("lbfgs, max_iter = fewest", lb["seconds"], f"{lb['n_iter']} it"),
            ("lbfgs, defaults", c["lbfgs"]["default"]["seconds"], f"{c['lbfgs']['default']['n_iter']} it")]
    if "glum" in c:
        g = c["glum"]["at_target"]
        rows.append(("glum binomial, max_iter = fewest", g["seconds"] if g else None,
                     f"{g['n_iter']} it" if g else ""))
    if "statsmodels" in c:
        s = c["statsmodels"]
        rows.append(("statsmodels newton", s["seconds"] if s["iterations_to_target"] else None,
                     f"{s['iterations_to_target']} it"))
    for rule, r in c["rules"]["best"].items():
        rows.append((f"{rule} (lr {r['lr']:g})", r["seconds"] if r["status"] == "reached" else None,
                     str(r["updates"])))
    for label, seconds, count in rows:
        ratio = "" if seconds is None else f"{seconds / base:.2f}"
        print(f"  {label:<34} {fmt(seconds):>11} {count:>9} {ratio:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cases = ["iris", "wine", "synthetic", "unpenalised", "weighted", "estimator"]
    parser.add_argument("--cases", nargs="+", default=cases, choices=cases)
    parser.add_argument("--rows", type=int, default=None, help="rows of the synthetic tables (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="100k-row synthetic tables, shorter caps")
    parser.add_argument("--cap", type=float, default=None,
                        help="seconds per rule and learning rate (default 10 on the small tables, 60 on the "
                             "synthetic ones; 3 and 15 with --quick)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--repeats", type=int, default=7, help="fits per estimator (the median is shown)")
    args = parser.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    cap_small = args.cap or (3.0 if args.quick else 10.0)
    cap_large = args.cap or (15.0 if args.quick else 60.0)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), target L* + {GAP:g}", flush=True)

    results = {}
    for name in ("iris", "wine"):
        if name in args.cases:
            X, y = small_table(name)
            results[name] = run_case(Problem(name, X, y, l2=1.0 / len(y)), cap_small, args.rules)
    if "synthetic" in args.cases or "unpenalised" in args.cases:
        X, y = synthetic(rows)
        if "synthetic" in args.cases:
            results["synthetic"] = run_case(Problem("synthetic", X, y, l2=1e-4, grids=GRIDS_LARGE), cap_large,
                                            args.rules)
        if "unpenalised" in args.cases:
            results["unpenalised"] = run_case(Problem("unpenalised", X, y, l2=0.0, grids=GRIDS_LARGE), cap_large,
                                              [r for r in args.rules if r == "newton"], statsmodels=True)
        del X, y
    if "weighted" in args.cases:
        X, y = small_table("wine")
        w = integer_weights(len(y))  # balanced class weights keep Σ sᵢ = Σ wᵢ: λ = 1/Σ wᵢ is C = 1
        results["weighted wine"] = run_case(
            Problem("weighted wine", X, y, l2=1.0 / w.sum(), sample_weight=w, class_weight="balanced"),
            cap_small, args.rules)
        X, y = imbalanced_binary(rows)
        w = integer_weights(rows)
        results["weighted binary"] = run_case(
            Problem("weighted binary", X, y, l2=1e-4, sample_weight=w, class_weight="balanced", grids=GRIDS_LARGE),
            cap_large, args.rules, glum=True)
        del X, y
    for name, c in results.items():
        print_case_table(name, c)
    if "estimator" in args.cases:
        print(f"\n== estimator fit on breast cancer, median of {args.repeats}")
        results["estimator"] = estimator_fits(args.repeats)

    import sklearn

    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "sklearn": sklearn.__version__, "rows": rows, "gap": GAP, "caps_s": [cap_small, cap_large],
            "argv": sys.argv[1:]}
    for lib in ("glum", "statsmodels", "skorch"):
        try:
            meta[lib] = __import__(lib).__version__
        except ImportError:
            pass
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"multiclass-{rows}-{'-'.join(args.cases) if args.cases != cases else 'all'}-{meta['date']}.json"
    path.write_text(json.dumps({"meta": meta, "cases": results}, indent=2, default=float))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
