"""Shared fixtures for the command-line, tracking and bad-input tests.

Every run goes to a throw-away sqlite store under ``tmp_path`` (the test also runs *in* ``tmp_path``, so
``mlruns/`` artifacts and ``checkpoints/`` never land in the repository). Creating an MLflow sqlite store
runs its schema migrations, which costs several seconds; one empty store is made per session and copied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
from pathlib import Path
from typing import Callable

import pytest

# short runs: 30 updates, validation every 10, no progress bar in the captured output
FAST = ["--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10"]


@pytest.fixture(scope="session")
def fast_args() -> list[str]:
    """Arguments for a short run; extend with ``fast_args + [...]``, never in place (it is shared)."""
    return list(FAST)


@pytest.fixture
def skip_without_cuda():
    """Skip the requesting test cleanly when there is no CUDA device (test_cuda.py also marks its module)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables created, to copy (migrations take seconds each time)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("template-store")
    db = folder / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        MlflowClient(f"sqlite:///{db}").search_experiments()
    # the engine MLflow keeps for that URI is not used again; the file is complete once the tables exist
    return db


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, _empty_store) -> str:
    """``sqlite:///<tmp_path>/mlflow.db``, set as ``MLFLOW_TRACKING_URI``, with the test running in tmp_path."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_store, db)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@contextlib.contextmanager
def own_log_handler():
    """The ``neuron_torch`` logger as a fresh process has it (no handlers), put back afterwards.

    pytest attaches its capture handlers to non-propagating loggers when a test phase starts; each test
    starts from a clean logger so that ``train()`` sets up its own.
    """
    log = logging.getLogger("neuron_torch")
    saved = (list(log.handlers), log.level, log.propagate)
    for handler in saved[0]:
        log.removeHandler(handler)
    log.setLevel(logging.NOTSET)
    log.propagate = True
    try:
        yield
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
        for handler in saved[0]:
            log.addHandler(handler)
        log.setLevel(saved[1])
        log.propagate = saved[2]


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    with own_log_handler():
        yield


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when it is given ``args`` while ``sys.argv`` holds pytest's own arguments."""
    import sys

    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A streamed run leaves one core to its reading thread (torch.set_num_threads); give it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_sigint():
    """Lightning ignores SIGINT for the rest of the process after a KeyboardInterrupt; put it back."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture
def write_table(tmp_path) -> Callable[..., Path]:
    """``write_table(name, frame_or_text)``: a DataFrame/dict goes to ``.csv`` or ``.parquet`` by suffix;
    a str is written verbatim (for malformed CSV)."""
    import pandas as pd

    def write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, (str, bytes)):
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
            return path
        frame = content if isinstance(content, pd.DataFrame) else pd.DataFrame(content)
        if path.suffix in (".parquet", ".pq"):
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
        return path

    return write


def all_runs(uri: str) -> list:
    """Every run of every experiment in the store (active or deleted)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL, max_results=50_000) if ids else []


@pytest.fixture(scope="session")
def runs_of() -> Callable[[str], list]:
    """``runs_of(uri)``: every run in that store (see :func:`all_runs`)."""
    return all_runs


@pytest.fixture(scope="session")
def empty_store(_empty_store) -> Path:
    """The session's empty, migrated MLflow sqlite file, for module-scoped fixtures to copy."""
    return _empty_store


# --- comparing floating-point results -------------------------------------------------------------------------------
# Exact equality (torch.equal, check_exact=True, ==) is asked only where the same operations run on the same data in
# the same order, in one process with one thread count: the same kernel called twice, a resumed run against an
# uninterrupted one, updates_per_step 1 against 7. Anything else changes the order of some sum's terms, and with it
# the last bits: the fused kernel against the reference path, a column-major X against a row-major one (MKL blocks
# the two layouts differently), another BLAS, CPU or thread count (OMP_NUM_THREADS), or another process whose
# thread count may differ. Those comparisons take a tolerance from ``tol``.


def tol(dtype, factor: float = 4.0) -> float:
    """``factor × ε(dtype)``: how far two computations of one value may drift apart by rounding alone.

    ``factor`` is the condition of the computation, in units of ε relative to the values compared: a sum of k terms
    taken in another order moves by at most k·ε·Σ|terms| (factor k·Σ|terms| / |result|); one correctly rounded
    operation by ε/2 of its result. Say where a test's factor comes from beside the call. ``dtype`` is a torch
    dtype, a NumPy dtype or ``float`` (float64).
    """
    import numpy as np
    import torch

    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else np.finfo(dtype).eps
    return float(factor) * float(eps)


def compiler_skip_reason() -> str | None:
    """Why the fused kernel cannot be compiled here (no C compiler, ``CC`` as ``neuron_torch.kernels.fused`` reads it)."""
    compiler = shlex.split(os.environ.get("CC") or "cc")  # CC may carry a wrapper or flags ("ccache gcc")
    if not compiler or shutil.which(compiler[0]) is None:
        return f"no C compiler ({' '.join(compiler) or 'CC is empty'}): the fused kernel cannot be built here"
    return None


@pytest.fixture
def needs_fused():
    """Skip the requesting test, saying why, where the fused CPU kernel does not run: switched off by
    ``NEURON_TORCH_FUSED=0`` (the reference path is what such a session tests) or no C compiler."""
    from neuron_torch.kernels import fused

    if not fused.enabled():
        pytest.skip(f"{fused.ENV_SWITCH}={os.environ[fused.ENV_SWITCH]} switches the fused kernel off")
    reason = compiler_skip_reason()
    if reason:
        pytest.skip(reason)


def one_error_line(err: str, *fragments: str) -> str:
    """The one ``error:`` line of a refused command: no traceback, exactly one such line, the last on stderr,
    holding every fragment. Returns it."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0]  # the message is the last thing, on one line
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@contextlib.contextmanager
def project_log():
    """The ``neuron_torch`` logger's INFO lines written inside the block, in a ``StringIO``."""
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("neuron_torch")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        log.removeHandler(handler)
        log.setLevel(level)

