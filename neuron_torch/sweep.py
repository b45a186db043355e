"""Sweeps: one parent MLflow run, one child run per point of a grid over any config keys."""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Any

log = logging.getLogger("neuron_torch")

SHORT_NAMES = {"learning_rate": "lr"}  # the classic figure says lr=0.1


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def child_name(point: dict[str, Any]) -> str:
    """What differs, as the run's name: ``lr=0.1`` or ``hidden_sizes=[16, 16],lr=0.02``."""
    parts = []
    for key, value in point.items():
        short = key.split(".")[-1]
        parts.append(f"{SHORT_NAMES.get(short, short)}={json.dumps(value) if not isinstance(value, str) else value}")
    return ",".join(parts)


def child_args(base: list[str], point: dict[str, Any], parent_run_id: str, quiet: bool) -> list[str]:
    """The command line of one grid point: the sweep's own arguments, then its values, as a plain run."""
    args = list(base)
    for key, value in point.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    args += ["--sweep.grid", "{}", "--mlflow.parent_run_id", parent_run_id, "--mlflow.run_name", child_name(point)]
    return args + (["--trainer.enable_progress_bar", "false"] if quiet else [])


def _train_child(args: list[str]) -> int:  # top level, so worker processes can import it
    import sys

    from neuron_torch.training import train

    sys.argv = sys.argv[:1]  # the child's arguments are `args`, not the sweep's command line
    return train(args)


def run_sweep(run, settings, base_args: list[str]) -> tuple[list, str | None]:
    """Train every grid point as a child of ``run`` (a :class:`~neuron_torch.tracking.TrackedRun`), then log
    the overlay of their loss curves, a table of their final metrics and the best child's tag on the parent.

    Returns the children's MLflow runs, in grid order, and the best child's run id.

    Raises
    ------
    RuntimeError
        When a child did not finish (its run is FAILED or KILLED; the parent ends FAILED).
    """
    import pandas as pd

    from neuron_torch import plots

    points = grid_points(settings.grid)
    runs_args = [child_args(base_args, p, run.run_id, quiet=settings.workers > 1) for p in points]
    started = time.time()
    if settings.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            codes = list(pool.map(_train_child, runs_args))
    else:
        codes = [_train_child(args) for args in runs_args]

    found = run.client.search_runs([run.experiment_id], f"tags.`mlflow.parentRunId` = '{run.run_id}'",
                                   max_results=10_000)
    by_name = {r.info.run_name: r for r in found}
    children = [by_name.get(child_name(p)) for p in points]
    failed = [child_name(p) for p, c, code in zip(points, children, codes)
              if code != 0 or c is None or c.info.status != "FINISHED"]

    curves, table = {}, []
    for point, child in zip(points, children):
        if child is None:
            continue
        history = sorted((m.step, m.value) for m in run.client.get_metric_history(child.info.run_id, "train/loss"))
        curves[child.info.run_name] = ([s for s, _ in history], [v for _, v in history])
        table.append({"run": child.info.run_name, "run_id": child.info.run_id, "status": child.info.status,
                      **point, **child.data.metrics})
    if curves:
        run.log_figure(plots.sweep_overlay(curves), "plots/sweep_loss_curves.png")
    results = pd.DataFrame(table)
    run.log_text(results.to_csv(index=False), "sweep_results.csv")
    scored = results[results["status"] == "FINISHED"] if len(results) else results
    best_id = None
    if settings.metric in scored:
        best = scored.loc[scored[settings.metric].idxmin() if settings.mode == "min"
                          else scored[settings.metric].idxmax()]
        best_id = best["run_id"]
        run.client.set_tag(best_id, "best", f"{settings.mode} {settings.metric}")
        run.set_tag("best_run", f"{best['run']} ({best['run_id']})")
        log.info("best of %d by %s %s: %s (%s = %.4g)", len(scored), settings.mode, settings.metric,
                 best["run"], settings.metric, best[settings.metric])
    log.info("sweep of %d runs took %.1f s", len(points), time.time() - started)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(points)} sweep runs did not finish: {', '.join(failed)}")
    return children, best_id
