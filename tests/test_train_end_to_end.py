"""``train()`` end to end: runs into a throw-away sqlite store, read back through ``MlflowClient``.

Runs are in-process (``import lightning`` alone costs seconds). A wrapper around ``neuron_torch.cli.commands.build_cli``
keeps the CLI object (model, data, trainer) for checks against the numbers in the store, and can add callbacks
to the Trainer, e.g. to interrupt or fail a run at a chosen step.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

import neuron_torch.cli.config as cli_module
from conftest import own_log_handler
from neuron_torch.cli.commands import train
from neuron_torch.train.module import ConvergenceWarning

MAX_STEPS, EVERY, VAL_EVERY = 30, 10, 10  # the fast_args fixture's steps and validation, and a metric cadence


def breast_cancer_features() -> list[str]:
    from sklearn.datasets import load_breast_cancer

    return [str(name) for name in load_breast_cancer().feature_names]


# --- helpers ---------------------------------------------------------------------------------------------------


def the_run(uri: str, runs_of):
    runs = runs_of(uri)
    assert len(runs) == 1, [r.info.status for r in runs]
    return runs[0]


def no_run_left_running(uri: str, runs_of) -> None:
    assert [r.info.run_id for r in runs_of(uri) if r.info.status == "RUNNING"] == []


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def download(client: MlflowClient, run_id: str, name: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, name, str(dst)))


def weight_names(frame_or_keys) -> list[str]:
    return [k for k in frame_or_keys if k.startswith("w/")]


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def gd_pieces(X: np.ndarray, Y: np.ndarray, w: np.ndarray, b: float):
    """Loss, gradient and gradient norm of the mean binary cross-entropy of σ(Xw + b), in float64."""
    z = X @ w + b
    a = 1.0 / (1.0 + np.exp(-z))
    loss = float(np.mean(np.logaddexp(0.0, z) - Y * z))
    dw, db = X.T @ (a - Y) / len(Y), float(np.mean(a - Y))
    return loss, dw, db, math.sqrt(float(dw @ dw) + db * db)


class CLIKeeper:
    """Stands in for ``neuron_torch.cli.commands.build_cli``: builds the real CLI, adds callbacks, keeps the result."""

    def __init__(self, original, callbacks=()):
        self.original, self.callbacks, self.built = original, list(callbacks), []

    def __call__(self, args=None):
        cli = self.original(args)
        cli.trainer.callbacks.extend(self.callbacks)
        self.built.append(cli)
        return cli

    @property
    def cli(self):
        assert len(self.built) == 1
        return self.built[0]


@pytest.fixture
def run_train(monkeypatch, tracking_uri):
    """``run_train(args, callbacks=())`` → ``(exit code, cli)``, into this test's sqlite store."""

    def go(args, callbacks=()):
        keeper = CLIKeeper(ORIGINAL_BUILD_CLI, callbacks)
        monkeypatch.setattr(cli_module, "build_cli", keeper)
        code = train(list(args))
        return code, (keeper.built[-1] if keeper.built else None)

    return go


ORIGINAL_BUILD_CLI = cli_module.build_cli


class RaiseAt(L.Callback):
    """Raises ``error`` once ``trainer.global_step`` reaches ``step`` (after that many updates)."""

    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise self.error


# --- one short run, shared by the tests that only read it ----------------------------------------------------


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, empty_store, fast_args, runs_of):
    folder = tmp_path_factory.mktemp("fast-run")
    db = folder / "mlflow.db"
    shutil.copyfile(empty_store, db)
    uri = f"sqlite:///{db}"
    keeper = CLIKeeper(ORIGINAL_BUILD_CLI)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, own_log_handler():
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(cli_module, "build_cli", keeper)
        with contextlib.redirect_stdout(out):
            code = train(fast_args + ["--mlflow.log_every_n_steps", str(EVERY)])
    client = MlflowClient(uri)
    runs = runs_of(uri)
    assert len(runs) == 1
    run = runs[0]
    arts = folder / "artifacts"
    return SimpleNamespace(
        code=code, uri=uri, folder=folder, client=client, run=run, run_id=run.info.run_id, cli=keeper.cli, stdout=out.getvalue(),
        trajectory=pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", arts)),
        weights=pd.read_csv(download(client, run.info.run_id, "weights.csv", arts)),
        config_path=download(client, run.info.run_id, "config.yaml", arts),
    )


def test_fast_run_finishes_and_reports(fast_run):
    assert fast_run.code == 0
    assert fast_run.run.info.status == "FINISHED"
    assert fast_run.run.data.tags["data"] == "breast_cancer"
    assert fast_run.run.data.tags["network"] == "SingleNeuron"
    # the printed summary names the run, its status and the number of updates
    assert fast_run.run_id in fast_run.stdout
    assert "FINISHED" in fast_run.stdout
    assert f"{MAX_STEPS} updates" in fast_run.stdout
    assert "test/accuracy" in fast_run.stdout


def test_fast_run_checkpoint(fast_run):
    """The Trainer's checkpoint lands in checkpoints/<run id>/ under the working directory and the run's
    ``checkpoint`` tag names it by absolute path; it holds the state after the last update."""
    tag = fast_run.run.data.tags["checkpoint"]
    path = Path(tag)
    assert path.is_absolute()
    assert path.parent == (fast_run.folder / "checkpoints" / fast_run.run_id).resolve()
    assert path.is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)  # a project checkpoint is plain data
    assert state["global_step"] == MAX_STEPS
    np.testing.assert_allclose(state["state_dict"]["net.linear.weight"].double().numpy()[0],
                               fast_run.weights["weight"].to_numpy(), rtol=1e-6, atol=1e-7)


def test_fast_run_metric_keys(fast_run):
    keys = set(fast_run.run.data.metrics)
    expected = {"train/loss", "train/grad_norm", "b"}
    expected |= {f"w/{name}" for name in breast_cancer_features()}
    expected |= {f"{stage}/{m}" for stage in ("val", "test")
                 for m in ("loss", "accuracy", "precision", "recall", "f1", "auroc")}
    assert expected <= keys, sorted(expected - keys)
    assert len(weight_names(keys)) == 30
    assert "w/mean radius" in keys


def test_fast_run_metric_history_cadence(fast_run):
    """Per-update metrics at the steps where step % log_every_n_steps == 0, and at the last update's result
    (step N) whatever the cadence; val every val_check_interval."""
    client, run_id = fast_run.client, fast_run.run_id
    expected_steps = sorted({s for s in range(MAX_STEPS + 1) if s % EVERY == 0} | {MAX_STEPS})
    for key in ("train/loss", "train/grad_norm", "b", "w/mean radius", "w/worst symmetry"):
        assert [s for s, _ in history(client, run_id, key)] == expected_steps, key
    assert history(client, run_id, "train/loss")[-1][0] == MAX_STEPS
    val_steps = list(range(VAL_EVERY, MAX_STEPS + 1, VAL_EVERY))
    for key in ("val/loss", "val/accuracy", "val/auroc"):
        assert [s for s, _ in history(client, run_id, key)] == val_steps, key
    assert [s for s, _ in history(client, run_id, "test/accuracy")] == [MAX_STEPS]


def test_fast_run_metric_values(fast_run):
    client, run_id = fast_run.client, fast_run.run_id
    loss = [v for _, v in history(client, run_id, "train/loss")]
    # zero initialisation: the first update starts from w = 0, b = 0, where the loss is exactly ln 2
    assert loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert history(client, run_id, "b")[0][1] == 0.0  # zero initialisation, logged before any arithmetic
    assert history(client, run_id, "w/mean radius")[0][1] == 0.0
    assert loss[0] > loss[1] > loss[2]
    for key in ("val/accuracy", "val/precision", "val/recall", "val/f1", "val/auroc", "test/accuracy"):
        values = [v for _, v in history(client, run_id, key)]
        assert all(0.0 <= v <= 1.0 for v in values), (key, values)
    assert fast_run.run.data.metrics["test/accuracy"] >= 0.9
    assert fast_run.run.data.metrics["test/auroc"] >= 0.95


def test_fast_run_trajectory_has_every_update(fast_run):
    traj = fast_run.trajectory
    names = [f"w/{n}" for n in breast_cancer_features()]
    assert list(traj.columns) == ["step", "train/loss", "train/grad_norm", "b", *names]
    assert len(traj) == MAX_STEPS + 1  # the state each update started from, and the last one's result
    assert traj["step"].tolist() == list(range(MAX_STEPS + 1))
    assert np.isfinite(traj.drop(columns="step").to_numpy()).all()
    # the MLflow metrics are the trajectory's rows at the logged steps
    for key in ("train/loss", "b", "w/mean radius"):
        for step, value in history(fast_run.client, fast_run.run_id, key):
            assert value == pytest.approx(traj.loc[traj["step"] == step, key].item(), rel=1e-12, abs=1e-12)


def test_fast_run_trajectory_rows_are_the_state_each_update_starts_from(fast_run):
    """Row k holds loss(w_k, b_k), ‖∇‖ there and w_k, b_k; weights.csv is one more GD step from the last row."""
    X, Y = (t.numpy() for t in fast_run.cli.datamodule.split("train"))
    Y = Y[:, 0]
    traj = fast_run.trajectory
    names = weight_names(traj.columns)
    lr = fast_run.cli.model.hparams.learning_rate
    for k in (0, 1, 17, MAX_STEPS - 1):
        w, b = traj.loc[k, names].to_numpy(np.float64), float(traj.loc[k, "b"])
        loss, dw, db, norm = gd_pieces(X, Y, w, b)
        assert traj.loc[k, "train/loss"] == pytest.approx(loss, abs=1e-5)
        assert traj.loc[k, "train/grad_norm"] == pytest.approx(norm, rel=1e-4)
        if k + 1 < MAX_STEPS:
            next_w = traj.loc[k + 1, names].to_numpy(np.float64)
            np.testing.assert_allclose(next_w, w - lr * dw, atol=1e-5)
    # weights.csv: the parameters after the last update
    weights = fast_run.weights
    assert list(weights.columns) == ["feature", "weight", "bias"]
    assert len(weights) == 30
    assert weights["feature"].tolist() == breast_cancer_features()
    assert np.isfinite(weights[["weight", "bias"]].to_numpy()).all()
    w, b = traj.loc[MAX_STEPS - 1, names].to_numpy(np.float64), float(traj.loc[MAX_STEPS - 1, "b"])
    _, dw, db, _ = gd_pieces(X, Y, w, b)
    np.testing.assert_allclose(weights["weight"].to_numpy(), w - lr * dw, atol=1e-5)
    assert weights["bias"].nunique() == 1
    assert weights["bias"].iloc[0] == pytest.approx(b - lr * db, abs=1e-5)


def test_fast_run_weights_and_test_metrics_match_the_model(fast_run):
    model = fast_run.cli.model
    np.testing.assert_allclose(fast_run.weights["weight"].to_numpy(),
                               model.net.linear.weight.detach().double().numpy()[0], rtol=1e-6, atol=1e-7)
    assert fast_run.weights["bias"].iloc[0] == pytest.approx(float(model.net.linear.bias.detach()), rel=1e-6, abs=1e-7)
    # test/accuracy is the share of the test split these weights classify right
    X, Y = fast_run.cli.datamodule.split("test")
    w = fast_run.weights["weight"].to_numpy()
    b = fast_run.weights["bias"].iloc[0]
    predicted = (X.numpy() @ w + b) > 0
    accuracy = float(np.mean(predicted == (Y.numpy()[:, 0] == 1)))
    assert fast_run.run.data.metrics["test/accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_fast_run_params_hold_every_config_key(fast_run):
    params = fast_run.run.data.params
    for key, value in {"model.learning_rate": "0.5", "trainer.max_steps": str(MAX_STEPS),
                       "trainer.val_check_interval": str(VAL_EVERY), "data.dataset": "breast_cancer",
                       "mlflow.experiment": "neuron_torch", "mlflow.log_every_n_steps": str(EVERY),
                       "seed_everything": "0", "data.seed": "0", "model.update_rule": "gd",
                       "model.tol": "0.0", "data.batch_size": "None", "model.hidden_sizes": "[]"}.items():
        assert params.get(key) == value, key
    # every leaf of the logged config.yaml is a param with the same value
    config = yaml.safe_load(fast_run.config_path.read_text())
    flat = flatten(config)
    assert len(flat) > 60  # trainer, model, data, mlflow: the whole resolved config
    missing = sorted(set(flat) - set(params))
    assert missing == []
    for key, value in flat.items():
        if isinstance(value, list):
            assert list(ast.literal_eval(params[key])) == value, key
        else:
            assert params[key] == str(value), key


def test_fast_run_config_artifact(fast_run):
    config = yaml.safe_load(fast_run.config_path.read_text())
    assert {"seed_everything", "trainer", "model", "data", "mlflow"} <= set(config)
    assert config["trainer"]["max_steps"] == MAX_STEPS
    assert config["trainer"]["enable_progress_bar"] is False
    assert config["model"]["learning_rate"] == 0.5
    assert config["data"]["dataset"] == "breast_cancer"


def test_logged_config_reproduces_the_run(fast_run, run_train, tracking_uri, runs_of, tmp_path):
    """``--config <the run's config.yaml>`` trains the same updates again (same seed, same numbers)."""
    code, _ = run_train(["--config", str(fast_run.config_path)])
    assert code == 0
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri)
    again = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    pd.testing.assert_frame_equal(again, fast_run.trajectory)
    # exact: the same config trains with the same operations in this process; accuracy is a count over m
    assert run.data.metrics["test/accuracy"] == fast_run.run.data.metrics["test/accuracy"]


# --- runs of their own -------------------------------------------------------------------------------------------


def test_default_config_reaches_095_test_accuracy(run_train, tracking_uri, runs_of):
    code, cli = run_train(["--trainer.enable_progress_bar", "false"])
    assert code == 0
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == "1000"
    assert cli.trainer.global_step == 1000
    assert run.data.metrics["test/accuracy"] >= 0.95
    assert run.data.metrics["test/auroc"] >= 0.98
    client = MlflowClient(tracking_uri)
    assert len(history(client, run.info.run_id, "train/loss")) == 101  # every 10th update and the last result
    assert [s for s, _ in history(client, run.info.run_id, "val/accuracy")] == list(range(100, 1001, 100))


@pytest.mark.parametrize("steps, every", [(17, 5), (1, 10)])
def test_max_steps_is_the_number_of_updates(run_train, tracking_uri, runs_of, tmp_path, steps, every):
    code, cli = run_train(["--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
                           "--trainer.val_check_interval", "1000", "--mlflow.log_every_n_steps", str(every)])
    assert code == 0
    assert cli.trainer.global_step == steps
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    assert traj["step"].tolist() == list(range(steps + 1))  # each update's start, and the last one's result
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == sorted({*range(0, steps, every), steps})


def test_float64_run(run_train, tracking_uri, runs_of, tmp_path, fast_args):
    code, cli = run_train(fast_args + ["--trainer.precision", "64-true"])
    assert code == 0
    assert cli.model.net.linear.weight.dtype == torch.float64
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.precision"] == "64-true"
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    assert len(traj) == MAX_STEPS + 1
    # in float64 the recorded loss is the float64 loss to round-off
    X, Y = (t.numpy() for t in cli.datamodule.split("train"))
    names = weight_names(traj.columns)
    for k in (0, MAX_STEPS - 1, MAX_STEPS):
        loss, *_ = gd_pieces(X, Y[:, 0], traj.loc[k, names].to_numpy(), float(traj.loc[k, "b"]))
        assert traj.loc[k, "train/loss"] == pytest.approx(loss, rel=1e-12)
    assert run.data.metrics["test/accuracy"] >= 0.9


def test_mini_batch_run(run_train, tracking_uri, runs_of, tmp_path, fast_args, fast_run):
    code, cli = run_train(fast_args + ["--data.batch_size", "64"])
    assert code == 0
    assert cli.trainer.global_step == MAX_STEPS
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "64"
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    assert traj["step"].tolist() == list(range(MAX_STEPS + 1))
    # each update's loss and gradient come from a 64-row batch, not the 341 training rows
    X, Y = (t.numpy() for t in cli.datamodule.split("train"))
    names = weight_names(traj.columns)
    _, _, _, full_norm = gd_pieces(X, Y[:, 0], np.zeros(len(names)), 0.0)
    assert traj.loc[0, "train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # any batch at w = 0
    assert traj.loc[0, "train/grad_norm"] != pytest.approx(full_norm, rel=1e-4)
    assert fast_run.trajectory.loc[0, "train/grad_norm"] == pytest.approx(full_norm, rel=1e-4)
    assert run.data.metrics["test/accuracy"] >= 0.9


def test_synthetic_dataset(run_train, tracking_uri, runs_of, tmp_path, fast_args):
    code, _ = run_train(fast_args + ["--data.dataset", "synthetic", "--data.n_samples", "500",
                                     "--data.n_features", "5"])
    assert code == 0
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data"] == "synthetic"
    assert sorted(weight_names(run.data.metrics)) == [f"w/x{i}" for i in range(5)]
    client = MlflowClient(tracking_uri)
    weights = pd.read_csv(download(client, run.info.run_id, "weights.csv", tmp_path / "a"))
    assert weights["feature"].tolist() == [f"x{i}" for i in range(5)]
    assert np.isfinite(weights[["weight", "bias"]].to_numpy()).all()
    assert run.data.metrics["test/accuracy"] > 0.7


def test_tol_stops_early(run_train, tracking_uri, runs_of, tmp_path, capsys):
    tol = 0.1
    with ConvergenceWarningGuard():
        code, cli = run_train(["--model.tol", str(tol), "--trainer.max_steps", "500",
                               "--trainer.enable_progress_bar", "false"])
    assert code == 0
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    updates = cli.trainer.global_step
    assert 1 <= updates < 500
    assert cli.model.converged_at == updates
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    assert len(traj) == updates + 1  # the updates' start states and the converged state
    # it stopped at the first update whose starting gradient norm was under tol
    norms = traj["train/grad_norm"].to_numpy()[:-1]  # the last row is the state that update reached
    assert norms[-1] < tol
    assert (norms[:-1] >= tol).all()
    assert f"{updates} updates, converged" in capsys.readouterr().out


class ConvergenceWarningGuard(contextlib.AbstractContextManager):
    """Fails if a ConvergenceWarning is emitted inside the block."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always", ConvergenceWarning)
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self._seen if issubclass(w.category, ConvergenceWarning)]
        return False


def test_tiny_tol_warns_convergence(run_train, tracking_uri, runs_of):
    with pytest.warns(ConvergenceWarning, match="tol=1e-09 within 5 updates"):
        code, cli = run_train(["--model.tol", "1e-9", "--trainer.max_steps", "5",
                               "--trainer.enable_progress_bar", "false"])
    assert code == 0
    assert cli.trainer.global_step == 5
    assert cli.model.converged_at is None
    assert the_run(tracking_uri, runs_of).info.status == "FINISHED"


@pytest.mark.parametrize("k", [1, 5])
def test_no_autograd_graph_and_global_step_counts_updates(tracking_uri, k):
    """Training builds no autograd graph, and Lightning's global_step counts the hand-written updates,
    however many run in one training step (12 updates in steps of 5 are 5, 5 and 2)."""

    class Check(L.Callback):
        def __init__(self):
            self.updates = 0
            self.weights = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rows = pl_module.tracked_rows
            assert rows.requires_grad is False
            assert rows.grad_fn is None
            done = self.updates + min(k, 12 - self.updates)
            assert len(rows) == done - self.updates + (done == 12)  # the last step adds the final state's row
            self.updates = done
            assert trainer.global_step == self.updates
            self.weights.append(pl_module.net.linear.weight.detach().clone())

    cli = ORIGINAL_BUILD_CLI(["--trainer.max_steps", "12", "--trainer.enable_progress_bar", "false",
                              "--trainer.val_check_interval", "1000", "--model.updates_per_step", str(k)])
    check = Check()
    cli.trainer.callbacks.append(check)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert check.updates == 12
    assert cli.trainer.global_step == 12
    # every step changed the weights: each counted step is one real update
    assert all(not torch.equal(a, b) for a, b in zip(check.weights, check.weights[1:]))
    assert all(p.grad is None or p.grad.grad_fn is None for p in cli.model.parameters())


INTERRUPT_ARGS = ["--trainer.max_steps", "1000", "--trainer.enable_progress_bar", "false",
                  "--trainer.val_check_interval", "2", "--mlflow.log_every_n_steps", "1",
                  "--model.updates_per_step", "1"]  # one update per step, so RaiseAt stops at its exact step


def test_keyboard_interrupt_marks_the_run_killed(run_train, tracking_uri, runs_of, tmp_path, capsys):
    code, cli = run_train(INTERRUPT_ARGS, callbacks=[RaiseAt(5, KeyboardInterrupt())])
    assert code == 130
    assert cli.trainer.global_step == 5
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "KILLED"
    assert "error" not in run.data.tags
    err = capsys.readouterr().err
    assert f"run {run.info.run_id} was marked KILLED" in err
    assert "Traceback" not in err
    # the rows buffered before the interrupt are in the trajectory artifact (the interrupting callback runs
    # before the tracker's, so the 5th update's row is not among them)
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    assert traj["step"].tolist() == [0, 1, 2, 3]
    assert traj.loc[0, "train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "test/accuracy" not in run.data.metrics  # it never got to test
    no_run_left_running(tracking_uri, runs_of)


def test_exception_marks_the_run_failed(run_train, tracking_uri, runs_of, tmp_path):
    with pytest.raises(RuntimeError, match="boom at step 3"):
        run_train(INTERRUPT_ARGS, callbacks=[RaiseAt(3, RuntimeError("boom at step 3"))])
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: boom at step 3"
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    assert traj["step"].tolist() == [0, 1]
    no_run_left_running(tracking_uri, runs_of)


def interrupt_while_logging_the_config(monkeypatch):
    """Ctrl-C while the run's config is uploaded: inside the MLflow run, before trainer.fit."""
    from neuron_torch.tracking import run as tracking

    def interrupted(self, text, artifact_file):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking.TrackedRun, "log_text", interrupted)


def test_ctrl_c_before_fit_marks_the_run_killed(run_train, tracking_uri, runs_of, monkeypatch):
    interrupt_while_logging_the_config(monkeypatch)
    with contextlib.suppress(KeyboardInterrupt):  # whether it escapes is the next test's business
        run_train(["--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"])
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "KILLED"
    no_run_left_running(tracking_uri, runs_of)


def test_ctrl_c_before_fit_exits_130(run_train, tracking_uri, runs_of, monkeypatch, capsys):
    interrupt_while_logging_the_config(monkeypatch)
    try:
        code, _ = run_train(["--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"])
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped train()"
    assert code == 130
    assert "was marked KILLED" in capsys.readouterr().err


@pytest.fixture
def slow_writer(monkeypatch):
    """Make the writer thread lag behind training, as it does on a busy machine or a remote store: each block
    of trajectory rows takes 0.3 s to write, so the end of the run arrives while rows are still queued."""
    import time

    from neuron_torch.tracking.writer import MetricWriter

    original = MetricWriter._append_trajectory

    def slow(self, steps, rows):
        time.sleep(0.3)
        original(self, steps, rows)

    monkeypatch.setattr(MetricWriter, "_append_trajectory", slow)


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"), (RuntimeError("boom"), "FAILED")])
def test_metrics_logged_before_the_end_reach_the_store(run_train, tracking_uri, runs_of, slow_writer, error,
                                                       status):
    with contextlib.suppress(RuntimeError):
        run_train(INTERRUPT_ARGS, callbacks=[RaiseAt(5, error)])
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == status
    client = MlflowClient(tracking_uri)
    assert [s for s, _ in history(client, run.info.run_id, "val/accuracy")] == [2, 4]
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [0, 1, 2, 3]


def test_metrics_reach_the_store_when_the_writer_lags(run_train, tracking_uri, runs_of, slow_writer):
    """A FINISHED run whose writer lags still has its test metrics (they are queued after the last rows)."""
    code, _ = run_train(["--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false",
                         "--mlflow.log_every_n_steps", "1"])
    assert code == 0
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "FINISHED"
    assert "test/accuracy" in run.data.metrics
    assert [s for s, _ in history(MlflowClient(tracking_uri), run.info.run_id, "train/loss")] == list(range(6))


def test_run_names(run_train, tracking_uri, runs_of):
    """Runs are named after what they train (MLflow's random names repeat under a fixed seed); a given
    --mlflow.run_name wins."""
    args = ["--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]
    assert run_train(args)[0] == 0
    assert run_train(args + ["--mlflow.run_name", "my-run", "--model.learning_rate", "0.1"])[0] == 0
    names = {r.data.params["model.learning_rate"]: r.info.run_name for r in runs_of(tracking_uri)}
    assert names["0.1"] == "my-run"
    assert names["0.5"].startswith("gd-lr0.5-neuron-")  # what differs between runs comes first
    assert len(names["0.5"]) <= 25  # the UI's run table cuts names at about 24 characters


def test_no_path_leaves_a_running_run(fast_run, runs_of):
    no_run_left_running(fast_run.uri, runs_of)


def test_ctrl_c_in_a_real_process_marks_the_run_killed(tracking_uri, runs_of, tmp_path):
    """SIGINT to ``python train.py`` mid-training: exit code 130, one line saying so, the run KILLED."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    db = tmp_path / "mlflow.db"
    script = Path(cli_module.__file__).resolve().parents[2] / "train.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--trainer.max_steps", "10000000", "--trainer.enable_progress_bar", "false",
         "--trainer.val_check_interval", "50", "--mlflow.log_every_n_steps", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 90
        training = False
        while not training and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.25)
            try:  # metrics reach the store only from inside trainer.fit: then the interrupt lands in training
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
                    training = con.execute("select count(*) from metrics").fetchone()[0] > 0
            except sqlite3.Error:
                pass
        assert training, "training never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    run = the_run(tracking_uri, runs_of)
    assert run.info.status == "KILLED"
    assert f"run {run.info.run_id} was marked KILLED" in err
    assert "Traceback" not in err
    client = MlflowClient(tracking_uri)
    traj = pd.read_parquet(download(client, run.info.run_id, "trajectory.parquet", tmp_path / "a"))
    assert len(traj) >= 1
    assert traj["step"].tolist() == list(range(len(traj)))
    assert "test/accuracy" not in run.data.metrics
