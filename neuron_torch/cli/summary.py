"""What a run prints when it ends, and what it is called: results, then what to do next.

The next steps are commands to paste: the MLflow UI's address of the run itself (not the experiment's landing
page), the resume command with the checkpoint, and the model URI for ``neuron-torch predict``.
"""

from __future__ import annotations

import shlex
import time
import uuid
from typing import Optional, Sequence

from neuron_torch.tracking.spool import shown_path

DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def run_name(update_rule: str, learning_rate: float, hidden_sizes: Sequence[int]) -> str:
    """A short name that starts with what differs between runs: ``gd-lr0.5-neuron-153514-a3``,
    ``adam-lr0.02-16x16-153514-7f``.

    The UI's run table cuts names at about 24 characters, so the update rule and learning rate come first,
    then the network, then the time of day (the table has a date column) and two hex digits that keep two
    runs started in the same second apart. (MLflow's own random names repeat here: its generator draws from
    the seeded ``random`` module.)
    """
    network = "x".join(map(str, hidden_sizes)) if hidden_sizes else "neuron"
    return f"{update_rule}-lr{learning_rate:g}-{network}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:2]}"


def ui_base(tracking_uri: str) -> str:
    """The UI's address: a tracking server is its own UI; a local store is served by ``mlflow ui``."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def ui_command(tracking_uri: str) -> Optional[str]:
    """The command that serves the UI for a local store (None for a server, which is already up)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return "mlflow ui" if tracking_uri == "sqlite:///mlflow.db" else f"mlflow ui --backend-store-uri {tracking_uri}"


# MLflow 3's UI opens experiments in its GenAI view (traces, "No data available") unless its workflow switch
# says "Model training"; the switch reads this query parameter and keeps the choice for later visits.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_address(tracking_uri: str, experiment_id: str, run_id: Optional[str] = None) -> str:
    """``http://127.0.0.1:5000/#/experiments/<id>/runs/<run id>?workflowType=machine_learning``: the run's
    page (or the experiment's table of runs), in the UI's model-training view."""
    page = f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}?{MODEL_TRAINING_VIEW}" if run_id else f"{page}?{MODEL_TRAINING_VIEW}"


def resume_command(argv: Sequence[str], checkpoint: str, max_steps: int) -> str:
    """``python train.py <the same options> --ckpt_path <checkpoint> --trainer.max_steps <max_steps>``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--ckpt_path", "--trainer.max_steps"):
            skip = True
            continue
        if arg.startswith(("--ckpt_path=", "--trainer.max_steps=")):
            continue
        kept.append(arg)
    return shlex.join(["python", "train.py", *kept, "--ckpt_path", shown_path(checkpoint),
                       "--trainer.max_steps", str(max_steps)])


def run_summary(run, tracking_uri: str, results: dict[str, float], updates: int, argv: Sequence[str],
                checkpoint: Optional[str] = None, converged_at: Optional[int] = None,
                held_out: bool = True) -> str:
    """The lines printed at the end of a finished run.

    Parameters
    ----------
    run : TrackedRun
    tracking_uri : str
    results : dict of str to float
        The test metrics.
    updates : int
        Updates done (``global_step``).
    argv : sequence of str
        The command line the run was started with, repeated in the resume command.
    checkpoint : str, optional
        The last checkpoint written.
    converged_at : int, optional
        The update at which the gradient norm fell under ``tol``.
    held_out : bool
        Whether the metrics are on held-out rows (otherwise on the training rows, and said so).
    """
    lines = ["", f"run {run.run_name} ({run.run_id}) in experiment {run.experiment!r}: {run.status}"]
    converged = f", converged (gradient norm < tol) at update {converged_at}" if converged_at else ""
    lines.append(f"  {updates} updates{converged}")
    if not held_out:
        lines.append("  (no rows held out: these metrics are on the training rows)")
    lines += [f"  {key:<16} {results[key]:.4f}" for key in sorted(results)]
    lines += ["next:", f"  see it:    {_with_ui(tracking_uri, run_address(tracking_uri, run.experiment_id, run.run_id))}"]
    if checkpoint:
        lines.append(f"  continue:  {resume_command(argv, checkpoint, 2 * updates)}")
    lines.append(f"  predict:   neuron-torch predict --model runs:/{run.run_id}/model --input TABLE.csv "
                 "--output scored.csv")
    return "\n".join(lines)


def sweep_summary(run, tracking_uri: str, metric: str, children: list, best_id: Optional[str]) -> str:
    """The lines printed at the end of a sweep: one per child, the best marked, and where to compare them."""
    lines = ["", f"sweep {run.run_name} ({run.run_id}) in experiment {run.experiment!r}: {run.status}, "
                 f"{len(children)} runs"]
    for child in children:
        value = child.data.metrics.get(metric, float("nan"))
        best = "  <- best" if child.info.run_id == best_id else ""
        lines.append(f"  {child.info.run_name:<24} {metric} {value:.4f}{best}")
    lines += ["next:", f"  see it:    {_with_ui(tracking_uri, run_address(tracking_uri, run.experiment_id, run.run_id))}",
              "  compare:   on the experiment's Runs page, tick the children and press Compare"]
    return "\n".join(lines)


def _with_ui(tracking_uri: str, address: str) -> str:
    command = ui_command(tracking_uri)
    return f"{command}, then open {address}" if command else address
