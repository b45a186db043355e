"""Files written by an earlier neuron_torch still work: a logged model loads and scores as it did, and training
resumes from a checkpoint to the numbers of an uninterrupted run.

The files under ``fixtures/`` were written by the package as it was before its modules moved into subpackages
(``fixtures/make_fixtures.py`` says how, and makes them again from any checkout). Each case is a float64 run:
``binary`` the single neuron with momentum on a small CSV, ``kclass`` a tanh hidden layer with Adam on iris.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tol
from mlflow import MlflowClient

from neuron_torch import load_model
from neuron_torch.cli.commands import main, train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ["binary", "kclass"]

# A probability is a forward pass of a few dozen roundings (standardising, dot products of at most 4 terms, tanh,
# a softmax over 3 classes), each within ε/2 relatively; computed in another process it may round differently.
PROBABILITY = tol(np.float64, 64)
# The checkpoint's first updates ran in another process, whose thread count may sum a batch's rows in another
# order: each update's gradient moves by at most (rows in a batch ≤ 32)·ε, and the 30 updates add those up.
RESUMED = tol(np.float64, 30 * 32)


def spec(case: str) -> dict:
    """How the case's runs were made: ``args``, ``files`` they read, ``checkpoint_step``, ``straight_steps``,
    ``checkpoint_run_id``."""
    return json.loads((FIXTURES / case / "run.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_a_model_logged_before_loads_and_gives_the_same_probabilities(case):
    folder = FIXTURES / case
    model = load_model(str(folder / "model"))
    rows, scored = pd.read_csv(folder / "rows.csv"), pd.read_csv(folder / "scored.csv")

    P = model.predict_proba(rows)  # (m,) for two classes, (m, k) for k
    expected = scored[model.probability_columns()].to_numpy()  # (m, 1) or (m, k)
    np.testing.assert_allclose(P.reshape(len(rows), -1), expected, rtol=PROBABILITY, atol=0)
    assert list(model.predict(rows)) == list(scored["prediction"])


@pytest.mark.parametrize("case", CASES)
def test_predict_scores_with_a_model_logged_before(case, tmp_path):
    folder = FIXTURES / case
    output = tmp_path / "scored.csv"
    assert main(["predict", "--model", str(folder / "model"), "--input", str(folder / "rows.csv"),
                 "--output", str(output)]) == 0  # what the neuron-torch script runs
    # the same columns in the same order, the same labels, the probabilities to rounding
    pd.testing.assert_frame_equal(pd.read_csv(output), pd.read_csv(folder / "scored.csv"),
                                  check_exact=False, rtol=PROBABILITY, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_training_resumes_from_a_checkpoint_written_before(case, tracking_uri, runs_of, tmp_path):
    """The weights, the update rule's state (momentum's velocity, Adam's moments and step count), the schedule
    and the mini-batch order all carry over: the resumed run ends where a run without a break does."""
    run = spec(case)
    for name in run["files"]:  # the table the runs read, by the relative path in their arguments
        shutil.copy(FIXTURES / case / name, tmp_path / name)
    args = [*run["args"], "--trainer.max_steps", str(run["straight_steps"])]
    assert train(args + ["--mlflow.run_name", "straight"]) == 0
    assert train(args + ["--ckpt_path", str(FIXTURES / case / "checkpoint.ckpt"), "--mlflow.run_name", "resumed"]) == 0
    runs = {r.info.run_name: r for r in runs_of(tracking_uri)}
    assert runs["resumed"].data.tags["resumed_from"] == run["checkpoint_run_id"]

    client = MlflowClient(tracking_uri)
    straight, resumed = (pd.read_csv(client.download_artifacts(runs[name].info.run_id, "weights.csv",
                                                               str(tmp_path / name)))
                         for name in ("straight", "resumed"))
    pd.testing.assert_frame_equal(resumed, straight, check_exact=False, rtol=RESUMED, atol=RESUMED)
    # and where the earlier package's own uninterrupted run ended
    before = pd.read_csv(FIXTURES / case / "straight.csv")
    pd.testing.assert_frame_equal(resumed, before, check_exact=False, rtol=RESUMED, atol=RESUMED)
    steps = [m.step for m in client.get_metric_history(runs["resumed"].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(run["checkpoint_step"], run["straight_steps"] + 1))
