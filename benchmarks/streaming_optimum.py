"""Seconds to within 1e-4 of the optimum loss, streamed from Parquet shards, against dask-ml's LogisticRegression.

    python benchmarks/streaming_optimum.py            # 2^20 rows × 64 float32 in 8 row groups, 1.3 GB budget
    python benchmarks/streaming_optimum.py --quick    # 2^18 rows, 8 row groups: under a minute

The table (written by the script into a temporary folder, removed after): X ~ N(0, 1) float32 and a label drawn
from ``Bernoulli(σ(X·w + b))`` with ``‖w‖ = 3``: a well-conditioned, unpenalised problem whose optimum is
unique. The budget is set so the table is streamed (it does not fit as a loaded table) in chunks of one whole
row group each: 8 chunks. Steps:

1. The optimum: Newton in float64 on the loaded table, with an intercept column, to a gradient norm under 1e-12;
   ``L*`` is its mean cross-entropy, and the target is ``L* + 1e-4``. The loss is the same function of the fit
   whether the features are standardised or not (an affine change of coordinates, no penalty), so the project's
   standardised fit and dask-ml's fit on the stored features are measured against the same ``L*``.
2. This project, streamed: one statistics pass (means and standard deviations, every value checked), then from
   zeros per update: :func:`neuron_torch.nn.chunked.full_batch` over a :class:`StreamedSplit` (float32
   ``SingleNeuron``, the fused kernel, Newton's Hessian summed over the same chunks), then the rule's ``step()``,
   as ``NeuronModule`` runs it. The clock stops at the first pass whose loss is ≤ the target; each rule runs over
   a small grid of learning rates (and momenta), each point capped, and the fastest is reported.
3. dask-ml's ``LogisticRegression`` (no penalty, intercept fitted) with solvers ``lbfgs`` and ``newton`` on a
   dask array with one block per row group, i.e. the same chunks: once read from the same shards by the dask
   graph in every iteration (pyarrow ``read_row_group`` then Arrow's row-major export, as the project's reader
   does), once from the table already in memory (what dask does with the reading taken away). lbfgs is timed
   to the first iterate at the target (scipy's callback; the loss check there is taken off the clock); newton
   with the fewest ``max_iter`` that reaches it.

The default threaded dask scheduler, with as many workers as CPUs. Prints a table and writes JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from neuron_torch.data.budget import chunk_rows, fits_in_memory, read_reserve
from neuron_torch.data.chunks import read_chunks
from neuron_torch.nn.networks import SingleNeuron
from neuron_torch.nn.optim import make_update_rule
from neuron_torch.data.shards import open_shards
from neuron_torch.data.split import TRAIN, Split
from neuron_torch.data.streaming import StreamedSplit, feature_moments
from neuron_torch.nn.chunked import full_batch

GAP = 1e-4
# (rule, learning rate, momentum): gd is stable up to α = 2/L, L ≈ ¼·λ_max(XᵀX/m) ≤ 0.25 here; α = 1 is Newton's
# own step
GRID = [("gd", 4.0, 0.0), ("gd", 6.0, 0.0), ("gd", 8.0, 0.0),
        ("nesterov", 1.0, 0.6), ("nesterov", 2.0, 0.6), ("nesterov", 1.0, 0.9), ("nesterov", 2.0, 0.9),
        ("newton", 1.0, 0.0)]


def write_shards(folder: Path, rows: int, n: int, shard_rows: int, group_rows: int) -> None:
    """``rows`` × ``n`` float32 N(0, 1) features and a 0/1 label drawn from the logistic model."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=n)
    w *= 3.0 / np.linalg.norm(w)
    names = [f"x{j}" for j in range(n)]
    for k, lo in enumerate(range(0, rows, shard_rows)):
        size = min(shard_rows, rows - lo)
        with pq.ParquetWriter(folder / f"part-{k:05d}.parquet",
                              pa.schema([*(pa.field(c, pa.float32()) for c in names), ("label", pa.int8())])) as out:
            for g in range(0, size, group_rows):
                m = min(group_rows, size - g)
                X = rng.standard_normal((m, n), dtype=np.float32)
                p = 1 / (1 + np.exp(-(X @ w + 0.25)))
                y = (rng.random(m) < p).astype(np.int8)
                out.write_table(pa.table({**{c: X[:, j] for j, c in enumerate(names)}, "label": y}),
                                row_group_size=group_rows)


def read_group(path: str, group: int, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One row group as ``(X float32 (r, n) row-major, y float64 (r,))``."""
    table = pq.ParquetFile(path).read_row_group(group, columns=[*features, "label"])
    batch = table.select(features).combine_chunks().to_batches()[0]
    return batch.to_tensor(row_major=True).to_numpy(), table.column("label").to_numpy().astype(np.float64)


def mean_loss(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    """Mean cross-entropy of ``σ(X·w + b)`` in float64: mean(softplus(Z) − y·Z)."""
    Z = X @ w + b
    return float(np.mean(np.logaddexp(0.0, Z) - y * Z))


def optimum(X: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """Newton in float64 with an intercept: (L*, final gradient norm, iterations)."""
    m, n = X.shape
    beta = np.zeros(n + 1)
    for it in range(1, 50):
        Z = X @ beta[:n] + beta[n]
        A = 1 / (1 + np.exp(-Z))
        dZ = A - y
        g = np.append(X.T @ dZ, dZ.sum()) / m
        D = A * (1 - A)
        XD = X * D[:, None]
        H = np.empty((n + 1, n + 1))
        H[:n, :n] = X.T @ XD
        H[:n, n] = H[n, :n] = XD.sum(0)
        H[n, n] = D.sum()
        beta -= np.linalg.solve(H / m, g)
        if np.linalg.norm(g) < 1e-12:
            break
    Z = X @ beta[:n] + beta[n]
    A = 1 / (1 + np.exp(-Z))
    g = np.append(X.T @ (A - y), (A - y).sum()) / m
    return mean_loss(X, y, beta[:n], beta[n]), float(np.linalg.norm(g)), it


def streamed_rule(stream, n: int, name: str, lr: float, momentum: float, target: float, cap_s: float,
                  cap_updates: int) -> dict:
    """One update rule from zeros over the streamed table until the loss reaches ``target``."""
    net = SingleNeuron(n)
    rule = make_update_rule(name, net.parameters(), lr, momentum=momentum or 0.9)
    losses, start = [], time.perf_counter()
    with torch.no_grad():
        for k in range(cap_updates + 1):
            bp = full_batch(net, stream, hessian=name == "newton")
            elapsed = time.perf_counter() - start
            losses.append(float(bp.loss))
            if losses[-1] <= target:
                return {"updates": k, "seconds": elapsed, "losses": losses}
            if elapsed > cap_s:
                break
            for key, p in net.named_parameters():
                p.grad = bp.gradients[key]
            rule.step() if name != "newton" else rule.step(hessian=bp.hessian)
    return {"updates": None, "seconds": None, "losses": losses}


class Reached(Exception):
    """Raised from scipy's callback to stop lbfgs at the target."""


def dask_fit(solver: str, X, y, X_mem: np.ndarray, y_mem: np.ndarray, target: float, max_iter: int = 60) -> dict:
    """dask-ml's LogisticRegression (no penalty) to the target: seconds and iterations."""
    import dask_glm.algorithms as algorithms
    from dask_ml.linear_model import LogisticRegression

    n = X_mem.shape[1]
    # dask-glm sets a dask option under its old name and passes scipy an option it deprecates: not ours to fix
    warnings.filterwarnings("ignore", category=FutureWarning, module="dask")
    warnings.filterwarnings("ignore", message=".*iprint.*", category=DeprecationWarning)
    if solver == "lbfgs":  # the iterates through scipy's callback; the loss check there is off the clock
        inner = algorithms.fmin_l_bfgs_b
        state = {"paused": 0.0, "iterations": 0}

        def callback(beta):
            mark = time.perf_counter()
            state["iterations"] += 1
            if mean_loss(X_mem, y_mem, beta[:n], beta[n]) <= target:
                state["seconds"] = mark - state["start"] - state["paused"]
                raise Reached
            state["paused"] += time.perf_counter() - mark

        algorithms.fmin_l_bfgs_b = lambda *a, **kw: inner(*a, **kw, callback=callback)
        try:
            state["start"] = time.perf_counter()
            LogisticRegression(solver="lbfgs", penalty=None, max_iter=max_iter, tol=0.0).fit(X, y)
        except Reached:
            return {"iterations": state["iterations"], "seconds": state["seconds"]}
        finally:
            algorithms.fmin_l_bfgs_b = inner
        return {"iterations": None, "seconds": None}
    for k in range(0, 15):  # dask-glm's newton runs max_iter + 1 iterations
        start = time.perf_counter()
        model = LogisticRegression(solver="newton", penalty=None, max_iter=k, tol=0.0).fit(X, y)
        seconds = time.perf_counter() - start
        if mean_loss(X_mem, y_mem, model.coef_, model.intercept_) <= target:
            return {"iterations": k + 1, "seconds": seconds}
    return {"iterations": None, "seconds": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8, help="row groups, i.e. streamed chunks (2 per shard)")
    parser.add_argument("--quick", action="store_true", help="2^18 rows")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per learning rate at most")
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own, one per core); the reading thread "
                             "needs a core too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = (1 << 18) if args.quick else args.rows
    n, group_rows = args.features, -(-rows // args.groups)
    folder = Path(tempfile.mkdtemp(prefix="neuron-torch-optimum-"))
    result: dict = {"rows": rows, "features": n, "row_groups": args.groups, "row_group_rows": group_rows}
    try:
        write_shards(folder, rows, n, 2 * group_rows, group_rows)
        shards = open_shards(str(folder))
        features = [f"x{j}" for j in range(n)]
        reserve = read_reserve(shards.largest_row_group_bytes)
        # the smallest budget (in MB) whose chunks hold a whole row group: one chunk per row group
        budget = reserve + 10**6
        while chunk_rows(budget, n + 1, reserve) < group_rows:
            budget += 10**6
        assert not fits_in_memory(shards.rows, n + 1, budget)
        rows_per_chunk = chunk_rows(budget, n + 1, reserve)
        result.update(budget_mb=budget / 1e6, chunk_rows=min(rows_per_chunk, group_rows),
                      file_mb=sum(os.path.getsize(p) for p in shards.paths) / 1e6)
        print(f"{rows:,} x {n} float32 in {len(shards.paths)} shards of row groups of {group_rows:,} rows; budget "
              f"{budget / 1e6:.0f} MB: streamed in {args.groups} chunks of {min(rows_per_chunk, group_rows):,} rows")

        pieces = [(p, g) for p in shards.paths for g in range(pq.ParquetFile(p).num_row_groups)]
        loaded = [read_group(p, g, features) for p, g in pieces]
        X_mem = np.concatenate([X for X, _ in loaded])
        y_mem = np.concatenate([y for _, y in loaded])
        del loaded
        X64 = X_mem.astype(np.float64)
        start = time.perf_counter()
        L_star, grad_norm, iterations = optimum(X64, y_mem)
        target = L_star + GAP
        result.update(optimum_loss=L_star, optimum_grad_norm=grad_norm, optimum_newton_iterations=iterations)
        print(f"L* = {L_star:.10f} (float64 Newton, {iterations} iterations, |grad| {grad_norm:.1e}, "
              f"{time.perf_counter() - start:.1f} s); target L* + {GAP:g}")

        def plain_read():
            for p in shards.paths:
                pq.read_table(p, columns=[*features, "label"])

        plain_read()
        floor = []
        for _ in range(3):
            start = time.perf_counter()
            plain_read()
            floor.append(time.perf_counter() - start)
        result["plain_read_s"] = floor
        print(f"plain pyarrow read of the shards: {min(floor):.3f} s")

        split = Split(seed=0, val_fraction=0.0, test_fraction=0.0)
        start = time.perf_counter()
        with read_chunks(shards, features, rows_per_chunk, split=split, part=TRAIN, check=True) as chunks:
            stats = feature_moments(chunks)
        result["statistics_pass_s"] = time.perf_counter() - start
        stream = StreamedSplit(shards, features, "label", lambda y: y[:, None].astype(np.float64), rows_per_chunk,
                               split, TRAIN, stats.mean, stats.std, dtype=torch.float32)
        print(f"statistics pass: {result['statistics_pass_s']:.3f} s")

        runs = []
        for name, lr, mu in GRID:
            run = streamed_rule(stream, n, name, lr, mu, target, args.cap, 200)
            runs.append({"rule": name, "lr": lr, "momentum": mu, **run})
            took = "not reached" if run["seconds"] is None else f"{run['seconds']:.2f} s, {run['updates']} updates"
            print(f"  {name:9s} lr {lr:<4g} momentum {mu:<4g} {took}  (last loss − L* "
                  f"{run['losses'][-1] - L_star:.2e})")
        result["streamed"] = runs

        dask_runs = []
        if not args.skip_dask:
            import dask
            import dask.array as da
            import dask_ml

            parts = [dask.delayed(read_group, pure=True)(p, g, features) for p, g in pieces]
            sizes = [pq.ParquetFile(p).metadata.row_group(g).num_rows for p, g in pieces]
            X_pq = da.concatenate([da.from_delayed(part[0], (r, n), np.float32) for part, r in zip(parts, sizes)])
            y_pq = da.concatenate([da.from_delayed(part[1], (r,), np.float64) for part, r in zip(parts, sizes)])
            X_da = da.from_array(X_mem, chunks=(group_rows, n))
            y_da = da.from_array(y_mem, chunks=group_rows)
            for source, (X, y) in [("parquet", (X_pq, y_pq)), ("memory", (X_da, y_da))]:
                for solver in ("lbfgs", "newton"):
                    run = dask_fit(solver, X, y, X64, y_mem, target)
                    dask_runs.append({"solver": solver, "source": source, **run})
                    took = "not reached" if run["seconds"] is None else \
                        f"{run['seconds']:.2f} s, {run['iterations']} iterations"
                    print(f"  dask-ml {solver:6s} from {source:7s} {took}")
            result["dask_ml"] = dask_runs
            result["dask_versions"] = {"dask": dask.__version__, "dask_ml": dask_ml.__version__}
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    best = {}
    for r in result["streamed"]:
        if r["seconds"] is not None and (r["rule"] not in best or r["seconds"] < best[r["rule"]]["seconds"]):
            best[r["rule"]] = r
    f = min(result["plain_read_s"])
    print(f"\n| contender | setting | updates / iterations | seconds to L* + 1e-4 | × one plain read |")
    print("|---|---|---|---|---|")
    for rule, r in best.items():
        print(f"| neuron_torch streamed, {rule} | α {r['lr']:g}" + (f", μ {r['momentum']:g}" if rule == "nesterov"
              else "") + f" | {r['updates']} | {r['seconds']:.2f} | {r['seconds'] / f:.1f} |")
    for r in dask_runs:
        sec = "not reached" if r["seconds"] is None else f"{r['seconds']:.2f}"
        ratio = "" if r["seconds"] is None else f"{r['seconds'] / f:.1f}"
        print(f"| dask-ml {r['solver']} | from {r['source']} | {r['iterations']} | {sec} | {ratio} |")

    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "pyarrow": pa.__version__,
            "numpy": np.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    path = out / f"streaming-optimum-{rows}-{meta['threads']}threads-{meta['date']}.json"
    path.write_text(json.dumps({"meta": meta, "result": result}, indent=2))
    print(f"{meta}\nwritten: {path}")


if __name__ == "__main__":
    main()
