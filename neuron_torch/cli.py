"""Command line: ``python train.py`` / ``neuron-torch train``, configured by LightningCLI (jsonargparse)."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# jsonargparse warns about its own APIs that Lightning's CLI still calls: nothing a user can act on
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from neuron_torch.data import DataError, NeuronDataModule
from neuron_torch.module import LossProgressBar, NeuronModule
from neuron_torch.sweep import SweepSettings

log = logging.getLogger("neuron_torch")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "default.yaml"
SUPPORTED_PRECISION = ("32-true", "64-true", "32", "64")


@dataclass
class MLflowSettings:
    """Where and how a run is tracked.

    Parameters
    ----------
    tracking_uri : str, optional
        Store URI; ``MLFLOW_TRACKING_URI`` wins when set; default ``sqlite:///mlflow.db``.
    experiment : str
        Experiment name (created when missing).
    run_name : str, optional
        Run name; MLflow picks one when unset.
    log_every_n_steps : int, optional
        Cadence of the per-update metrics (``train/loss``, ``b``, ``w/<feature>``, ...); default: 100 points
        per metric over ``trainer.max_steps``. The trajectory artifact keeps every update.
    max_weight_metrics : int
        How many ``w/<feature>`` metrics a wide table gets (the first in column order).
    parent_run_id : str, optional
        Make the run a child of this one (sweeps set it for each grid point).
    register_as : str, optional
        Also register the run's model in the Model Registry under this name (a new version each run).
    """

    tracking_uri: Optional[str] = None
    experiment: str = "neuron_torch"
    run_name: Optional[str] = None
    log_every_n_steps: Optional[int] = None
    max_weight_metrics: int = 100
    parent_run_id: Optional[str] = None
    register_as: Optional[str] = None


class _Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # one line on a parse error instead of every option; --help still lists them all
        (file or sys.stdout).write(f"usage: {self.prog} [--config FILE] [--print_config] [--SECTION.KEY VALUE ...]\n")


class NeuronCLI(LightningCLI):
    """LightningCLI with the ``mlflow`` section and the data's feature names linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(MLflowSettings, "mlflow")
        parser.add_class_arguments(SweepSettings, "sweep")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Continue training from this Lightning checkpoint (weights, update-rule "
                                 "state, step and batch order); the new run is tagged resumed_from.")
        # the model's size comes from the table: reading it here checks the data before any run exists
        parser.link_arguments("data.feature_names", "model.feature_names", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # the loss in the progress bar, unless the bar is off or the config brings its own
        given = list(config.get("callbacks") or []) + callbacks
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = callbacks + [LossProgressBar()]
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            # training is one epoch whose end is max_steps: save there, whatever the validation interval
            callbacks = callbacks + [ModelCheckpoint(save_on_train_epoch_end=True)]
        return super()._instantiate_trainer(self._in_training_steps(config, given), callbacks)

    def _in_training_steps(self, config: dict, callbacks: list) -> dict:
        """The Trainer's config with ``val_check_interval`` turned from updates into training steps.

        Each training step runs ``model.updates_per_step`` updates; that count is lowered to a divisor of the
        validation interval, of any checkpoint interval and of a resumed checkpoint's update count, so
        validation and checkpoints fall on the same updates whatever it is. It changes no number, only how
        often Lightning's loop turns.
        """
        k = self.model.updates_per_step
        every = config.get("val_check_interval")
        intervals = [every] if isinstance(every, int) else []
        resumed_at = _global_step_of(self.config.get("ckpt_path"))
        if resumed_at:  # a resumed run's steps must start on a step boundary too
            intervals.append(resumed_at)
        intervals += [c._every_n_train_steps for c in callbacks
                      if isinstance(c, ModelCheckpoint) and c._every_n_train_steps]
        for interval in intervals:
            k = math.gcd(k, interval)
        self.model.updates_per_step = k
        if isinstance(every, int):
            config = {**config, "val_check_interval": every // k}
        return config


def build_cli(args: Optional[list[str]] = None) -> NeuronCLI:
    """Parse the command line and configs, seed, and instantiate data, model and Trainer."""
    return NeuronCLI(
        NeuronModule, NeuronDataModule,
        run=False,  # train() below drives fit and test, inside an MLflow run
        parser_class=_Parser,
        args=args,
        save_config_callback=None,  # the resolved config goes to the MLflow run instead of log_dir
        auto_configure_optimizers=False,  # the update rules are the model's own, chosen by model.update_rule
        seed_everything_default=0,
        parser_kwargs={"allow_abbrev": False,  # --trainer.max_step is a typo, not --trainer.max_steps
                       "default_config_files": [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else [],
                       "description": "Train a hand-written sigmoid neuron (or deeper network), "
                                      "tracked in MLflow."},
        trainer_defaults={
            "logger": False,  # tracking is MLflow's, through neuron_torch.tracking
            "check_val_every_n_epoch": None,  # training is one long epoch: validate every N steps
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "precision": "32-true",  # stated, so the logged config says float32
        },
    )


def train(args: Optional[list[str]] = None) -> int:
    """Config → seed → data → model → tracking → fit → test → summary. Returns the exit code."""
    _setup_logging()
    argv = list(args) if args is not None else sys.argv[1:]  # what a sweep repeats for each grid point

    # config, seed, data (read and checked), model and trainer, all before an MLflow run exists
    try:
        cli = build_cli(args)
    except (DataError, ValueError) as err:
        return _user_error(err)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    settings: MLflowSettings = cli.config_init.mlflow
    if str(trainer.precision) not in SUPPORTED_PRECISION:
        return _user_error(f"trainer.precision must be 32-true (float32) or 64-true (float64), "
                           f"got {trainer.precision}")
    if trainer.max_steps is None or trainer.max_steps < 1:
        return _user_error("trainer.max_steps must be >= 1: training is one stream of updates")
    if settings.log_every_n_steps is not None and settings.log_every_n_steps < 1:
        return _user_error(f"mlflow.log_every_n_steps must be >= 1, got {settings.log_every_n_steps}")

    if rank_zero_only.rank != 0:  # a data-parallel worker: it trains; rank 0 alone tracks and reports
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
        return 0

    # tracking: the run exists from here on and always ends FINISHED, FAILED or KILLED
    from neuron_torch import tracking  # imports MLflow, which --help and config errors need not wait for

    uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    tags = {"data": data.table_source, "network": type(model.net).__name__}
    if settings.parent_run_id:
        tags["mlflow.parentRunId"] = settings.parent_run_id
    sweep: SweepSettings = cli.config_init.sweep
    if sweep.grid:
        return _sweep(cli, sweep, argv, uri, tags)
    ckpt_path = cli.config.ckpt_path
    if ckpt_path is not None:
        if not Path(ckpt_path).is_file():
            return _user_error(f"{ckpt_path}: checkpoint not found")
        try:
            tags["resumed_from"] = _run_id_of(ckpt_path) or ""
        except Exception as err:  # not a file torch can read: the user's path is wrong
            return _user_error(f"{ckpt_path}: not a Lightning checkpoint ({type(err).__name__})")
    run_name = settings.run_name or _default_run_name(model)
    run = None
    try:
        with tracking.TrackedRun(uri, settings.experiment, run_name, tags) as run:
            run.log_params(_flat_config(cli))
            config_yaml = cli.parser.dump(cli.config, skip_unset=False)
            run.log_text(config_yaml, "config.yaml")
            tracker = tracking.MLflowTracking(run, settings.log_every_n_steps, settings.max_weight_metrics)
            trainer.callbacks.append(tracker)
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath is None:
                trainer.checkpoint_callback.dirpath = str(Path("checkpoints").resolve() / run.run_id)

            model.mlflow_run_id = run.run_id  # saved in checkpoints, so a resumed run can name its origin
            trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
            results = trainer.test(model, datamodule=data, verbose=False)[0]

            run.log_text(tracking.weight_table(model).to_csv(index=False), "weights.csv")
            tracking.log_model(run, model, data.raw_split("test")[0][:5], data.classes, config_yaml,
                               settings.register_as)
            tracking.log_figures(run, tracker, model, data)
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
                run.set_tag("checkpoint", trainer.checkpoint_callback.best_model_path)
    except (SystemExit, KeyboardInterrupt):
        if getattr(run, "status", None) == "KILLED":
            print(f"\ninterrupted: run {run.run_id} was marked KILLED, with everything logged so far",
                  file=sys.stderr)
            return 130
        raise

    _summary(run, uri, results, model)
    return 0


def _sweep(cli: NeuronCLI, sweep: SweepSettings, args: list[str], uri: str, tags: dict[str, str]) -> int:
    """A parent run whose children are the grid's points, each trained as its own ``train`` call."""
    from neuron_torch import tracking
    from neuron_torch.sweep import grid_points, run_sweep

    flat = _flat_config(cli)
    unknown = [key for key in sweep.grid if key not in flat or key.startswith(("sweep.", "mlflow."))]
    if unknown:
        return _user_error(f"sweep.grid: {unknown[0]!r} is not a model, data or trainer key of the config")
    if any(not isinstance(values, list) or not values for values in sweep.grid.values()):
        return _user_error("sweep.grid: every key needs a non-empty list of values")
    settings: MLflowSettings = cli.config_init.mlflow
    name = settings.run_name or f"sweep-{'-'.join(k.split('.')[-1] for k in sweep.grid)}-{time.strftime('%m%d-%H%M%S')}"
    with tracking.TrackedRun(uri, settings.experiment, name, {**tags, "sweep": "parent"}) as run:
        run.log_params(flat)
        run.log_text(cli.parser.dump(cli.config, skip_unset=False), "config.yaml")
        children, best_id = run_sweep(run, sweep, args)
    print(f"\nsweep {run.run_name} ({run.run_id}) in experiment {run.experiment!r}: {run.status}, "
          f"{len(grid_points(sweep.grid))} runs")
    for child in children:
        value = child.data.metrics.get(sweep.metric, float("nan"))
        best = "  <- best" if child.info.run_id == best_id else ""
        print(f"  {child.info.run_name:<28} {sweep.metric} {value:.4f}{best}")
    print(f"compare them with: {_ui_command(uri)}   (open the experiment, select the runs, Compare)")
    return 0


def _default_run_name(model: NeuronModule) -> str:
    """What the run is, at a glance: ``neuron-gd-lr0.5-…`` or ``net16x16-adam-lr0.02-…``, plus the time.

    (MLflow's own random names repeat here, as its generator draws from the seeded ``random`` module.)
    """
    hp = model.hparams
    kind = "net" + "x".join(map(str, hp.hidden_sizes)) if hp.hidden_sizes else "neuron"
    unique = uuid.uuid4().hex[:4]  # two runs started in the same second still differ
    return f"{kind}-{hp.update_rule}-lr{hp.learning_rate:g}-{time.strftime('%m%d-%H%M%S')}-{unique}"


def _global_step_of(ckpt_path: Optional[str]) -> int:
    """Updates done by the run that wrote a checkpoint; 0 when there is none or it cannot be read (the path
    is checked, with a clear error, before training)."""
    import torch

    if ckpt_path is None:
        return 0
    try:
        return int(torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step", 0))
    except Exception:
        return 0


def _run_id_of(ckpt_path: str) -> Optional[str]:
    """The MLflow run that wrote a checkpoint (None for checkpoints from elsewhere)."""
    import torch

    # a Lightning checkpoint holds hyperparameters as Python objects: the user's own file, loaded in full
    return torch.load(ckpt_path, map_location="cpu", weights_only=False).get("mlflow_run_id")


def _flat_config(cli: NeuronCLI) -> dict[str, object]:
    """Every resolved config key, dotted (``model.learning_rate``), for MLflow params."""
    flat = vars(cli.config.clone().as_flat())
    flat.pop("__default_config__", None)
    flat["config"] = [str(path) for path in flat.get("config") or []]  # the --config files given
    return {key: value for key, value in sorted(flat.items())}


def _summary(run, uri: str, results: dict[str, float], model: NeuronModule) -> None:
    lines = ["", f"run {run.run_name} ({run.run_id}) in experiment {run.experiment!r}: {run.status}"]
    steps = model.global_step
    converged = f", converged (gradient norm < tol) at step {model.converged_at}" if model.converged_at else ""
    lines.append(f"  {steps} updates{converged}")
    for key in sorted(results):
        lines.append(f"  {key:<16} {results[key]:.4f}")
    lines.append(f"see it with: {_ui_command(uri)}   (then open http://127.0.0.1:5000)")
    print("\n".join(lines))


def _ui_command(uri: str) -> str:
    return "mlflow ui" if uri == "sqlite:///mlflow.db" else f"mlflow ui --backend-store-uri {uri}"


def _user_error(err: Exception | str) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _setup_logging() -> None:
    # a deprecation inside Lightning itself, printed on every run, that users can do nothing about
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if not any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        log.addHandler(_StderrHandler())
        log.setLevel(logging.INFO)
        log.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Log lines to the ``sys.stderr`` of the moment, so a redirected or captured stderr gets them too."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the live sys.stderr is used instead
        pass


def predict(args: Optional[list[str]] = None) -> int:
    """Score a table with a logged model: the input rows plus ``probability`` and ``prediction`` columns."""
    import argparse

    parser = argparse.ArgumentParser(prog="neuron-torch predict", allow_abbrev=False,
                                     description="Score a CSV or Parquet table with a model logged by a run.")
    parser.add_argument("--model", required=True, help="model URI: runs:/<run id>/model or models:/<name>/<version>")
    parser.add_argument("--input", required=True, help="CSV or Parquet file with the model's feature columns")
    parser.add_argument("--output", required=True, help="CSV file to write")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability at which prediction is 1")
    opts = parser.parse_args(args)
    _setup_logging()

    import pandas as pd

    source = Path(opts.input)
    if not source.is_file():
        return _user_error(f"{opts.input}: file not found")
    try:
        rows = pd.read_parquet(source) if source.suffix.lower() in (".parquet", ".pq") else pd.read_csv(source)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        return _user_error(f"{opts.input}: cannot be read: {str(err).splitlines()[0]}")

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from neuron_torch.tracking import fluent_tracking_uri, resolve_tracking_uri

    try:
        with fluent_tracking_uri(resolve_tracking_uri(None)):
            model = mlflow.pyfunc.load_model(opts.model)
    except Exception as err:  # MLflow raises several types for a URI that names nothing
        return _user_error(f"cannot load model {opts.model}: {str(err).splitlines()[0]}")
    needed = model.metadata.get_input_schema().input_names()
    missing = [name for name in needed if name not in rows.columns]
    if missing:
        return _user_error(f"{opts.input}: no column {missing[0]!r}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                           f"the model needs {len(needed)}: {', '.join(needed)}")
    for name in needed:
        values = pd.to_numeric(rows[name], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(bad.argmax())
            return _user_error(f"{opts.input}: column {name!r}, row {row + 1}: {rows[name].iloc[row]!s} "
                               "is not a number")
        rows[name] = values.astype("float64")
    probability = model.predict(rows[needed])
    rows["probability"] = probability
    rows["prediction"] = (rows["probability"] >= opts.threshold).astype(int)
    rows.to_csv(opts.output, index=False)
    log.info("%d rows scored, %d predicted 1 (threshold %g): %s", len(rows), int(rows["prediction"].sum()),
             opts.threshold, opts.output)
    return 0


def main() -> None:
    """The ``neuron-torch`` console script: ``neuron-torch train [options]`` or ``neuron-torch predict ...``."""
    argv = sys.argv[1:]
    if argv and argv[0] == "predict":
        sys.exit(predict(argv[1:]))
    if argv and argv[0] == "train":
        argv = argv[1:]
    sys.exit(train(argv))
