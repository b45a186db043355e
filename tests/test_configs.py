"""Every shipped config parses, resolves on top of configs/default.yaml, and trains; ``train.py --help`` works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neuron_torch.cli.commands import build_cli, train
from neuron_torch.cli.config import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false"]


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict) and f"{prefix}{key}" != "sweep.grid":  # a grid's keys are its values
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolved(config, key: str):
    value = config[key]
    return list(value) if isinstance(value, tuple) else value


def test_configs_exist():
    assert DEFAULT_CONFIG in CONFIG_FILES
    assert DEFAULT_CONFIG.is_file()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_print_config(path, capsys):
    with pytest.raises(SystemExit) as exc:
        train(["--config", str(path), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"seed_everything", "trainer", "model", "data", "mlflow"} <= set(printed)
    flat = leaves(printed)
    # the file's own values win, and default.yaml fills in what the file leaves out
    own = leaves(yaml.safe_load(path.read_text()))
    for key, value in own.items():
        assert flat[key] == value, key
    for key, value in leaves(yaml.safe_load(DEFAULT_CONFIG.read_text())).items():
        if key not in own:
            assert flat[key] == value, key


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_instantiates(path, tracking_uri):
    cli = build_cli(["--config", str(path), "--trainer.max_steps", "1"] + QUIET)
    for key, value in leaves(yaml.safe_load(path.read_text())).items():
        if key != "trainer.max_steps":
            assert resolved(cli.config, key) == value, key
    hp = cli.model.hparams
    assert list(hp.hidden_sizes) == list(cli.config["model.hidden_sizes"])
    assert type(cli.model.net).__name__ == ("DeepNetwork" if hp.hidden_sizes else "SingleNeuron")
    assert cli.trainer.max_steps == 1
    # the model's inputs are the data's features
    assert cli.model.feature_names == cli.datamodule.feature_names
    X, _ = cli.datamodule.split("train")
    assert X.shape[1] == len(cli.model.feature_names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_trains(path, tracking_uri, runs_of):
    code = train(["--config", str(path), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"] + QUIET)
    assert code == 0
    runs = runs_of(tracking_uri)
    assert all(r.info.status == "FINISHED" for r in runs)
    grid = (yaml.safe_load(path.read_text()).get("sweep") or {}).get("grid") or {}
    points = 1
    for values in grid.values():
        points *= len(values)
    assert len(runs) == points + (1 if grid else 0)  # a sweep adds its parent run
    run = next(r for r in runs if r.data.tags.get("sweep") != "parent")
    experiment = leaves(yaml.safe_load(path.read_text())).get("mlflow.experiment", "neuron_torch")
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri).get_experiment(run.info.experiment_id).name == experiment
    assert {"test/accuracy", "val/accuracy", "train/loss"} <= set(run.data.metrics)


def test_train_py_help(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--config", "--print_config", "--model.learning_rate", "--model.update_rule", "--data.path",
                   "--data.target", "--data.positive_label", "--trainer.max_steps", "--mlflow.experiment",
                   "--mlflow.log_every_n_steps"):
        assert option in done.stdout, option
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # --help writes nothing: no store, no mlruns, no checkpoints
