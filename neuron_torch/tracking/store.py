"""The MLflow store on disk: opened safely by many runs at once, and checked for writable folders up front.

Several ``train.py`` started together in one folder share one sqlite file. MLflow creates and migrates the
tables of a fresh file without a lock of its own (the second process finds half the tables and fails), and
two runs may create the same new experiment at once. :func:`open_experiment` does both under a file lock (one per
database, in the user's cache folder) and takes the experiment another process created first.

:func:`check_locations` runs before any run exists: an unwritable store folder, checkpoint folder or artifact
folder becomes one line naming the folder and the option that moves it, instead of MLflow's minutes of
retries. :func:`write_failure` turns the same kind of failure, when it only shows later, into one line too.
"""

from __future__ import annotations

import contextlib
import hashlib
import errno
import fcntl
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from neuron_torch.errors import first_line
from neuron_torch.tracking.reachability import causes

# MLflow 3's UI reads this tag to open an experiment on its runs rather than its GenAI overview (newer UIs
# follow their workflow switch instead; the addresses the summary prints set it)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
LOCK_TIMEOUT_S = 300.0  # a fresh store's migrations take seconds; only a stuck process holds the lock longer
SQLITE_HEADER = b"SQLite format 3\x00"
# errors of the disk or the folder, not of the program: the user moves the folder or frees space
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG}
SQLITE_WRITE_ERRORS = ("readonly database", "unable to open database file", "database or disk is full",
                       "disk i/o error")


class StoreError(Exception):
    """The store cannot be used as configured; the message is one line that says what to change."""


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database  # the path, without a query string such as ?timeout=30
    return Path(database).absolute() if database and database != ":memory:" else None


def lock_file(db: Path) -> Path:
    """The lock of database ``db``: one file per database path in the user's cache folder.

    Not beside the database: the working folder holds only what a run leaves there on purpose (mlflow.db,
    mlruns/, checkpoints/). Not the database file itself either: closing any descriptor of a sqlite file
    drops the POSIX locks sqlite holds on it in that process.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuron_torch" / "locks"
    return cache / (hashlib.sha1(str(db.resolve()).encode()).hexdigest()[:20] + ".lock")


@contextlib.contextmanager
def store_lock(uri: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the database's :func:`lock_file` (an exclusive ``flock``) for a sqlite store; no lock for others.

    The kernel drops the lock when its process ends, so a crashed run never leaves the store locked.

    Raises
    ------
    StoreError
        When the lock file cannot be created, or another process holds the lock for ``timeout`` seconds.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)  # MLflow makes the database's folder too
    except OSError as err:
        reason = _unwritable(db.parent) or err.strerror  # "afile is not a folder" says more than EEXIST
        raise StoreError(_folder_advice("the MLflow store", db.parent, reason)) from err
    lock = lock_file(db)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise StoreError(f"{lock.parent}: cannot hold the store's lock file ({err.strerror}); "
                         "set XDG_CACHE_HOME to a writable folder") from err
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # polled, so a stuck holder ends in a message instead of a hang
                if time.monotonic() > deadline:
                    raise StoreError(f"{lock} has been held by another process for {timeout:.0f} s: "
                                     f"is a run stuck while opening the MLflow store?") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def open_experiment(uri: str, name: str):
    """Open the store and get or create the experiment ``name``; safe when many processes do it at once.

    Returns
    -------
    client : mlflow.MlflowClient
    experiment_id : str
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with store_lock(uri):  # creating a fresh store's tables and a new experiment, one process at a time
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(name)
        if found is not None:
            return client, found.experiment_id
        try:
            return client, client.create_experiment(name, tags=EXPERIMENT_TAGS)
        except MlflowException as err:
            # another client of the store (a server, or a process outside this lock) created it first
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return client, found.experiment_id


def check_locations(uri: str, experiment: str, checkpoints: Optional[Path]) -> Optional[str]:
    """Why a run could not write its store, artifacts or checkpoints (one line); None when it can.

    Called before the run exists, so nothing is left behind. For a sqlite store it also opens (and, when
    fresh, creates) the store under :func:`store_lock` to find where the experiment keeps its artifacts.

    Parameters
    ----------
    uri : str
        The tracking URI.
    experiment : str
        The experiment's name; a new one keeps its artifacts under the store's default artifact root.
    checkpoints : Path, optional
        The folder checkpoints go to (None when checkpointing is off).
    """
    if checkpoints is not None:
        reason = _unwritable(checkpoints)
        if reason:
            return (f"cannot write checkpoints to {checkpoints} ({reason}): pass --trainer.default_root_dir "
                    f"<a writable folder> (checkpoints go to its checkpoints/), or "
                    f"--trainer.enable_checkpointing false")
    db = sqlite_path(uri)
    if db is None:
        return None  # a server or another kind of store: it says itself what it cannot do
    reason = _unwritable(db.parent) or _not_a_database(db)
    if reason:
        return _folder_advice("the MLflow store", db, reason)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.utils.uri import resolve_uri_if_local
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with store_lock(uri):
            client = MlflowClient(uri)  # creates and migrates a fresh store; later opens reuse it
        found = client.get_experiment_by_name(experiment)
    except StoreError as err:
        return str(err)
    except (MlflowException, SQLAlchemyError, OSError) as err:
        return f"cannot open the MLflow store {uri}: {first_line(err)}"
    # a new experiment's artifact root, worked out as MLflow's sqlite store does it in a fresh process: MLflow's
    # default artifact location (./mlruns) under the working folder, made absolute
    root = found.artifact_location if found else resolve_uri_if_local(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    folder = _local_folder(root)
    reason = folder is not None and _unwritable(folder)
    if not reason:
        return None
    if found:
        return (f"cannot write MLflow artifacts to {folder} ({reason}): experiment {experiment!r} keeps its "
                f"artifacts there; make it writable, or use another experiment (--mlflow.experiment NAME)")
    return (f"cannot write MLflow artifacts to {folder} ({reason}): a new experiment keeps its artifacts in "
            f"mlruns/ of the working folder; run from a writable folder, or create the experiment elsewhere "
            f"first: mlflow experiments create -n {shlex.quote(experiment)} -l <a writable folder>")


def checkpoint_folder(trainer) -> Optional[Path]:
    """Where the run's checkpoints go: the ModelCheckpoint's ``dirpath`` when set, else
    ``<trainer.default_root_dir>/checkpoints`` (each run in its own ``<run id>/`` there); None without one."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return Path(callback.dirpath) if callback.dirpath else Path(trainer.default_root_dir).absolute() / "checkpoints"


def write_failure(err: BaseException, uri: str) -> Optional[str]:
    """One line for an error that says a folder or the store could not be written (None for other errors).

    Such failures can show after :func:`check_locations` (a disk fills up, a folder is moved away).
    """
    for e in causes(err):
        if isinstance(e, StoreError):  # the lock of the store, taken when the run starts
            return str(e)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            where = f" {e.filename}" if e.filename else ""
            return (f"cannot write{where} ({e.strerror or e}): free space there or make it writable, or "
                    f"write elsewhere (--trainer.default_root_dir, --mlflow.tracking_uri)")
        text = str(e).lower()
        if any(marker in text for marker in SQLITE_WRITE_ERRORS):
            return _folder_advice("the MLflow store", sqlite_path(uri) or Path(uri), _sqlite_reason(text))
    return None


def is_busy(err: BaseException) -> bool:
    """Whether a failed MLflow call only met another writer's lock on a sqlite store (worth trying again).

    MLflow's sessions wait a while for the lock (``PRAGMA busy_timeout``); many runs writing at once to a store
    on a slow disk may still wait longer than that.
    """
    return any("database is locked" in str(e).lower() for e in causes(err))


def _folder_advice(what: str, path: Path, reason: str) -> str:
    return (f"cannot write {what} at {path} ({reason}): choose a writable place with "
            f"--mlflow.tracking_uri sqlite:///<folder>/mlflow.db (or MLFLOW_TRACKING_URI)")


def _unwritable(folder: Path) -> Optional[str]:
    """Why files cannot be created in ``folder``, or in the folders that would be made for it; None if they can.

    An actual file is created and removed: permission bits say nothing for root, nor for read-only mounts.
    """
    path = Path(folder).absolute()
    try:
        while not path.exists() and path != path.parent:  # the nearest existing folder is where mkdir starts
            path = path.parent
        if not path.is_dir():
            return f"{path} is not a folder"
    except OSError as err:  # a folder on the way cannot be looked into
        return f"{path}: {err.strerror}"
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".neuron_torch-probe-")
    except OSError as err:
        return f"{path}: {err.strerror}"
    os.close(fd)
    os.unlink(probe)
    return None


def _not_a_database(db: Path) -> Optional[str]:
    """Why an existing ``db`` cannot be the store (not a file, not sqlite, not writable); None if it can."""
    if not db.exists():
        return None
    if not db.is_file():
        return "it is not a file"
    try:
        with open(db, "rb+") as handle:  # opened for writing, as sqlite will; nothing is written
            header = handle.read(len(SQLITE_HEADER))
    except OSError as err:
        return err.strerror
    if header and header != SQLITE_HEADER:
        return "it is not an SQLite database"
    return None


def _local_folder(uri: Optional[str]) -> Optional[Path]:
    """The local folder of a ``file:`` URI or a plain path; None for remote artifact stores."""
    if not uri:
        return None
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    if not is_local_uri(uri, is_tracking_or_registry_uri=False):
        return None
    return Path(local_file_uri_to_path(uri))


def _sqlite_reason(text: str) -> str:
    return next(marker for marker in SQLITE_WRITE_ERRORS if marker in text)
