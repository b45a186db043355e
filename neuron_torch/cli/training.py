"""One training run, start to end: config → seed → data → model → tracking → fit → test → summary.

Both ``neuron-torch train`` and each child of a sweep come here; the CLI and the sweep call down to it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only

from neuron_torch.cli import config, summary, validation
from neuron_torch.train import stopping
from neuron_torch.cli.config import MLflowSettings, NeuronCLI, SweepSettings
from neuron_torch.cli.console import setup_logging, user_error
from neuron_torch.errors import ConfigError, DataError



def trainer_problem(err: Exception) -> str:
    """A Trainer setting this machine cannot run, in one line that says what to do instead."""
    text = " ".join(str(err).split())
    if "gpu" in text.lower() and ("backend" in text.lower() or "cuda" in text.lower()):
        return ("trainer.accelerator gpu: no CUDA device was found (torch.cuda.is_available() is False); "
                "run on the CPU with --trainer.accelerator cpu (or auto)")
    return f"trainer: {text}"


def train(args: Optional[list[str]] = None) -> int:
    """Config → seed → data → model → tracking → fit → test → summary. Returns the exit code."""
    setup_logging()
    argv = list(args) if args is not None else sys.argv[1:]  # what a sweep repeats for each grid point

    # config (every key checked), seed, data (read and checked), model and trainer: all before a run exists
    try:
        cli = config.build_cli(args)
    except (DataError, ValueError) as err:  # ConfigError is a ValueError
        return user_error(err)
    except (MisconfigurationException, ModuleNotFoundError) as err:  # a Trainer setting this machine cannot run
        return user_error(trainer_problem(err))
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    settings: MLflowSettings = cli.config_init.mlflow
    try:
        checkpoint = validation.check_checkpoint(cli.config.ckpt_path, model, trainer.max_steps)
    except ConfigError as err:
        return user_error(err)

    if rank_zero_only.rank != 0:  # a data-parallel worker: it trains; rank 0 alone tracks and reports
        try:
            with stopping.StopSignals() as signals:  # a signal stops every rank at the same update
                # the checkpoint is written by rank 0; the other ranks only join its barrier
                trainer.callbacks.append(stopping.StopTraining(signals, store_folder(trainer)))
                trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path, weights_only=True)
                trainer.test(model, datamodule=data, verbose=False)
                _release_process_group()
        except stopping.Interrupted as stop:
            return stop.code
        except (stopping.Failed, DataError):
            return 1  # rank 0 reports it
        return 0

    # tracking: the run exists from here on and always ends FINISHED, FAILED or KILLED
    # imported here: --help and config errors need not wait for the tracking side
    from neuron_torch.tracking import callback, figures, model_files, reachability, store
    from neuron_torch.tracking.run import TrackedRun
    from neuron_torch.tracking.spool import KEPT_EXIT
    from neuron_torch.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(settings.tracking_uri)
    # a tracking server that does not answer: one line now, not minutes of retries (and MLflow's retries bounded)
    silent = reachability.store_error(uri)
    if silent:
        return user_error(silent)
    tags = {"data": data.table_source, "network": type(model.net).__name__}
    if settings.parent_run_id:
        tags["mlflow.parentRunId"] = settings.parent_run_id
    # where runs will write, checked before one exists: one line, not minutes of MLflow's retries
    problem = store.check_locations(uri, settings.experiment, store.checkpoint_folder(trainer))
    if problem:
        return user_error(problem)
    problem = _storage_problem(data, model, trainer)
    if problem:
        return user_error(problem)
    sweep: SweepSettings = cli.config_init.sweep
    if sweep.grid:
        return _sweep(cli, sweep, argv, uri, tags)
    ckpt_path = cli.config.ckpt_path
    if checkpoint is not None:
        tags["resumed_from"] = checkpoint.get("mlflow_run_id") or ""
    try:
        validation.check_parent_run(uri, settings.parent_run_id)
    except ConfigError as err:
        return user_error(err)
    run_name = settings.run_name or summary.run_name(model.hparams.update_rule, model.hparams.learning_rate,
                                                     model.hparams.hidden_sizes)
    run = None
    signals = stopping.StopSignals()  # SIGINT/SIGTERM: stop after the update in progress, keep a checkpoint
    try:
        with signals, TrackedRun(uri, settings.experiment, run_name, tags) as run:
            run.log_params(_flat_config(cli))
            config_yaml = cli.parser.dump(cli.config, skip_unset=False)
            run.log_text(config_yaml, "config.yaml")
            tracker = callback.MLflowTracking(run, settings.log_every_n_steps, settings.max_weight_metrics)
            trainer.callbacks.append(tracker)
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath is None:
                trainer.checkpoint_callback.dirpath = str(store.checkpoint_folder(trainer) / run.run_id)

            # after the tracker: a step's rows are buffered before a stop (signal, divergence) ends training
            trainer.callbacks.append(stopping.StopTraining(signals, store_folder(trainer, run.run_id)))

            model.mlflow_run_id = run.run_id  # saved in checkpoints, so a resumed run can name its origin
            # weights_only: Lightning's own load of the checkpoint runs no pickled code either
            trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
            if signals.signum is not None:  # signalled after the last update: the run ends here all the same
                raise stopping.Interrupted(signals.signum)
            results = trainer.test(model, datamodule=data, verbose=False)[0]
            _release_process_group()  # the last collective is done: what follows is rank 0's alone

            run.log_text(model_files.weight_table(model).to_csv(index=False), "weights.csv")
            from neuron_torch.nn.coefficients import format_table, table_from_module

            coefficients = table_from_module(model, data)  # None with hidden layers (no coefficients)
            if coefficients is not None:
                run.log_text(coefficients.to_csv(index=False), "coefficients.csv")
                run.log_text(format_table(coefficients), "coefficients.txt")  # with its status line
            model_files.log_model(run, model, data.raw_split("test")[0][:5], data.classes, config_yaml,
                                  settings.register_as)
            figures.log_figures(run, tracker, model, data)
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
                run.set_tag("checkpoint", trainer.checkpoint_callback.best_model_path)
    except stopping.Interrupted as stop:
        if getattr(run, "status", None) != "KILLED":
            raise
        print(_interrupted(stop, run.run_id, argv, trainer.max_steps), file=sys.stderr)
        return stop.code
    except (stopping.Failed, DataError) as err:  # diverged, or the data became unreadable: FAILED, one line
        return user_error(err)
    except (SystemExit, KeyboardInterrupt):
        if getattr(run, "status", None) == "KILLED":
            print(f"\ninterrupted: run {run.run_id} was marked KILLED, with everything logged so far",
                  file=sys.stderr)
            return 130
        raise
    except Exception as err:  # a folder or the store that became unwritable during the run
        problem = store.write_failure(err, uri)
        if problem is None:
            raise
        return user_error(problem)

    checkpoint_file = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    held_out = data.evaluated_on("test") == "test"
    print(summary.run_summary(run, uri, results, model.global_step, argv, checkpoint_file, model.converged_at,
                              held_out))
    if coefficients is not None and len(coefficients) <= 20:  # a longer table is read from coefficients.csv
        print(format_table(coefficients))
    return KEPT_EXIT if run.kept else 0  # its server did not take everything: see `neuron-torch sync`


def _storage_problem(data, model, trainer) -> Optional[str]:
    """Why ``data.dtype`` cannot apply to this run (before the run exists), or None."""
    if data.hparams.dtype == "model":
        return None
    import torch

    from neuron_torch.data.storage import storage_dtype
    from neuron_torch.nn.networks import SingleNeuron

    param_dtype = torch.float64 if str(trainer.precision).startswith("64") else torch.float32
    try:
        storage_dtype(data.hparams.dtype, param_dtype, trainer.strategy.root_device)
    except ConfigError as err:
        return str(err)
    if (not isinstance(model.net, SingleNeuron) or data.hparams.weight_column or model.hparams.class_weight
            or model.hparams.update_rule == "newton" or not model.hparams.fused or data.summary.streamed):
        return (f"data.dtype {data.hparams.dtype!r} is read by the single neuron's fused kernel (no row weights, "
                "no Newton Hessian, model.fused true, a loaded table); this run would convert X on every update: "
                "use data.dtype 'model'")
    return None


def _release_process_group() -> None:
    """Data parallel: end torch.distributed's process group once the last collective is done. Left to the
    interpreter's exit, its gloo threads can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def store_folder(trainer, run_id: str = "") -> Path:
    """The run's checkpoint folder: the checkpoint callback's, else ``checkpoints/<run id>/``."""
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        return Path(trainer.checkpoint_callback.dirpath)
    return Path(trainer.default_root_dir).absolute() / "checkpoints" / run_id  # checkpointing off: still one


def _interrupted(stop: "stopping.Interrupted", run_id: str, argv: list[str], max_steps: int) -> str:
    """What an interrupted run says: the run's status, its checkpoint and the command that resumes it."""
    lines = [f"\ninterrupted by {stop.name}"
             + (f" after update {stop.step}" if stop.step is not None else "")
             + f": run {run_id} was marked KILLED, with everything logged so far"]
    if stop.checkpoint:
        # the same command, minus the checkpoint it may have resumed from and its length
        command = summary.resume_command(argv, stop.checkpoint, max_steps)
        lines += [f"checkpoint: {stop.checkpoint}", f"resume with: {command}"]
    return "\n".join(lines)


def _sweep(cli: NeuronCLI, sweep: SweepSettings, args: list[str], uri: str, tags: dict[str, str]) -> int:
    """A parent run whose children are the grid's points, each trained as its own ``train`` call."""
    from neuron_torch.cli.sweep import SHORT_NAMES, SweepIncomplete, run_sweep
    from neuron_torch.tracking.run import TrackedRun
    from neuron_torch.tracking.spool import KEPT_EXIT

    flat = _flat_config(cli)
    unknown = [key for key in sweep.grid if key not in flat or key.startswith(("sweep.", "mlflow."))]
    if unknown:
        return user_error(f"sweep.grid: {unknown[0]!r} is not a model, data or trainer key of the config")
    if any(not isinstance(values, list) or not values for values in sweep.grid.values()):
        return user_error("sweep.grid: every key needs a non-empty list of values")
    settings: MLflowSettings = cli.config_init.mlflow
    keys = "-".join(SHORT_NAMES.get(k.split(".")[-1], k.split(".")[-1]) for k in sweep.grid)
    name = settings.run_name or f"sweep-{keys}-{time.strftime('%H%M%S')}"  # short: the UI cuts names at ~24
    run = None
    try:
        with TrackedRun(uri, settings.experiment, name, {**tags, "sweep": "parent"}) as run:
            run.log_params(flat)
            run.log_text(cli.parser.dump(cli.config, skip_unset=False), "config.yaml")
            children, best_id = run_sweep(run, sweep, args)
    except stopping.Interrupted as stop:  # every child has ended its run (KILLED); so has the parent
        where = f"sweep {run.run_id}" if run is not None else "the sweep"
        print(f"\ninterrupted by {stop.name}: {where} and its running children were marked KILLED; "
              f"each child's checkpoint is under checkpoints/<child run id>/", file=sys.stderr)
        return stop.code
    except SweepIncomplete as err:  # each child said why in its own output; the parent is FAILED
        return user_error(err)
    print(summary.sweep_summary(run, uri, sweep.metric, children, best_id))
    return KEPT_EXIT if run.kept else 0


def _flat_config(cli: NeuronCLI) -> dict[str, object]:
    """Every resolved config key, dotted (``model.learning_rate``), for MLflow params."""
    flat = vars(cli.config.clone().as_flat())
    flat.pop("__default_config__", None)
    flat.pop("data.class_weight", None)  # linked from model.class_weight, which is logged
    flat["config"] = [str(path) for path in flat.get("config") or []]  # the --config files given
    return {key: value for key, value in sorted(flat.items())}
