"""Sweeps: one parent MLflow run, one child run per point of a grid over any config keys."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from neuron_torch.train.stopping import Interrupted, StopSignals

log = logging.getLogger("neuron_torch")

SHORT_NAMES = {"learning_rate": "lr", "hidden_sizes": "hidden", "update_rule": "rule"}  # the classic figure says lr=0.1
GRACE_SECONDS = 60.0  # how long stopped children may take to checkpoint and end their runs before SIGKILL
POLL_SECONDS = 0.1


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


class SweepIncomplete(RuntimeError):
    """Some children did not finish (FAILED or KILLED runs); the parent run ends FAILED."""


def child_command(args: list[str]) -> list[str]:
    """The command that trains one grid point in its own process."""
    return [sys.executable, "-m", "neuron_torch.cli.commands", "train", *args]


def child_environment(workers: int) -> dict[str, str]:
    """The children's environment: the cores shared out, so ``workers`` children do not oversubscribe them.

    torch sizes its thread pool from ``OMP_NUM_THREADS``; without it each child would take every core.
    A value the user set is kept.
    """
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    package_root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def run_children(commands: list[list[str]], workers: int, env: dict[str, str],
                 grace_seconds: float = GRACE_SECONDS) -> list[Optional[int]]:
    """Run ``commands``, at most ``workers`` at once, each in its own process group; their exit codes.

    On SIGINT or SIGTERM the signal goes to every running child (which stops after its update in progress,
    writes a checkpoint and marks its run KILLED), no further child starts, the running ones get
    ``grace_seconds`` to end (then SIGKILL), and :class:`~neuron_torch.train.stopping.Interrupted` is raised.
    A second signal forwards that too (children then stop at once). Commands never started get ``None``.
    """
    codes: list[Optional[int]] = [None] * len(commands)
    running: dict[int, subprocess.Popen] = {}
    pending = list(range(len(commands)))
    with StopSignals("stopping the sweep: the running children stop after their update in progress, "
                     "no new one starts") as signals:
        signals.armed = True
        try:
            forwarded = None
            while pending or running:
                while pending and len(running) < workers and signals.signum is None:
                    i = pending.pop(0)
                    # a session of its own: a Ctrl-C at the terminal reaches the parent, which forwards it once
                    running[i] = subprocess.Popen(commands[i], env=env, start_new_session=True)
                if signals.signum is not None:
                    if forwarded is None:
                        forwarded = signals.signum
                        _signal_all(running.values(), forwarded)
                    break
                for i, proc in list(running.items()):
                    if proc.poll() is not None:
                        codes[i] = proc.returncode
                        del running[i]
                time.sleep(POLL_SECONDS)
        except Interrupted as again:  # a second signal: pass it on, the children stop at once
            _signal_all(running.values(), again.signum)
            forwarded = forwarded or again.signum
        finally:
            deadline = time.monotonic() + grace_seconds
            for i, proc in running.items():
                while codes[i] is None:
                    try:
                        codes[i] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        codes[i] = proc.wait()
                    except Interrupted as again:  # another signal while waiting: the children get it too
                        _signal_all(running.values(), again.signum)
    if signals.signum is not None:
        raise Interrupted(signals.signum)
    return codes


def _signal_all(procs, signum: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass


def mark_unfinished_killed(run) -> None:
    """Children still RUNNING once their processes are gone (killed before they could end their run): KILLED."""
    for child in run.client.search_runs([run.experiment_id], f"tags.`mlflow.parentRunId` = '{run.run_id}'",
                                        max_results=10_000):
        if child.info.status == "RUNNING":
            run.client.set_terminated(child.info.run_id, "KILLED")


def run_sweep(run, settings, base_args: list[str]) -> tuple[list, str | None]:
    """Train every grid point as a child of ``run`` (a :class:`~neuron_torch.tracking.run.TrackedRun`), then log
    the overlay of their loss curves, a table of their final metrics and the best child's tag on the parent.

    Each child is its own process (``python -m neuron_torch.cli.commands train ...``), at most ``settings.workers``
    at once, each with ``max(1, cores // workers)`` threads unless ``OMP_NUM_THREADS`` is set.

    Returns the children's MLflow runs, in grid order, and the best child's run id.

    Raises
    ------
    SweepIncomplete
        When a child did not finish (its run is FAILED or KILLED; the parent ends FAILED).
    Interrupted
        On SIGINT or SIGTERM, once every running child has ended its run KILLED (the parent ends KILLED).
    """
    import pandas as pd

    from neuron_torch.tracking import figures as plots

    points = grid_points(settings.grid)
    runs_args = [child_args(base_args, p, run.run_id, quiet=settings.workers > 1) for p in points]
    started = time.time()
    try:
        codes = run_children([child_command(a) for a in runs_args], settings.workers,
                             child_environment(settings.workers))
    except Interrupted:
        mark_unfinished_killed(run)
        raise
    mark_unfinished_killed(run)  # a child whose process died without ending its run (killed, out of memory)

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
        raise SweepIncomplete(f"{len(failed)} of {len(points)} sweep runs did not finish: {', '.join(failed)}")
    return children, best_id
