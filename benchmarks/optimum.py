"""Seconds to reach scikit-learn's optimum loss + 1e-4, per update rule, against ``LogisticRegression`` (lbfgs).

    python benchmarks/optimum.py           # 2M×64 float32 on CPU: every rule over its learning-rate grid
    python benchmarks/optimum.py --quick   # 200k×64, well under a minute

The data are bench.py's (X ~ N(0, 1), Y = [X[:, 0] + 0.5·noise > 0]) with an L2 penalty ``λ`` small but
positive, so the optimum is unique; scikit-learn gets the same objective through ``C = 1/(λ·m)`` (see
tests/test_sklearn_match.py). Steps:

1. The optimum: ``LogisticRegression(solver="lbfgs", C, tol=1e-8)`` on float64 X; ``L*`` is the project's
   float64 loss at its coefficients (its gradient norm is reported, and bounds ``L − L*`` by ``‖∇‖²/(2λ)``).
2. The competitor: ``LogisticRegression(solver="lbfgs", C)`` with scikit-learn's defaults on the float32 X the
   rules see, timed (best of three), with its own loss − L*. The defaults stop well below the target, so the
   fit with the fewest ``max_iter`` that reaches it is timed too: lbfgs's own time to the target.
3. Each update rule from zeros, float32, full batch, through the public API: ``SingleNeuron.forward_backward``
   for the loss and gradients, then the rule's ``step()`` (Newton also gets ``layers.bce_hessian``). The
   clock stops at the first update whose loss, which comes with the gradients, is ≤ L* + 1e-4. Each rule
   runs over a small learning-rate grid, each point capped at ``--cap`` seconds; the best is reported.

Every thread-parallel op here slows down badly when other processes share the CPUs (a thread that loses its
core holds up the others at each op's barrier), so each timing records the share of the CPUs that other
processes used meanwhile (Linux), and a timing taken while they used more than 10% is repeated, keeping the
fastest. Prints a table and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import data  # noqa: E402  (the same generator as the per-update benchmark)

from neuron_torch import SingleNeuron  # noqa: E402
from neuron_torch.nn import layers
from neuron_torch.nn.optim import make_update_rule  # noqa: E402

GAP = 1e-4  # reach L* + GAP
CONTENDED = 0.10  # repeat a timing during which other processes used more than this share of the CPUs
# learning-rate grids. The loss is L-smooth with L ≈ ¼·λ_max(XᵀX/m) + λ ≈ 0.25 for standard normal features,
# so plain GD is stable up to α ≈ 2/L = 8; momentum (μ = 0.9) multiplies the effective step by ~10; Adam's
# step is about α per coordinate, and w* ≈ (3.5, 0, …, 0) here; α = 1 is Newton's own step.
GRIDS = {
    "gd": [1.0, 2.0, 4.0, 8.0],
    "momentum": [0.25, 0.5, 1.0, 2.0],
    "nesterov": [0.25, 0.5, 1.0, 2.0],
    "adam": [0.01, 0.03, 0.1, 0.3],
    "newton": [0.5, 1.0],
}


class OtherLoad:
    """Share of all CPUs used by *other* processes while the ``with`` block runs (Linux; ``share`` is None
    elsewhere): busy ticks in /proc/stat minus this process's own CPU time."""

    share: float | None = None

    def __enter__(self):
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        if self._start is not None and end is not None:
            total, busy, own = (b - a for a, b in zip(self._start, end))
            self.share = max(0.0, (busy - own) / total) if total > 0 else None

    @staticmethod
    def _snapshot():
        try:
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        own = os.times()
        idle = ticks[3] + ticks[4]  # idle + iowait
        return sum(ticks), sum(ticks) - idle, (own.user + own.system) * os.sysconf("SC_CLK_TCK")


def fastest_uncontended(fn, attempts: int = 3) -> dict:
    """``fn()`` → dict with "seconds"; repeated while other processes used > CONTENDED of the CPUs during it,
    up to ``attempts`` times; the fastest result, with ``other_load`` (that share) and ``attempts`` added.
    A run that hit its cap or diverged is not repeated: only a time to the target is worth a second try."""
    results = []
    for _ in range(attempts):
        with OtherLoad() as load:
            result = fn()
        results.append({**result, "other_load": load.share})
        if load.share is None or load.share <= CONTENDED or result.get("status", "reached") != "reached":
            break
    return {**min(results, key=lambda r: r["seconds"]), "attempts": len(results)}


def optimum(X: torch.Tensor, Y: torch.Tensor, l2: float) -> dict:
    """scikit-learn's tightly converged solution and the project's float64 loss there."""
    from sklearn.linear_model import LogisticRegression

    m, n = X.shape
    X64, Y64 = X.double(), Y.double()
    t0 = time.perf_counter()
    clf = LogisticRegression(solver="lbfgs", C=1.0 / (l2 * m), tol=1e-8, max_iter=10_000)
    clf.fit(X64.numpy(), Y64.numpy().ravel())
    seconds = time.perf_counter() - t0
    net = neuron_at(clf.coef_, clf.intercept_, l2)
    bp = net.forward_backward(X64, Y64)
    grad_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in bp.gradients.values()])).item()
    return {"loss": bp.loss.item(), "grad_norm": grad_norm, "gap_bound": grad_norm**2 / (2 * l2),
            "n_iter": int(clf.n_iter_[0]), "seconds": seconds, "X64": X64, "Y64": Y64}


def neuron_at(coef, intercept, l2: float) -> SingleNeuron:
    """A float64 SingleNeuron holding scikit-learn's (coef_, intercept_)."""
    coef = torch.as_tensor(np.asarray(coef, dtype=np.float64)).reshape(1, -1)
    net = SingleNeuron(coef.shape[1], l2=l2).double()
    with torch.no_grad():
        net.linear.weight.copy_(coef)
        net.linear.bias.copy_(torch.as_tensor(np.asarray(intercept, dtype=np.float64)).reshape(1))
    return net


def lbfgs(X: torch.Tensor, Y: torch.Tensor, l2: float, ref: dict, max_iter: int = 100) -> dict:
    """One fit of scikit-learn's lbfgs on the float32 data, defaults but for ``max_iter``: the competitor."""
    from sklearn.linear_model import LogisticRegression

    m = X.shape[0]
    clf = LogisticRegression(solver="lbfgs", C=1.0 / (l2 * m), max_iter=max_iter)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning at max_iter is part of the result
        clf.fit(X.numpy(), Y.numpy().ravel())
    seconds = time.perf_counter() - t0
    loss = neuron_at(clf.coef_, clf.intercept_, l2).loss(ref["X64"], ref["Y64"]).item()
    return {"seconds": seconds, "n_iter": int(clf.n_iter_[0]), "gap": loss - ref["loss"],
            "reached": loss <= ref["loss"] + GAP}


def run_rule(rule: str, lr: float, X: torch.Tensor, Y: torch.Tensor, l2: float, ref: dict, cap: float) -> dict:
    """Updates from zeros until the loss at the current parameters is ≤ L* + GAP, or the cap."""
    n = X.shape[1]
    net = SingleNeuron(n, init="zeros", l2=l2)
    params = dict(net.named_parameters())
    w, b = net.linear.weight, net.linear.bias
    opt = make_update_rule(rule, net.parameters(), lr)  # newton: neuron_torch.nn.optim.Newton
    target = ref["loss"] + GAP
    status, updates, first_loss = "not reached", 0, None
    t0 = time.perf_counter()
    with torch.no_grad():
        while True:
            bp = net.forward_backward(X, Y)
            loss = bp.loss.item()  # the loss at the parameters before update `updates`, free with the gradients
            first_loss = loss if first_loss is None else first_loss
            if loss <= target:
                status = "reached"
                break
            if not math.isfinite(loss) or loss > 10 * first_loss:
                status = "diverged"
                break
            if time.perf_counter() - t0 > cap:
                break
            for name, g in bp.gradients.items():
                params[name].grad = g
            if rule == "newton":
                H = layers.l2_hessian(layers.bce_hessian(X, w, b), l2)  # at the (w, b) of the gradient
                opt.step(hessian=H)
            else:
                opt.step()
            updates += 1
    seconds = time.perf_counter() - t0
    final = net.double().loss(ref["X64"], ref["Y64"]).item() - ref["loss"]  # float64 check of the end point
    return {"rule": rule, "lr": lr, "status": status, "seconds": seconds, "updates": updates,
            "loss_gap_float32": loss - ref["loss"], "loss_gap_float64": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k×64 instead of 2M×64")
    parser.add_argument("--l2", type=float, default=1e-4, help="λ of the L2 penalty (default 1e-4)")
    parser.add_argument("--cap", type=float, default=None,
                        help="seconds allowed per rule and learning rate (default 120, 5 with --quick)")
    parser.add_argument("--rules", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    args = parser.parse_args()
    m, n = (200_000, 64) if args.quick else (2_000_000, 64)
    cap = args.cap if args.cap is not None else (5.0 if args.quick else 120.0)
    l2 = args.l2

    X, Y = data(m, n, "cpu")
    print(f"{m}x{n} float32, λ = {l2:g} (C = {1 / (l2 * m):.6g}), target L* + {GAP:g}, "
          f"torch threads {torch.get_num_threads()}")

    ref = optimum(X, Y, l2)
    print(f"optimum: L* = {ref['loss']:.10f}, ‖∇L‖ there {ref['grad_norm']:.2e} (L − L* ≤ {ref['gap_bound']:.1e}), "
          f"lbfgs tol=1e-8: {ref['n_iter']} iterations, {ref['seconds']:.1f} s on float64")
    fits = [fastest_uncontended(lambda: lbfgs(X, Y, l2, ref)) for _ in range(3)]  # best of three or more
    comp = {**min(fits, key=lambda r: r["seconds"]), "all_seconds": [f["seconds"] for f in fits]}
    print(f"competitor: LogisticRegression(lbfgs) defaults: {comp['seconds']:.3f} s (best of "
          f"{sum(f['attempts'] for f in fits)}), {comp['n_iter']} iterations, loss − L* = {comp['gap']:.2e}"
          f"{'' if comp['reached'] else '  (NOT within the target)'}")
    # the defaults stop far below the target; the fewest iterations that reach it give lbfgs's own time to it
    at_target = None
    for k in range(1, comp["n_iter"] + 1):
        fit = fastest_uncontended(lambda: lbfgs(X, Y, l2, ref, max_iter=k))
        if fit["reached"]:
            at_target = {**fit, "max_iter": k}
            print(f"  lbfgs stopped at max_iter={k}, the first to reach the target: {fit['seconds']:.3f} s, "
                  f"loss − L* = {fit['gap']:.2e}")
            break

    SingleNeuron(n).forward_backward(X, Y)  # warm-up: a first call may build the fused kernel
    runs = []
    for rule in args.rules:
        for lr in GRIDS[rule]:
            run = fastest_uncontended(lambda: run_rule(rule, lr, X, Y, l2, ref, cap))
            runs.append(run)
            print(f"  {rule:<9} lr={lr:<5g} {run['status']:<11} {run['updates']:>6} updates "
                  f"{run['seconds']:8.2f} s   loss − L* = {run['loss_gap_float32']:.2e}   "
                  f"{describe_load(run)}")

    best = {}
    for rule in args.rules:
        tried = [r for r in runs if r["rule"] == rule]
        reached = [r for r in tried if r["status"] == "reached"]
        best[rule] = min(reached, key=lambda r: r["seconds"]) if reached else \
            min(tried, key=lambda r: r["loss_gap_float32"] if math.isfinite(r["loss_gap_float32"]) else math.inf)
    print_table(best, comp, at_target, cap)

    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "size": [m, n], "dtype": "float32", "l2": l2, "C": 1 / (l2 * m), "gap": GAP, "cap_s": cap}
    try:
        from threadpoolctl import threadpool_info
        meta["sklearn_threadpools"] = [{k: p[k] for k in ("internal_api", "num_threads")}
                                       for p in threadpool_info()]
    except ImportError:
        pass
    reference = {k: v for k, v in ref.items() if k not in ("X64", "Y64")}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    subset = "" if args.rules == list(GRIDS) else "-" + "-".join(args.rules)
    path = out / f"optimum-{'quick-' if args.quick else ''}{meta['date']}{subset}.json"
    path.write_text(json.dumps({"meta": meta, "optimum": reference, "lbfgs": comp, "lbfgs_at_target": at_target,
                                "grids": GRIDS, "runs": runs, "best": best}, indent=2))
    print(f"\nwritten: {path}")


def describe_load(run: dict) -> str:
    share = run.get("other_load")
    text = "" if share is None else f"others used {share:.0%} of the CPUs"
    return text + (f" ({run['attempts']} tries)" if run.get("attempts", 1) > 1 else "")


def print_table(best: dict, comp: dict, at_target: dict | None, cap: float) -> None:
    print(f"\n{'rule':<10} {'lr':>6} {'updates':>8} {'seconds':>9} {'÷ lbfgs':>8}  {'loss − L*':>9}  grid")
    print(f"{'lbfgs':<10} {'':>6} {comp['n_iter']:>8} {comp['seconds']:>9.2f} {1:>8.2f}  {comp['gap']:>9.1e}  "
          f"sklearn defaults; {describe_load(comp)}")
    if at_target is not None:
        print(f"{'lbfgs':<10} {'':>6} {at_target['n_iter']:>8} {at_target['seconds']:>9.2f} "
              f"{at_target['seconds'] / comp['seconds']:>8.2f}  {at_target['gap']:>9.1e}  "
              f"max_iter={at_target['max_iter']}, the fewest that reach the target; {describe_load(at_target)}")
    for rule, r in best.items():
        grid = ", ".join(f"{lr:g}" for lr in GRIDS[rule])
        if r["status"] == "reached":
            print(f"{rule:<10} {r['lr']:>6g} {r['updates']:>8} {r['seconds']:>9.2f} "
                  f"{r['seconds'] / comp['seconds']:>8.2f}  {r['loss_gap_float32']:>9.1e}  {grid}; {describe_load(r)}")
        else:
            print(f"{rule:<10} {r['lr']:>6g} {r['updates']:>8} {'not reached in ' + format(cap, 'g') + ' s':>18}  "
                  f"{r['loss_gap_float32']:>9.1e}  {grid}; {describe_load(r)}")


if __name__ == "__main__":
    main()
