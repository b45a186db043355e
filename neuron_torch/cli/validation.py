"""Every key's range and every cross-key constraint, checked before a run exists: one line each.

:func:`check_config` reads the parsed config (before any class is built, so a mistake costs no data read and
no MLflow import); :func:`check_checkpoint` and :func:`check_parent_run` need the built model or the store
and run just before the run is created. Each raises :class:`ConfigError` with a message that names the key.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from neuron_torch.errors import ConfigError
from neuron_torch.tracking.uri import ENV

SUPPORTED_PRECISION = ("32-true", "64-true", "32", "64")
# the stores MLflow 3 runs on; a bare folder or file:// is its old file store, which MLflow 3 refuses
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


# --- per key ---------------------------------------------------------------------------------------------------

def _positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _non_negative(value) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


def _unit_interval(value) -> bool:  # [0, 1)
    return value is not None and 0 <= value < 1


def _at_least_one(value) -> bool:
    return value is not None and value >= 1


# key → (check, what the value must be, whether null is allowed: it means the default); each range once, here
RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "model.learning_rate": (_positive, "a number > 0", False),
    "model.l2": (_non_negative, "a number >= 0", False),
    "model.momentum": (_unit_interval, "in [0, 1)", False),
    "model.eps": (_positive, "a number > 0", False),
    "model.lr_step_size": (_at_least_one, "an integer >= 1", False),
    "model.lr_gamma": (_positive, "a number > 0", False),
    "model.tol": (_non_negative, "a number >= 0 (0 runs every step)", False),
    "model.updates_per_step": (_at_least_one, "an integer >= 1", False),
    "data.n_samples": (_at_least_one, "an integer >= 1", False),
    "data.n_features": (_at_least_one, "an integer >= 1", False),
    "data.noise": (_non_negative, "a number >= 0", False),
    "trainer.max_steps": (_at_least_one, "an integer >= 1: training is one stream of updates", False),
    "mlflow.max_weight_metrics": (_non_negative, "an integer >= 0", False),
    "sweep.workers": (_at_least_one, "an integer >= 1", False),
    "data.batch_size": (_at_least_one, "an integer >= 1, or null for full batch", True),
    "mlflow.log_every_n_steps": (_at_least_one, "an integer >= 1, or null for about 100 points per metric", True),
}


def check_config(config) -> None:
    """Check the parsed config (a jsonargparse ``Namespace`` with dotted keys).

    Raises
    ------
    ConfigError
        For the first key out of its range, naming the key, the value and what it must be.
    """
    for key, (ok, must, optional) in RULES.items():
        _check(config, key, ok, must, optional)
    betas = config.get("model.betas")
    if betas is not None and not all(_unit_interval(beta) for beta in betas):
        raise ConfigError(f"model.betas must both be in [0, 1), got {list(betas)}")
    for width in config.get("model.hidden_sizes") or []:
        if width < 1:
            raise ConfigError(f"model.hidden_sizes must hold widths >= 1, got {list(config.get('model.hidden_sizes'))}")
    _check_trainer(config)
    _check_mlflow(config)


def _check(config, key: str, ok: Callable[[Any], bool], must: str, optional: bool) -> None:
    value = config.get(key)
    if optional and value is None:
        return
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{key} must be {must}, got {value}")


def _check_trainer(config) -> None:
    precision = str(config.get("trainer.precision"))
    if precision not in SUPPORTED_PRECISION:
        raise ConfigError(f"trainer.precision must be 32-true (float32) or 64-true (float64), got {precision}")
    every = config.get("trainer.val_check_interval")
    if isinstance(every, bool) or (isinstance(every, int) and every < 1):
        raise ConfigError(f"trainer.val_check_interval must be a number of updates >= 1 (or a fraction in "
                          f"(0, 1]), got {every}")
    if isinstance(every, float) and not 0 < every <= 1:
        raise ConfigError(f"trainer.val_check_interval as a fraction must be in (0, 1], got {every}")


def _check_mlflow(config) -> None:
    from neuron_torch.tracking.uri import resolve_tracking_uri

    experiment = config.get("mlflow.experiment")
    if experiment is None or not str(experiment).strip():
        raise ConfigError("mlflow.experiment must be a non-empty name")
    for key in ("mlflow.run_name", "mlflow.register_as", "mlflow.parent_run_id"):
        value = config.get(key)
        if value is not None and not str(value).strip():
            raise ConfigError(f"{key} must be a non-empty string or null")
    check_tracking_uri(resolve_tracking_uri(config.get("mlflow.tracking_uri")))


def check_tracking_uri(uri: str) -> None:
    """Refuse a URI MLflow 3 cannot track to, before it is tried (a bare folder is MLflow's old file store)."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("sqlite:") else ""
    source = ENV if os.environ.get(ENV) == uri else "mlflow.tracking_uri"
    if scheme == "file" or not scheme:
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
            return
        folder = uri.split("://", 1)[-1] if scheme else uri
        raise ConfigError(f"{source} {uri!r} is a folder (MLflow's file store, which MLflow 3 refuses); use a "
                          f"database such as sqlite:///{Path(folder) / 'mlflow.db'} or a server http://HOST:PORT")
    if scheme not in STORE_SCHEMES:
        raise ConfigError(f"{source} {uri!r}: unknown scheme {scheme!r}; use sqlite:///PATH/mlflow.db, "
                          "http(s)://HOST:PORT or a database URI (postgresql://, mysql://)")


# --- config files ------------------------------------------------------------------------------------------

def check_config_files(args: list[str]) -> None:
    """Each ``--config FILE`` on the command line exists and is YAML: errors name the file, line and column."""
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--config"]
    files += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: config file not found" if not path.is_dir()
                              else f"{name}: is a folder, not a config file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{name}: not valid YAML: {problem}{where}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{name}: cannot be read: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{name}: a config file holds sections (model:, data:, trainer:, ...), "
                              f"not a {type(loaded).__name__}")


# --- what needs the model or the store -----------------------------------------------------------------------

def check_checkpoint(ckpt_path: Optional[str], module, max_steps: int) -> Optional[dict]:
    """A resumed run's checkpoint fits the model and leaves updates to run; returns the checkpoint read
    (tensors and plain values only: ``weights_only=True``), or None without ``ckpt_path``."""
    import torch

    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"{ckpt_path}: checkpoint not found" if not path.is_dir()
                          else f"{ckpt_path}: is a folder; give the .ckpt file inside it")
    from neuron_torch.tracking.loading import refusal

    try:
        with warnings.catch_warnings():  # torch warns about a pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reason torch cannot read it as plain tensors is the user's file
        raise ConfigError(f"{ckpt_path}: not a checkpoint of this project (read as plain tensors, "
                          f"weights_only=True: {refusal(err)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict)")
    done = int(checkpoint.get("global_step", 0))
    if done >= max_steps:
        raise ConfigError(f"{ckpt_path}: the checkpoint has done {done} updates already; set "
                          f"--trainer.max_steps above {done} to continue it")
    # the network's own parameters first: their names say more than the statistics' do
    expected = {name: tuple(t.shape) for name, t in sorted(module.state_dict().items(),
                                                          key=lambda item: not item[0].startswith("net."))}
    saved = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items() if hasattr(t, "shape")}
    for name, shape in expected.items():
        if name.startswith(("val_metrics", "test_metrics")):
            continue
        if name not in saved:
            raise ConfigError(f"{ckpt_path}: the checkpoint has no {name}: it was written by another network "
                              "(model.hidden_sizes) than this config's")
        if saved[name] != shape:
            raise ConfigError(f"{ckpt_path}: {name} is {list(saved[name])} in the checkpoint but "
                              f"{list(shape)} here: resume with the config (model.hidden_sizes, data) it was "
                              "written with")
    extra = [name for name in saved if name not in expected and not name.startswith(("val_", "test_"))]
    if extra:
        raise ConfigError(f"{ckpt_path}: the checkpoint holds {extra[0]}, which this network lacks: it was "
                          "written by another network (model.hidden_sizes) than this config's")
    return checkpoint


def check_parent_run(tracking_uri: str, parent_run_id: Optional[str]) -> None:
    """``mlflow.parent_run_id`` names a run of the store at ``tracking_uri``."""
    if parent_run_id is None:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri).get_run(parent_run_id)
    except MlflowException:
        raise ConfigError(f"mlflow.parent_run_id {parent_run_id!r} is not a run of this store") from None
