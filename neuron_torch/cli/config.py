"""The configuration: LightningCLI (jsonargparse) with the project's own ``mlflow`` and ``sweep`` sections."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

# jsonargparse warns about its own APIs that Lightning's CLI still calls: nothing a user can act on
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from neuron_torch.cli import validation  # noqa: E402
from neuron_torch.data.datamodule import NeuronDataModule  # noqa: E402
from neuron_torch.train.module import NeuronModule  # noqa: E402
from neuron_torch.train.progress import ValidationLines, progress_callback  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIGS / "default.yaml"


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
        Run name; default: what differs between runs, then the time of day, as ``gd-lr0.5-neuron-153514-a3``
        or ``adam-lr0.02-16x16-153514-7f`` (:func:`neuron_torch.cli.summary.run_name`); a sweep's parent
        ``sweep-<keys>-<time>``.
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


@dataclass
class SweepSettings:
    """A grid of config values, each point trained as a child run of one parent run.

    Parameters
    ----------
    grid : dict of str to list
        Dotted config key → values, e.g. ``{"model.learning_rate": [0.01, 0.1, 1.0]}``; every combination
        is trained. Empty: no sweep, a single run.
    metric : str
        The metric that picks the best child (tagged ``best``), e.g. ``val/loss`` or ``test/accuracy``.
    mode : {"min", "max"}
        Whether the best child has the smallest or the largest ``metric``.
    workers : int
        Children trained at once, in separate processes, into the same store.
    """

    grid: dict[str, list[Any]] = field(default_factory=dict)
    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    workers: int = 1


class _Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog} [--config FILE] [--print_config] [--SECTION.KEY VALUE ...]\n")

    def error(self, message: str, ex: Optional[Exception] = None):
        """A parse error in one line (jsonargparse spreads a wrong type over several); --help lists every key."""
        if not self.exit_on_error:
            return super().error(message, ex)
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        sys.stderr.write(f"error: {text} ({Path(self.prog).name} --help lists every key)\n")
        self.exit(2)


class NeuronCLI(LightningCLI):
    """LightningCLI with the ``mlflow`` section and the data's feature names linked into the model.

    Config files are checked as YAML before jsonargparse reads them (so an error names the file), and every
    key's range before any class is built (:mod:`neuron_torch.cli.validation`).
    """

    def parse_arguments(self, parser, args) -> None:
        validation.check_config_files(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        validation.check_config(self.config)

    def add_core_arguments_to_parser(self, parser) -> None:
        # --help lists the project's own sections first (model, data, mlflow, sweep), Lightning's Trainer last
        parser.add_lightning_class_args(self.model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self.datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_class_arguments(MLflowSettings, "mlflow")
        parser.add_class_arguments(SweepSettings, "sweep")
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Continue training from this Lightning checkpoint (weights, update-rule "
                                 "state, step and batch order); the new run is tagged resumed_from.")
        # the model's size comes from the table: reading it here checks the data before any run exists
        parser.link_arguments("data.feature_names", "model.feature_names", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")
        # class weights are the data's to fit (from its class totals) and to apply (in each row's weight)
        parser.link_arguments("model.class_weight", "data.class_weight")

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with what the project adds to its config: a progress display, a checkpoint at the end,
        and the validation interval in training steps (:meth:`_in_training_steps`)."""
        config = {**self.config_init.get("trainer"), **kwargs}
        callbacks = _as_list(config.get("callbacks"))  # one callback may be given alone, as a mapping
        given = tuple(callbacks)  # the config's own
        # a bar of updates in a terminal, one line per validation in a log or a pipe; a config's own bar wins
        if not any(isinstance(c, ProgressBar) for c in given):
            shown = progress_callback(config.get("enable_progress_bar") is not False)
            if isinstance(shown, ValidationLines):  # not a terminal: no bar at all, Lightning's default included
                kwargs["enable_progress_bar"] = False
            callbacks += [shown] if shown is not None else []
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            # training is one epoch whose end is max_steps: save there, whatever the validation interval
            callbacks.append(ModelCheckpoint(save_on_train_epoch_end=True))
        kwargs["callbacks"] = callbacks
        kwargs.update(self._in_training_steps(config))
        return super().instantiate_trainer(**kwargs)

    def _in_training_steps(self, config: dict) -> dict:
        """``val_check_interval`` turned from updates into training steps (for the Trainer), when it is a count.

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
        intervals += self._checkpoint_intervals()
        for interval in intervals:
            k = math.gcd(k, interval)
        self.model.updates_per_step = k
        return {"val_check_interval": every // k} if isinstance(every, int) else {}

    def _checkpoint_intervals(self) -> list[int]:
        """``every_n_train_steps`` of each ModelCheckpoint the config gives (read from the parsed config, as
        set), where it is set."""
        parsed, built = _as_list(self.config.get("trainer.callbacks")), _as_list(self.config_init.get("trainer.callbacks"))
        return [int(c.get("init_args.every_n_train_steps")) for c, instance in zip(parsed, built)
                if isinstance(instance, ModelCheckpoint) and c.get("init_args.every_n_train_steps")]


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
            "logger": False,  # tracking is MLflow's, through neuron_torch.tracking (run, callback)
            "check_val_every_n_epoch": None,  # training is one long epoch: validate every N steps
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "precision": "32-true",  # stated, so the logged config says float32
        },
    )


def _as_list(value) -> list:
    """A new list of a config's callbacks: one given alone, a list, or none."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _global_step_of(ckpt_path: Optional[str]) -> int:
    """Updates done by the run that wrote a checkpoint; 0 when there is none or it cannot be read (the path
    is checked, with a clear error, before training).

    Read with ``weights_only=True``: this runs while the command line is parsed, and a pickle given as a
    checkpoint must not run code (a project checkpoint holds tensors and plain values only).
    """
    import warnings

    import torch

    if ckpt_path is None:
        return 0
    try:
        with warnings.catch_warnings():  # a file torch refuses is reported once, by the checkpoint check
            warnings.simplefilter("ignore")
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        return int(checkpoint.get("global_step", 0)) if isinstance(checkpoint, dict) else 0
    except Exception:
        return 0
