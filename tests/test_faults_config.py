"""Fault matrix, config class: every config mistake is refused in one line before a run exists.

Each case runs ``train`` in-process against a fresh store and asserts exit code 2, exactly one ``error:`` line
(the last on stderr) naming the key or file, no traceback and no run in the store.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from neuron_torch.cli.commands import train
from test_bad_input import assert_clean_failure, exit_code

STEPS = ["--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"]

CASES = {
    # name: (arguments, fragments the one error line must hold)
    "negative learning rate": (["--model.learning_rate", "-0.1"], ["model.learning_rate", "> 0", "-0.1"]),
    "zero learning rate": (["--model.learning_rate", "0"], ["model.learning_rate"]),
    "infinite learning rate": (["--model.learning_rate", "inf"], ["model.learning_rate"]),
    "val_check_interval 0": (["--trainer.val_check_interval", "0"], ["trainer.val_check_interval", ">= 1"]),
    "val_check_interval fraction above 1": (["--trainer.val_check_interval", "1.5"],
                                            ["trainer.val_check_interval", "(0, 1]"]),
    "lr_step_size 0": (["--model.lr_step_size", "0", "--model.lr_schedule", "step"], ["model.lr_step_size"]),
    "lr_gamma 0": (["--model.lr_gamma", "0"], ["model.lr_gamma"]),
    "momentum 1": (["--model.momentum", "1"], ["model.momentum", "[0, 1)"]),
    "beta above 1": (["--model.betas", "[0.9, 1.5]"], ["model.betas"]),
    "eps 0": (["--model.eps", "0"], ["model.eps"]),
    "negative l2": (["--model.l2", "-1"], ["model.l2"]),
    "negative tol": (["--model.tol", "-0.001"], ["model.tol", ">= 0"]),
    "updates_per_step 0": (["--model.updates_per_step", "0"], ["model.updates_per_step"]),
    "hidden width 0": (["--model.hidden_sizes", "[4, 0]"], ["model.hidden_sizes"]),
    "max_steps 0": (["--trainer.max_steps", "0"], ["trainer.max_steps", ">= 1"]),
    "precision 16-true": (["--trainer.precision", "16-true"], ["trainer.precision", "16-true"]),
    "batch_size 0": (["--data.batch_size", "0"], ["data.batch_size"]),
    "n_samples 0": (["--data.dataset", "synthetic", "--data.n_samples", "0"], ["data.n_samples"]),
    "negative max_weight_metrics": (["--mlflow.max_weight_metrics", "-1"], ["mlflow.max_weight_metrics"]),
    "log_every_n_steps 0": (["--mlflow.log_every_n_steps", "0"], ["mlflow.log_every_n_steps"]),
    "empty experiment": (["--mlflow.experiment", ""], ["mlflow.experiment", "non-empty"]),
    "blank experiment": (["--mlflow.experiment", "  "], ["mlflow.experiment"]),
    "empty run name": (["--mlflow.run_name", ""], ["mlflow.run_name"]),
    "sweep workers 0": (["--sweep.workers", "0"], ["sweep.workers"]),
    "unknown tracking scheme": (["--mlflow.tracking_uri", "ftp://host/store"], ["'ftp'", "unknown scheme"]),
    "file store folder": (["--mlflow.tracking_uri", "./folder"], ["./folder", "sqlite:///"]),
    "file:// store": (["--mlflow.tracking_uri", "file:///tmp/somewhere"], ["file:///tmp/somewhere", "sqlite"]),
    "parent run that does not exist": (["--mlflow.parent_run_id", "0123456789abcdef"],
                                       ["mlflow.parent_run_id", "0123456789abcdef", "not a run"]),
    "wrong type": (["--model.learning_rate", "fast"], ["model.learning_rate", "fast"]),
    "unknown key": (["--model.learning_rat", "0.1"], ["--model.learning_rat"]),
    "gpu without CUDA": (["--trainer.accelerator", "gpu"], ["no CUDA device", "--trainer.accelerator cpu"]),
    "devices 0": (["--trainer.devices", "0"], ["trainer:", "devices"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_mistake_is_one_line_before_any_run(name, tracking_uri, runs_of, capsys, monkeypatch):
    args, fragments = CASES[name]
    if name in ("unknown tracking scheme", "file store folder", "file:// store"):
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the configured URI is the one to refuse
    if name == "gpu without CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    code = exit_code(STEPS + args)  # later arguments win
    assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, *fragments)


@pytest.mark.parametrize("content, fragments", [
    ("model:\n  learning_rate: [0.1\n", ["bad.yaml", "not valid YAML", "line 3"]),
    ("model:\n\tlearning_rate: 0.1\n", ["bad.yaml", "not valid YAML", "line 2"]),
    ("- just\n- a list\n", ["bad.yaml", "sections"]),
    ("model:\n  learning_rate: -3\n", ["model.learning_rate", "-3"]),  # valid YAML, value out of range
])
def test_config_file_errors_name_the_file(content, fragments, tracking_uri, runs_of, capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text(content)
    code = exit_code(["--config", "bad.yaml"] + STEPS)
    assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, *fragments)


def test_missing_config_file(tracking_uri, runs_of, capsys):
    code = exit_code(["--config", "absent.yaml"] + STEPS)
    assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, "absent.yaml", "not found")


@pytest.fixture
def checkpoint(tracking_uri, fast_args) -> Path:
    """A checkpoint after 30 updates of the default single neuron."""
    assert train(fast_args) == 0
    return next(Path("checkpoints").glob("*/*.ckpt"))


@pytest.mark.parametrize("args, fragments", [
    (["--trainer.max_steps", "20"], ["done 30 updates", "--trainer.max_steps above 30"]),
    (["--trainer.max_steps", "30"], ["done 30 updates"]),
    (["--trainer.max_steps", "60", "--model.hidden_sizes", "[4]"], ["another network", "model.hidden_sizes"]),
    (["--trainer.max_steps", "60", "--data.dataset", "synthetic", "--data.n_features", "7"],
     ["net.linear.weight", "[1, 30]", "[1, 7]"]),
])
def test_resume_that_cannot_continue_is_refused(checkpoint, args, fragments, tracking_uri, runs_of, capsys):
    before = len(runs_of(tracking_uri))
    code = exit_code(["--ckpt_path", str(checkpoint), "--trainer.enable_progress_bar", "false"] + args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = err.rstrip().splitlines()[-1]
    assert line.startswith("error: ") and str(checkpoint) in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert len(runs_of(tracking_uri)) == before  # no new run


def test_a_folder_as_checkpoint(tracking_uri, runs_of, capsys, tmp_path):
    (tmp_path / "ckpts").mkdir()
    code = exit_code(["--ckpt_path", "ckpts"] + STEPS)
    assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, "ckpts", "folder")
