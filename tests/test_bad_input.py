"""Bad input ends with exit code 2 and one line on stderr naming the file (column, row), no traceback, no run.

Everything runs in-process through ``neuron_torch.cli.commands.train``; argument-parser errors leave through
``SystemExit(2)``. The data is read and checked while the CLI is built, before any MLflow run exists.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import one_error_line, project_log
from neuron_torch.cli.commands import train
from neuron_torch.data.datamodule import read_table

SHORT = ["--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10"]


def exit_code(args: list[str]) -> int:
    try:
        return train(args)
    except SystemExit as exc:  # the argument parser's way out
        return exc.code


def assert_clean_failure(code, err: str, uri: str, runs_of, *fragments: str) -> str:
    """Exit code 2, exactly one ``error:`` line, last on stderr, holding every fragment; no traceback; no run."""
    assert code == 2, err
    line = one_error_line(err, *fragments)
    assert runs_of(uri) == []
    return line


def base_frame(m: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.arange(m) % 2
    return pd.DataFrame({"f1": rng.normal(size=m) + y, "f2": rng.normal(size=m) - y, "label": y})


def csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


def with_cell(frame: pd.DataFrame, row: int, column: str, value) -> pd.DataFrame:
    """``frame`` with data row ``row`` (1-based, as the messages count) of ``column`` set to ``value``."""
    frame = frame.astype(object)
    frame.loc[row - 1, column] = value
    return frame


# --- tables that cannot be trained on ----------------------------------------------------------------------------

CASES = {
    # name: (file name, content or None for no file, extra args, fragments the error line must hold)
    "missing file": ("absent.csv", None, ["--data.target", "label"], ["absent.csv", "file not found"]),
    "empty file": ("empty.csv", "", ["--data.target", "label"], ["empty.csv", "empty"]),
    "header only": ("header.csv", "f1,f2,label\n", ["--data.target", "label"], ["header.csv", "no rows"]),
    "missing target column": ("data.csv", csv_text(base_frame()), ["--data.target", "y"],
                              ["data.csv", "'y'", "f1, f2, label"]),
    "no target given": ("data.csv", csv_text(base_frame()), [], ["data.csv", "--data.target"]),
    "non-numeric value": ("data.csv", csv_text(with_cell(base_frame(), 3, "f1", "abc")), ["--data.target", "label"],
                          ["data.csv", "'f1'", "row 3", "'abc'", "not a number"]),
    "NaN in a feature": ("data.csv", csv_text(with_cell(base_frame(), 2, "f2", "")), ["--data.target", "label"],
                         ["data.csv", "'f2'", "row 2", "missing value"]),
    "NaN literal in a feature": ("data.csv", csv_text(with_cell(base_frame(), 7, "f1", "NaN")),
                                 ["--data.target", "label"], ["data.csv", "'f1'", "row 7", "missing value"]),
    "inf in a feature": ("data.csv", csv_text(with_cell(base_frame(), 4, "f2", "inf")), ["--data.target", "label"],
                         ["data.csv", "'f2'", "row 4", "inf"]),
    "missing label": ("data.csv", csv_text(with_cell(base_frame(), 5, "label", "")), ["--data.target", "label"],
                      ["data.csv", "'label'", "row 5", "missing label"]),
    "a label per row": ("data.csv", csv_text(base_frame().assign(label=np.arange(40))),
                        ["--data.target", "label"], ["data.csv", "'label'", "40 distinct values", "not a class label"]),
    "one label value": ("data.csv", csv_text(base_frame().assign(label=1)), ["--data.target", "label"],
                        ["data.csv", "'label'", "1 distinct label value ", "at least 2"]),
    "positive label not a value": ("data.csv", csv_text(base_frame()),
                                   ["--data.target", "label", "--data.positive_label", "maybe"],
                                   ["data.csv", "'maybe'", "'label'", "0, 1"]),
    "constant feature": ("data.csv", csv_text(base_frame().assign(f3=7.0)), ["--data.target", "label"],
                         ["data.csv", "'f3'", "constant"]),
    "three rows": ("tiny.csv", "f1,f2,label\n1,2,0\n2,1,1\n3,5,0\n", ["--data.target", "label"], ["tiny.csv"]),
    "two rows": ("tiny.csv", "f1,f2,label\n1,2,0\n2,1,1\n", ["--data.target", "label"],
                 ["tiny.csv", "2 rows are too few"]),
    "unknown feature": ("data.csv", csv_text(base_frame()), ["--data.target", "label", "--data.features", "[f1, f9]"],
                        ["data.csv", "'f9'"]),
    "unknown file type": ("data.xlsx", "f1,label\n1,0\n", ["--data.target", "label"], ["data.xlsx", "'.xlsx'"]),
    "undecodable csv": ("data.csv", b"f1,label\n\xff\xfe\x00,1\n", ["--data.target", "label"], ["data.csv"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_table(case, tracking_uri, runs_of, write_table, capsys):
    name, content, extra, fragments = CASES[case]
    if content is not None:
        write_table(name, content)
    code = exit_code(SHORT + ["--data.path", name] + extra)
    line = assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, *fragments)
    assert line.startswith(f"error: {name}: ")  # the file first, as the user named it


def test_three_rows_are_reported_as_too_few(tracking_uri, runs_of, write_table, capsys):
    write_table("tiny.csv", "f1,f2,label\n1,2,0\n2,1,1\n3,5,0\n")
    code = exit_code(SHORT + ["--data.path", "tiny.csv", "--data.target", "label"])
    assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, "tiny.csv", "3 rows")


def test_non_finite_value_is_shown_as_written(tracking_uri, runs_of, write_table, capsys):
    write_table("data.csv", csv_text(with_cell(base_frame(), 4, "f2", "inf")))
    code = exit_code(SHORT + ["--data.path", "data.csv", "--data.target", "label"])
    line = assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, "row 4")
    assert line == "error: data.csv: column 'f2', row 4: non-finite value inf"


def test_breast_cancer_log_names_the_labels_plainly():
    from neuron_torch.data.datamodule import NeuronDataModule

    with project_log() as stream:
        NeuronDataModule().prepare()
    assert "label 1 = 'benign', 0 = 'malignant'" in stream.getvalue()


def test_nan_in_a_parquet_feature(tracking_uri, runs_of, write_table, capsys):
    write_table("data.parquet", with_cell(base_frame(), 6, "f2", np.nan).astype({"f2": float}))
    code = exit_code(SHORT + ["--data.path", "data.parquet", "--data.target", "label"])
    assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of,
                         "data.parquet", "'f2'", "row 6", "missing value")


# --- bad options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["--model.hidden_sizes", "[4]", "--model.init", "zeros"], ["init='zeros'", "hidden layers"]),
    (["--trainer.precision", "16-mixed"], ["trainer.precision", "32-true", "64-true"]),
    (["--trainer.max_steps", "0"], ["trainer.max_steps", ">= 1"]),
    (["--data.val_fraction", "1.5"], ["data.val_fraction", "1.5"]),
    (["--data.batch_size", "0"], ["data.batch_size", ">= 1"]),
], ids=["zeros-init-hidden", "precision", "max-steps-0", "val-fraction", "batch-size-0"])
def test_bad_option_values(args, fragments, tracking_uri, runs_of, capsys):
    code = exit_code(SHORT + args)
    assert_clean_failure(code, capsys.readouterr().err, tracking_uri, runs_of, *fragments)


@pytest.mark.parametrize("args, fragment", [
    (["--model.nope", "1"], "--model.nope"),
    (["--trainer.max_steps", "abc"], "trainer.max_steps"),
    (["--model.update_rule", "sgd"], "model.update_rule"),
], ids=["unknown-key", "wrong-type", "bad-choice"])
def test_parser_errors_exit_2(args, fragment, tracking_uri, runs_of, capsys):
    with pytest.raises(SystemExit) as exc:
        train(SHORT + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in err[err.index("error:"):], err
    assert runs_of(tracking_uri) == []


# --- tables that do work -------------------------------------------------------------------------------------------


def test_parquet_file_trains(tracking_uri, runs_of, write_table, capsys):
    write_table("data.parquet", base_frame(80))
    code = exit_code(SHORT + ["--data.path", "data.parquet", "--data.target", "label"])
    assert code == 0, capsys.readouterr().err
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data"] == "data.parquet"
    assert run.data.params["data.path"] == "data.parquet"
    assert sorted(k for k in run.data.metrics if k.startswith("w/")) == ["w/f1", "w/f2"]
    client = MlflowClient(tracking_uri)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "weights.csv", "trajectory.parquet"} <= artifacts
    assert "plots/decision_boundary.png" in {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert run.data.metrics["test/accuracy"] >= 0.6


def string_label_frame() -> pd.DataFrame:
    frame = base_frame(80)
    return frame.assign(label=np.where(frame["label"] == 1, "yes", "no"))


def test_string_labels_map_to_0_1(tmp_path):
    path = tmp_path / "s.csv"
    frame = string_label_frame()
    frame.to_csv(path, index=False)
    table = read_table(str(path), "label")
    assert table.classes == ("no", "yes")
    # exact: labels are the values 0.0 and 1.0 themselves, no arithmetic (1 − y included)
    np.testing.assert_array_equal(table.y, (frame["label"] == "yes").to_numpy(float))
    flipped = read_table(str(path), "label", positive_label="no")
    assert flipped.classes == ("yes", "no")
    np.testing.assert_array_equal(flipped.y, 1.0 - table.y)
    assert table.feature_names == flipped.feature_names == ["f1", "f2"]


def test_string_labels_and_positive_label_flip_in_a_run(tracking_uri, runs_of, write_table, capsys, tmp_path):
    write_table("s.csv", string_label_frame())
    args = SHORT + ["--data.path", "s.csv", "--data.target", "label"]

    assert exit_code(args) == 0
    err = capsys.readouterr().err
    assert "label 1 = 'yes', 0 = 'no'" in err
    assert exit_code(args + ["--data.positive_label", "no"]) == 0
    err = capsys.readouterr().err
    assert "label 1 = 'no', 0 = 'yes'" in err

    runs = sorted(runs_of(tracking_uri), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert runs[1].data.params["data.positive_label"] == "no"
    client = MlflowClient(tracking_uri)
    w = [pd.read_csv(client.download_artifacts(r.info.run_id, "weights.csv", str(tmp_path / f"w{i}")))
         for i, r in enumerate(runs)]
    # from zero weights, gradient descent on the flipped labels is the mirror image: w → -w, b → -b
    np.testing.assert_allclose(w[1]["weight"], -w[0]["weight"], atol=1e-5)
    np.testing.assert_allclose(w[1]["bias"], -w[0]["bias"], atol=1e-5)
    assert np.abs(w[0]["weight"]).max() > 0.1
    # and the same predictions: the metrics of the two runs agree
    assert runs[0].data.metrics["test/accuracy"] == pytest.approx(runs[1].data.metrics["test/accuracy"])


def test_boolean_and_numeric_positive_labels(tmp_path):
    frame = base_frame(20)
    path = tmp_path / "b.csv"
    frame.assign(label=frame["label"] == 1).to_csv(path, index=False)
    table = read_table(str(path), "label")
    assert table.classes == ("False", "True")
    np.testing.assert_array_equal(table.y, frame["label"].to_numpy(float))
    path2 = tmp_path / "n.csv"
    frame.assign(label=np.where(frame["label"] == 1, 4, 2)).to_csv(path2, index=False)
    assert read_table(str(path2), "label").classes == ("2", "4")
    # "2.0" names the numeric value 2
    flipped = read_table(str(path2), "label", positive_label="2.0")
    np.testing.assert_array_equal(flipped.y, 1.0 - frame["label"].to_numpy(float))
