"""What a user sees: two runs in ``mlflow ui``'s compare-runs page, rendered by headless Chromium.

Chromium's command line is enough (no driver): ``--dump-dom`` prints the page after its scripts ran for
``--virtual-time-budget`` ms, ``--screenshot`` saves it. Without Chromium (``apt-get install chromium``) the
test is skipped with that reason. ``NEURON_TORCH_SCREENSHOT=1`` keeps the screenshot as
``docs/mlflow-compare.png`` in the repository; otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from neuron_torch.cli.commands import train
from processes import free_port, kill_group, start_mlflow

FAST = ["--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10"]
RUNS = {"lr=0.5": "0.5", "lr=0.05": "0.05"}  # the sweep's child run names -> model.learning_rate
START_TIMEOUT = 90.0  # seconds for `mlflow ui` to answer /health
BUDGETS_MS = (15_000, 45_000)  # virtual time for the React app; the longer one only if the first falls short
CHROMIUM_TIMEOUT = 120.0  # wall-clock seconds per Chromium call
REPO = Path(__file__).resolve().parents[1]



def chromium_binary() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium not installed (apt-get install chromium): browser check skipped")
    return binary


@pytest.fixture
def two_runs(chromium, tracking_uri):
    """A learning-rate sweep of two short runs in the test's sqlite store: (experiment id, child run ids)."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri  # train() sets mlflow's global URI; put it back afterwards
    try:
        grid = "{model.learning_rate: [" + ", ".join(RUNS.values()) + "]}"
        assert train(FAST + ["--sweep.grid", grid]) == 0
    finally:
        tracking_utils._tracking_uri = saved
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("neuron_torch")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sweep") != "parent"]
    assert sorted(r.info.run_name for r in runs) == sorted(RUNS)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.info.run_name: r.data.params["model.learning_rate"] for r in runs} == RUNS
    return experiment.experiment_id, [r.info.run_id for r in runs]


@pytest.fixture
def ui(two_runs, tracking_uri, tmp_path):
    """``mlflow ui`` on the test's store at 127.0.0.1:<free port>; stopped with its process group."""
    folder = tmp_path / "ui"
    folder.mkdir()
    port = free_port()
    proc = start_mlflow([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], port, folder, START_TIMEOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_group(proc)


def run_chromium(binary: str, profile: Path, budget_ms: int, *args: str) -> str:
    """One headless Chromium call in its own process group, bounded by CHROMIUM_TIMEOUT; returns stdout."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-proxy-server", f"--user-data-dir={profile}", "--window-size=1600,1200",
               f"--virtual-time-budget={budget_ms}", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace=2)
        pytest.fail(f"Chromium did not finish in {CHROMIUM_TIMEOUT:.0f} s: {' '.join(command)}")
    finally:
        if proc.poll() is None:
            kill_group(proc, grace=2)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_compare_runs_page_shows_both_runs_and_the_loss(chromium, two_runs, ui, tmp_path):
    experiment_id, run_ids = two_runs
    # the UI's own route (Routes.getCompareRunPageRoute): JSON lists in the hash router's query
    query = f"runs={json.dumps(run_ids, separators=(',', ':'))}&experiments={json.dumps([experiment_id])}"
    url = f"{ui}/#/compare-runs?{urllib.parse.quote(query, safe='=&')}"
    expected = [*RUNS, "train/loss", "Comparing 2 Runs"]

    for budget in BUDGETS_MS:
        dom = run_chromium(chromium, tmp_path / "profile", budget, "--dump-dom", url)
        missing = [text for text in expected if text not in dom]
        if not missing:
            break
    assert not missing, f"not in the rendered page after {budget} ms of virtual time: {missing}\n{dom[-2000:]}"
    assert "js-plotly-plot" in dom  # the parallel-coordinates chart of the two runs was drawn

    if os.environ.get("NEURON_TORCH_SCREENSHOT") == "1":
        shot = REPO / "docs" / "mlflow-compare.png"
        shot.parent.mkdir(exist_ok=True)
    else:
        shot = tmp_path / "mlflow-compare.png"
    shot.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path / "profile", budget, f"--screenshot={shot}", url)
    assert png_size(shot) == (1600, 1200)
    assert shot.stat().st_size > 20_000  # a blank or error page compresses to a few kB


def test_the_printed_address_opens_on_the_runs(chromium, two_runs, ui, tmp_path):
    """The experiment address the summary prints lands on the table of runs (MLflow's model-training view),
    not on the GenAI overview of traces."""
    from neuron_torch.cli.summary import run_address

    experiment_id, _ = two_runs
    url = run_address(ui, experiment_id)
    for budget in BUDGETS_MS:
        dom = run_chromium(chromium, tmp_path / "profile", budget, "--dump-dom", url)
        # the children are nested under the sweep's parent run, which the table shows first
        missing = [text for text in ["sweep-lr-", "Runs", "Model training"] if text not in dom]
        if not missing:
            break
    assert not missing, f"not in the rendered page after {budget} ms of virtual time: {missing}\n{dom[-2000:]}"
    assert "No data available" not in dom  # the GenAI overview's empty trace charts

    if os.environ.get("NEURON_TORCH_SCREENSHOT") == "1":
        shot = REPO / "docs" / "mlflow-runs.png"
    else:
        shot = tmp_path / "mlflow-runs.png"
    shot.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path / "profile", budget, f"--screenshot={shot}", url)
    assert png_size(shot) == (1600, 1200)
    assert shot.stat().st_size > 20_000
