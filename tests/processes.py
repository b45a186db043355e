"""Helpers for tests that start MLflow or Chromium as real processes on the loopback interface."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# loopback only: never through a proxy that the environment may name
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.read()


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the whole process group (uvicorn workers too), SIGKILL to what is left after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure no worker of its group outlives it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def start_mlflow(command: list[str], port: int, folder: Path, timeout: float) -> subprocess.Popen:
    """Start ``mlflow server``/``mlflow ui`` in its own process group, in ``folder``; wait for ``/health``.

    Its output goes to ``folder/server.log``, quoted when it fails to start.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner and its eight worker processes
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    log = folder / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if http_get(f"http://127.0.0.1:{port}/health", timeout=2.0).strip() == b"OK":
                return proc
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            kill_group(proc)
            raise RuntimeError(f"mlflow did not answer /health within {timeout:.0f} s:\n{log_tail(log)}")
        time.sleep(0.5)
