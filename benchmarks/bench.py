"""Seconds per full-batch update of logistic regression, side by side, as a ratio to one read of X.

    python benchmarks/bench.py            # CPU sizes (and CUDA sizes when a GPU is present)
    python benchmarks/bench.py --quick    # small sizes, under a minute on a laptop CPU
    python benchmarks/bench.py --device cuda --out DIR   # CUDA rows only; JSON and a markdown table in DIR

Compared, in one process on the same data: the classic numpy recipe (X stored (n, m)), a naive torch hand
loop, torch autograd + torch.optim.SGD, torch.compile of the naive step, this project's
``SingleNeuron.gradients()`` + hand-written update, and the full Lightning-hosted run (marginal cost per
update from two runs of different length, so start-up is counted apart). On CUDA also: the updates of a training
step captured in a CUDA graph (:mod:`neuron_torch.train.cuda_graphs`) and X stored as bfloat16 (float32 accumulation). The
floor is one streaming read of X (``X.sum()``). Writes a table to stdout, and JSON and a markdown table to
``benchmarks/results/`` (or ``--out``). Lightning rows are skipped, saying why, where jsonargparse is missing, and
the tracked ones where MLflow is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from neuron_torch import SingleNeuron
from neuron_torch.kernels import fused
from neuron_torch.train.cuda_graphs import GraphedUpdates, neuron_update, watched
from neuron_torch.nn.optim import GradientDescent

LR = 0.1
GRAPH_K = 50  # updates per captured graph: the default updates_per_step


def timed(fn, device: str, min_seconds: float = 0.3, max_reps: int = 2000) -> float:
    """Median-of-chunks seconds per call of ``fn`` after a warm-up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(); fn(); sync()
    reps, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or reps >= max_reps:
            return elapsed / reps
        reps *= 2


def data(m: int, n: int, device: str):
    g = torch.Generator(device).manual_seed(0)  # on the device: 10M×64 made on a CPU would take a while
    X = torch.randn(m, n, generator=g, device=device)
    Y = (X[:, :1] + 0.5 * torch.randn(m, 1, generator=g, device=device) > 0).float()
    return X, Y


def candidates(X, Y, device: str) -> dict:
    m, n = X.shape
    out = {}

    if device == "cpu":  # the classic recipe: X stored (n, m), numpy, zeros
        Xn, Yn = X.numpy().T.copy(), Y.numpy().T.copy()
        state = {"w": np.zeros((n, 1), np.float32), "b": 0.0}

        def numpy_recipe():
            A = 1 / (1 + np.exp(-(state["w"].T @ Xn + state["b"])))
            dZ = A - Yn
            state["w"] -= LR * (Xn @ dZ.T) / m
            state["b"] -= LR * float(dZ.mean())
        out["numpy recipe"] = numpy_recipe

    w, b = torch.zeros(1, n, device=device), torch.zeros(1, device=device)

    def naive():
        A = torch.sigmoid(X @ w.T + b)
        dZ = A - Y
        w.sub_(LR * (dZ.T @ X) / m)
        b.sub_(LR * dZ.mean())
    out["naive torch"] = naive

    lin = torch.nn.Linear(n, 1).to(device)
    sgd = torch.optim.SGD(lin.parameters(), lr=LR)

    def autograd():
        sgd.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(lin(X), Y).backward()
        sgd.step()
    out["autograd + SGD"] = autograd

    try:
        wc, bc = torch.zeros(1, n, device=device), torch.zeros(1, device=device)

        @torch.compile
        def step(w, b):
            dZ = torch.sigmoid(X @ w.T + b) - Y
            return w - LR * (dZ.T @ X) / m, b - LR * dZ.mean()

        def compiled():
            nonlocal wc, bc
            wc, bc = step(wc, bc)
        compiled()
        out["torch.compile"] = compiled
    except Exception as err:  # no compiler toolchain: report, keep going
        print(f"  torch.compile unavailable: {type(err).__name__}")

    def hand_step(net: SingleNeuron):
        opt = GradientDescent(net.parameters(), LR)
        params = dict(net.named_parameters())

        def ours():
            for name, g in net.gradients(X, Y).items():
                params[name].grad = g
            opt.step()
        return ours
    out["neuron_torch"] = hand_step(SingleNeuron(n).to(device))  # fused one-pass kernel: C on CPU, Triton on CUDA
    out["neuron_torch reference"] = hand_step(SingleNeuron(n, fused=False).to(device))  # two passes over X
    if device == "cuda":
        out.update(cuda_candidates(X, Y))
    return out


def cuda_candidates(X, Y) -> dict:
    """The CUDA-only rows: GRAPH_K fused updates captured in one CUDA graph (``fn.updates`` updates per call), and
    the fused update on X stored as bfloat16 (float32 parameters and accumulation)."""
    n, out = X.shape[1], {}
    net = SingleNeuron(n).to(X.device)
    opt = GradientDescent(net.parameters(), LR)
    graphed = GraphedUpdates(neuron_update(net, opt, X, Y), GRAPH_K, watched(net, opt, X, Y))
    graphed.updates = GRAPH_K
    out[f"neuron_torch, CUDA graph of {GRAPH_K}"] = graphed

    Xb = X.bfloat16()
    low = SingleNeuron(n).to(X.device)
    if fused.neuron_pass(Xb, Y, low.linear.weight, low.linear.bias) is None:  # the reference path cannot mix dtypes
        print("  bfloat16 X skipped: the fused CUDA kernel is unavailable (see the warning above)")
        return out
    low_opt = GradientDescent(low.parameters(), LR)
    out["neuron_torch, bfloat16 X"] = neuron_update(low, low_opt, Xb, Y)
    return out


def lightning_per_update(size: str, m: int, n: int, device: str, steps: tuple[int, int]) -> dict[str, float]:
    """Marginal seconds per update of the Lightning-hosted run (``neuron_torch.cli.commands``, the default config).

    Two runs of different length each; the difference in wall time over the difference in updates leaves
    start-up, data and the MLflow run's creation out. Rows: without tracking, with the default MLflow
    tracking, and with tracking but one update per Lightning step (to show what ``model.updates_per_step``
    buys). Validation is off: the bare loops do not validate either.
    """
    import tempfile

    missing = [name for name in ("jsonargparse", "sklearn") if importlib.util.find_spec(name) is None]
    if missing:  # a bare GPU machine: the CLI needs jsonargparse, the synthetic data scikit-learn
        print(f"  Lightning rows skipped: {', '.join(missing)} not installed")
        return {}
    from neuron_torch.cli.commands import build_cli
    tracked = importlib.util.find_spec("mlflow") is not None
    if tracked:
        from neuron_torch.tracking.callback import MLflowTracking
        from neuron_torch.tracking.run import TrackedRun
    else:
        print("  Lightning + MLflow rows skipped: mlflow is not installed")

    folder = tempfile.mkdtemp(prefix="nt-bench-")
    uri = f"sqlite:///{folder}/mlflow.db"
    data_args = [] if size == "breast cancer" else [
        "--data.dataset", "synthetic", "--data.n_samples", str(int(m / 0.6) + 1), "--data.n_features", str(n)]
    common = data_args + ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
                          "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
                          "--trainer.val_check_interval", str(10**6), "--model.learning_rate", str(LR)]
    variants = {"lightning": ([], False)}
    if tracked:
        variants["lightning + mlflow"] = ([], True)
        if m <= 100_000:
            variants["lightning + mlflow, 1 update/step"] = (["--model.updates_per_step", "1"], True)
    results = {}
    for name, (extra, track) in variants.items():
        times = {k: [] for k in steps}
        for _ in range(2):  # the faster of two runs of each length: a shared machine's hiccups go away
            for k in steps:
                cli = build_cli(common + extra + ["--trainer.max_steps", str(k)])
                run = None
                if track:
                    run = TrackedRun(uri, "bench").__enter__()
                    cli.trainer.callbacks.append(MLflowTracking(run))
                t0 = time.perf_counter()
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                if run is not None:
                    run.__exit__(None, None, None)  # waits for every metric to be written
                times[k].append(time.perf_counter() - t0)
        short, long = (min(times[k]) for k in steps)
        results[name] = (long - short) / (steps[1] - steps[0])
    return results


def lightning_data(size: str, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split the Lightning-hosted run trains on, so the bare loops time the very same rows
    (the data matters: where the weights grow large, exp and log1p get slower)."""
    from neuron_torch.data.datamodule import NeuronDataModule

    if size == "breast cancer":
        data = NeuronDataModule()
    else:
        data = NeuronDataModule(dataset="synthetic", n_samples=int(m / 0.6) + 1, n_features=n)
    return tuple(t.float() for t in data.split("train"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (under a minute on CPU)")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning-hosted runs")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="which rows: cpu, cuda (needs a GPU), or all (CUDA rows when a GPU is present)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for the JSON and the markdown table")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")

    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.ERROR)

    # (device, rows, features, whether the Lightning-hosted run is timed too)
    sizes = []
    if args.device != "cuda":
        sizes += [("cpu", 0, 30, True), ("cpu", 100_000, 100, True)]
        if not args.quick:
            sizes += [("cpu", 1_000_000, 64, True), ("cpu", 2_000_000, 64, False), ("cpu", 500_000, 512, False)]
    if torch.cuda.is_available() and args.device != "cpu":
        sizes += [("cuda", 100_000, 30, True), ("cuda", 1_000_000, 64, True)]
        if not args.quick:
            sizes += [("cuda", 10_000_000, 64, False), ("cuda", 2_000_000, 512, False)]
    rows = []
    for device, m, n, with_lightning in sizes:
        size = "breast cancer" if m == 0 else f"{m}x{n}"  # breast cancer: the default config's data
        if with_lightning and device == "cpu":
            X, Y = lightning_data(size, m, n)
            m = X.shape[0]
        else:
            X, Y = data(m, n, device)
        read = timed(lambda: X.sum(), device)
        entry = {"device": device, "size": f"{size} ({m}x{n})" if size == "breast cancer" else size, "read_s": read}
        for name, fn in candidates(X, Y, device).items():
            entry[name] = timed(fn, device) / getattr(fn, "updates", 1)  # per update
        if with_lightning and not args.no_lightning:
            k = (500, 5500) if m * n <= 10**6 else (200, 1200) if m * n <= 10**7 else (20, 120)
            entry.update(lightning_per_update(size, m, n, device, k))
        rows.append(entry)
        print_row(entry)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "triton": _version("triton"), "fused on cuda": _fused_on_cuda()}
    stem = f"bench-{'quick-' if args.quick else ''}{'' if args.device == 'all' else args.device + '-'}{meta['date']}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(markdown_table(meta, rows))
    print(f"\n{meta}\nwritten: {path} and {stem}.md")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _fused_on_cuda() -> bool | None:
    """Whether the Triton kernel ran on this GPU (None without one): the CUDA rows mean nothing otherwise."""
    if not torch.cuda.is_available():
        return None
    X, Y = torch.ones(4, 3, device="cuda"), torch.ones(4, 1, device="cuda")
    net = SingleNeuron(3).cuda()
    return fused.neuron_pass(X, Y, net.linear.weight, net.linear.bias) is not None


def markdown_table(meta: dict, rows: list[dict]) -> str:
    """The rows as the README's table: ms per update and the ratio to one read of X; a blank where not timed."""
    columns = []
    for entry in rows:
        columns += [k for k in entry if k not in ("device", "size", "read_s") and k not in columns]
    lines = [f"{meta['date']}: {meta['gpu'] or meta['machine']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['threads']} CPU threads; fused kernel on CUDA: {meta['fused on cuda']}", "",
             "| device | size | one read of X | " + " | ".join(columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    for entry in rows:
        read = entry["read_s"]
        cells = [f"{entry[c] * 1e3:.4g} ms ({entry[c] / read:.3g}×)" if c in entry else "" for c in columns]
        lines.append(f"| {entry['device']} | {entry['size']} | {read * 1e3:.4g} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_row(entry: dict) -> None:
    read = entry["read_s"]
    print(f"\n{entry['device']} {entry['size']}: one read of X {read * 1e3:.3f} ms")
    for key, value in entry.items():
        if key in ("device", "size", "read_s"):
            continue
        print(f"  {key:<34} {value * 1e3:9.4f} ms/update  {value / read:7.2f}x read")
    hosted = entry.get("lightning + mlflow")
    if hosted:  # target: the hosted run at >= 80 % of a bare loop's updates per second
        for bare in ("neuron_torch", "naive torch"):
            print(f"  Lightning + MLflow runs at {entry[bare] / hosted:6.1%} of {bare}'s updates per second")


if __name__ == "__main__":
    main()
