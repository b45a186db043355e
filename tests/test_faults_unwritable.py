"""A place a run cannot write (the store's folder, the checkpoints, the artifact root) ends in one line.

Each case is a real ``python train.py`` that must exit 2 with one ``error:`` line naming the folder, within
seconds (MLflow alone retries an unopenable sqlite file for about 100 s), with no traceback and no run left
in the store. The tests run as root, whom permission bits do not stop: each unwritable place is a path under
a regular file, which stops everyone. All cases start together, so the module costs about one run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import kill_group

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
ARGS = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "10", "--trainer.enable_progress_bar", "false"]
TIMEOUT = 240.0  # seconds for all cases together on a busy two-core machine
WITHIN = 60.0  # seconds one refused case may take: imports and the data, never MLflow's retries
# a failure only seen once the run is going: the up-front check is switched off in this process
LATER = ("import sys; import neuron_torch.tracking.store as store; store.check_locations = lambda *a, **k: None; "
         "from neuron_torch.cli.training import train; sys.exit(train(sys.argv[1:]))")


def _case_store_folder(folder: Path) -> list[str]:
    (folder / "afile").write_text("a file, not a folder\n")
    return ["--mlflow.tracking_uri", f"sqlite:///{folder / 'afile' / 'mlflow.db'}"]


def _case_store_not_a_database(folder: Path) -> list[str]:
    (folder / "notes.txt").write_text("not a database\n")
    return ["--mlflow.tracking_uri", f"sqlite:///{folder / 'notes.txt'}"]


def _case_checkpoints(folder: Path) -> list[str]:
    (folder / "afile").write_text("a file, not a folder\n")
    return ["--trainer.default_root_dir", str(folder / "afile" / "root")]


def _case_artifacts_of_a_new_experiment(folder: Path) -> list[str]:
    (folder / "mlruns").write_text("a file where MLflow puts new experiments' artifacts\n")
    return []


def _case_artifacts_of_an_experiment(folder: Path) -> list[str]:
    from mlflow import MlflowClient

    (folder / "afile").write_text("a file, not a folder\n")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").create_experiment(
        "kept", artifact_location=(folder / "afile" / "artifacts").as_uri())
    return ["--mlflow.experiment", "kept"]


CASES = {  # name: (set-up returning extra arguments, what the error line names)
    "store_folder": (_case_store_folder, "afile is not a folder"),
    "store_not_a_database": (_case_store_not_a_database, "not an SQLite database"),
    "checkpoints": (_case_checkpoints, "--trainer.default_root_dir"),
    "artifacts_new_experiment": (_case_artifacts_of_a_new_experiment, "mlruns is not a folder"),
    "artifacts_of_experiment": (_case_artifacts_of_an_experiment, "experiment 'kept'"),
    "checkpoints_later": (_case_checkpoints, "Not a directory"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, empty_store) -> dict[str, dict]:
    """Every case started at once, each in its own folder with its own store; their exits, stderr, times."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = {}
    for name, (setup, _) in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        shutil.copyfile(empty_store, folder / "mlflow.db")
        args = ["--mlflow.tracking_uri", f"sqlite:///{folder / 'mlflow.db'}", *ARGS, *setup(folder)]
        command = [sys.executable, "-c", LATER, *args] if name.endswith("_later") else [sys.executable, TRAIN, *args]
        err = open(folder / "stderr.log", "wb")
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        started[name] = (proc, err, folder, time.monotonic())
    deadline, results = time.monotonic() + TIMEOUT, {}
    try:
        for name, (proc, err, folder, t0) in started.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: still running after {TIMEOUT:.0f} s")
            results[name] = {"code": proc.returncode, "seconds": time.monotonic() - t0, "folder": folder,
                             "stderr": (folder / "stderr.log").read_text(errors="replace")}
    finally:
        for proc, err, _, _ in started.values():
            kill_group(proc, grace=5.0)
            err.close()
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_one_line_and_exit_2(outcomes, name):
    result = outcomes[name]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    assert result["code"] == 2, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert len(errors) == 1 and CASES[name][1] in errors[0], result["stderr"][-3000:]
    assert result["seconds"] < WITHIN


@pytest.mark.parametrize("name", [name for name in CASES if not name.endswith("_later")])
def test_refused_before_a_run_exists(outcomes, runs_of, name):
    folder = outcomes[name]["folder"]
    assert runs_of(f"sqlite:///{folder / 'mlflow.db'}") == []
    assert not (folder / "checkpoints").exists()


def test_store_left_as_it_was(outcomes):
    """Refusing a path under a file, or a file that is not a database, changes neither file."""
    assert (outcomes["store_folder"]["folder"] / "afile").read_text() == "a file, not a folder\n"
    assert (outcomes["store_not_a_database"]["folder"] / "notes.txt").read_text() == "not a database\n"


def test_new_experiment_not_created_where_it_cannot_keep_artifacts(outcomes):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{outcomes['artifacts_new_experiment']['folder'] / 'mlflow.db'}")
    assert client.get_experiment_by_name("neuron_torch") is None


def test_failure_during_the_run_ends_it_failed(outcomes, runs_of):
    """Checkpoints that cannot be written once training runs: one line, and the run is FAILED, not RUNNING."""
    runs = runs_of(f"sqlite:///{outcomes['checkpoints_later']['folder'] / 'mlflow.db'}")
    assert [run.info.status for run in runs] == ["FAILED"]
    assert "Not a directory" in runs[0].data.tags["error"]


def test_write_failures_found_in_the_exception_chain():
    import errno

    from neuron_torch.tracking.store import StoreError, is_busy, sqlite_path, write_failure

    uri = "sqlite:////data/runs/mlflow.db?timeout=30"
    assert sqlite_path(uri) == Path("/data/runs/mlflow.db") and sqlite_path("http://host") is None
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/ckpt/last.ckpt")
        except OSError as err:
            raise RuntimeError("saving the checkpoint failed") from err
    except RuntimeError as wrapped:
        assert write_failure(wrapped, uri).startswith("cannot write /data/ckpt/last.ckpt (No space left on device)")
    assert "/data/runs/mlflow.db (readonly database)" in write_failure(
        Exception("(sqlite3.OperationalError) attempt to write a readonly database"), uri)
    assert write_failure(StoreError("one line"), uri) == "one line"
    assert write_failure(ValueError("a bug, not a folder"), uri) is None
    assert is_busy(Exception("(sqlite3.OperationalError) database is locked")) and not is_busy(ValueError("x"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop to an unprivileged user")
def test_permission_denied_for_an_ordinary_user():
    """Permission bits stop an ordinary user: the check creates a file rather than trusting os.access."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="neuron_torch-readonly-"))  # /tmp, which that user can enter
    try:
        folder.chmod(0o755)  # root's folder: others may look, not write
        probe = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                 "from neuron_torch.tracking.store import check_locations; "
                 "print(check_locations(f'sqlite:///{sys.argv[2]}/mlflow.db', 'x', None)); "
                 "print(check_locations('http://127.0.0.1:1', 'x', Path(sys.argv[2]) / 'checkpoints'))")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                              "-c", probe, str(Path(__file__).resolve().parents[1]), str(folder)],
                             capture_output=True, text=True, timeout=60, cwd="/")
        if out.returncode != 0 and "Permission denied" in out.stderr:  # the project itself, not the check
            pytest.skip(f"the unprivileged user cannot read the project: {out.stderr.strip()[-200:]}")
        lines = out.stdout.splitlines()
        assert len(lines) == 2, out.stderr
        denied = f"({folder}: Permission denied)"
        assert lines[0].startswith(f"cannot write the MLflow store at {folder}/mlflow.db {denied}")
        assert lines[1].startswith(f"cannot write checkpoints to {folder}/checkpoints {denied}")
    finally:
        shutil.rmtree(folder)
