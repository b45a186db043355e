"""Data that passes the type check but breaks the math: refused in one line (file, column, row), at training
and at prediction alike, or handled (integer columns, `.tsv` files).

Training cases leave no run behind (the table is checked before a run exists); prediction cases write no
output file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import conftest
from conftest import all_runs, own_log_handler
from neuron_torch import load_model
from neuron_torch.cli.commands import predict, train
from neuron_torch.errors import DataError

SHORT = ["--trainer.max_steps", "30", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10",
         "--trainer.enable_checkpointing", "false"]


def frame_of(m: int = 40, seed: int = 0) -> pd.DataFrame:
    """Two informative features and string labels ``yes``/``no``."""
    rng = np.random.default_rng(seed)
    y = np.arange(m) % 2
    return pd.DataFrame({"f1": rng.normal(size=m) + 2 * y, "f2": rng.normal(size=m) - 2 * y,
                         "label": np.where(y == 1, "yes", "no")})


def with_cell(frame: pd.DataFrame, row: int, column: str, value) -> pd.DataFrame:
    """``frame`` with data row ``row`` (1-based, as messages count) of ``column`` set to ``value``."""
    frame = frame.astype(object)
    frame.loc[row - 1, column] = value
    return frame


def exit_code(args: list[str]) -> int:
    try:
        return train(args)
    except SystemExit as exc:
        return exc.code


def one_error_line(code: int, err: str, *fragments: str) -> str:
    """Exit code 2 and exactly one ``error:`` line, last on stderr, holding every fragment; no traceback."""
    assert code == 2, err
    return conftest.one_error_line(err, *fragments)


def nested(kind: str, m: int = 40) -> list:
    return [[float(i), 1.0] for i in range(m)] if kind == "list" else [{"a": float(i)} for i in range(m)]


# --- training ---------------------------------------------------------------------------------------------------

TRAINING = {
    # name: (file name, content, extra args, fragments of the error line)
    "value too large to standardise": ("data.csv", with_cell(frame_of(), 3, "f1", 1e200), [],
                                       ["data.csv", "'f1'", "row 3", "1e+200", "too large"]),
    "value too large, parquet": ("data.parquet", with_cell(frame_of(), 5, "f2", -3e160).astype({"f2": float}), [],
                                 ["data.parquet", "'f2'", "row 5", "too large"]),
    "repeated csv column name": ("data.csv", "f1,f1,label\n" + "".join(f"{i},{-i},{i % 2}\n" for i in range(20)), [],
                                 ["data.csv", "'f1'", "more than once"]),
    "parquet list column": ("data.parquet", frame_of().assign(f3=nested("list")), [],
                            ["data.parquet", "'f3'", "row 1", "a list"]),
    "parquet struct column": ("data.parquet", frame_of().assign(f3=nested("struct")), [],
                              ["data.parquet", "'f3'", "row 1", "a struct"]),
    "parquet list label": ("data.parquet", frame_of().assign(label=nested("list")), [],
                           ["data.parquet", "'label'", "row 1", "a list"]),
    "feature named twice": ("data.csv", frame_of(), ["--data.features", "[f1, f1]"],
                            ["data.csv", "'f1'", "more than once"]),
}


@pytest.mark.parametrize("case", list(TRAINING))
def test_training_refuses(case, tracking_uri, runs_of, write_table, capsys):
    name, content, extra, fragments = TRAINING[case]
    write_table(name, content)
    code = exit_code(SHORT + ["--data.path", name, "--data.target", "label"] + extra)
    line = one_error_line(code, capsys.readouterr().err, *fragments)
    assert line.startswith(f"error: {name}: ")
    assert runs_of(tracking_uri) == []


def test_repeated_parquet_column_names(tracking_uri, runs_of, tmp_path, capsys):
    columns = [pa.array(np.arange(20.0)), pa.array(-np.arange(20.0)), pa.array(np.arange(20) % 2)]
    pq.write_table(pa.Table.from_arrays(columns, names=["f1", "f1", "label"]), tmp_path / "dup.parquet")
    code = exit_code(SHORT + ["--data.path", "dup.parquet", "--data.target", "label"])
    one_error_line(code, capsys.readouterr().err, "dup.parquet", "'f1'", "more than once")
    assert runs_of(tracking_uri) == []


def test_a_folder_is_not_file_not_found(tracking_uri, runs_of, tmp_path, capsys):
    (tmp_path / "data.csv").mkdir()
    code = exit_code(SHORT + ["--data.path", "data.csv", "--data.target", "label"])
    line = one_error_line(code, capsys.readouterr().err, "data.csv", "folder")
    assert "not found" not in line
    assert runs_of(tracking_uri) == []


def test_log_names_label_1_and_how_to_choose_it(tmp_path):
    from neuron_torch.data.datamodule import NeuronDataModule

    frame_of().to_csv(tmp_path / "s.csv", index=False)
    with conftest.project_log() as stream:
        NeuronDataModule(path=str(tmp_path / "s.csv"), target="label").prepare()
    text = stream.getvalue()
    assert "label 1 = 'yes', 0 = 'no'" in text
    assert "--data.positive_label no" in text


# --- prediction ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory, empty_store):
    """A run trained on ``frame_of`` (labels yes/no) from a ``.tsv`` file, in its own store."""
    folder = tmp_path_factory.mktemp("data-faults-store")
    shutil.copyfile(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    frame_of(120).to_csv(folder / "train.tsv", sep="\t", index=False)
    with pytest.MonkeyPatch.context() as mp, own_log_handler():
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(sys, "argv", ["train.py"])
        assert train(SHORT + ["--data.path", "train.tsv", "--data.target", "label"]) == 0
    (run,) = all_runs(uri)
    assert run.info.status == "FINISHED" and run.data.tags["data"] == "train.tsv"
    return SimpleNamespace(uri=uri, model_uri=f"runs:/{run.info.run_id}/model")


@pytest.fixture
def scoring(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", model.uri)
    return model


def run_predict(model_uri: str, source: Path, output: Path, *extra: str) -> int:
    return predict(["--model", model_uri, "--input", str(source), "--output", str(output), *extra])


PREDICTION = {
    # name: (file name, content, fragments)
    "inf": ("new.csv", with_cell(frame_of(), 2, "f1", "inf"), ["new.csv", "'f1'", "row 2", "non-finite value inf"]),
    "missing value": ("new.csv", with_cell(frame_of(), 4, "f2", ""), ["new.csv", "'f2'", "row 4", "missing value"]),
    "text": ("new.csv", with_cell(frame_of(), 3, "f1", "abc"), ["new.csv", "'f1'", "row 3", "'abc' is not a number"]),
    "too large": ("new.csv", with_cell(frame_of(), 6, "f2", 1e300), ["new.csv", "'f2'", "row 6", "too large"]),
    "list column": ("new.parquet", frame_of().assign(f1=nested("list")), ["new.parquet", "'f1'", "row 1", "a list"]),
    "repeated name": ("new.csv", "f1,f2,f2\n1,2,3\n", ["new.csv", "'f2'", "more than once"]),
    "missing column": ("new.csv", frame_of().drop(columns="f2"), ["new.csv", "'f2'", "the model needs 2"]),
    "output column taken": ("new.csv", frame_of().assign(probability=0.5), ["new.csv", "'probability'"]),
}


@pytest.mark.parametrize("case", list(PREDICTION))
def test_prediction_refuses(case, scoring, write_table, tmp_path, capsys):
    name, content, fragments = PREDICTION[case]
    source = write_table(name, content)
    code = run_predict(scoring.model_uri, source, tmp_path / "out.csv")
    one_error_line(code, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "out.csv").exists()


def test_training_and_prediction_refuse_a_row_in_the_same_words(scoring, write_table, tmp_path, capsys):
    write_table("data.csv", with_cell(frame_of(), 3, "f1", 1e200))
    assert run_predict(scoring.model_uri, Path("data.csv"), tmp_path / "out.csv") == 2
    at_prediction = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_code(SHORT + ["--data.path", "data.csv", "--data.target", "label"]) == 2
    at_training = capsys.readouterr().err.strip().splitlines()[-1]
    assert at_prediction == at_training == ("error: data.csv: column 'f1', row 3: 1e+200 is too large "
                                            "(|value| > 1e+100 overflows the standardisation); rescale the column")
    assert len(all_runs(scoring.uri)) == 1  # the module's own run only


@pytest.mark.parametrize("where, fragments", [
    ("missing-folder/out.csv", ["missing-folder", "does not exist"]),
    ("existing-folder", ["existing-folder", "is a folder"]),
    ("input-folder", ["input-folder", "folder"]),
], ids=["output folder missing", "output is a folder", "input is a folder"])
def test_paths_that_cannot_work(where, fragments, scoring, tmp_path, capsys):
    source = tmp_path / "new.csv"
    frame_of().to_csv(source, index=False)
    (tmp_path / "existing-folder").mkdir()
    output = tmp_path / where
    if where == "input-folder":
        source, output = tmp_path / "input-folder", tmp_path / "out.csv"
        source.mkdir()
    code = run_predict(scoring.model_uri, source, output)
    one_error_line(code, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "out.csv").exists()


def test_threshold_outside_0_1(scoring, tmp_path, capsys):
    frame_of().to_csv(tmp_path / "new.csv", index=False)
    code = run_predict(scoring.model_uri, tmp_path / "new.csv", tmp_path / "out.csv", "--threshold", "1.5")
    one_error_line(code, capsys.readouterr().err, "--threshold", "1.5")


def test_prediction_is_the_label_and_tsv_is_read_as_training_reads_it(scoring, tmp_path):
    frame = frame_of(30, seed=1)
    frame.drop(columns="label").to_csv(tmp_path / "new.tsv", sep="\t", index=False)
    assert run_predict(scoring.model_uri, tmp_path / "new.tsv", tmp_path / "out.csv") == 0
    scored = pd.read_csv(tmp_path / "out.csv")
    assert list(scored.columns) == ["f1", "f2", "probability", "prediction"]
    assert set(scored["prediction"]) == {"yes", "no"}
    np.testing.assert_array_equal(scored["prediction"], np.where(scored["probability"] >= 0.5, "yes", "no"))
    assert (scored["prediction"] == frame["label"]).mean() > 0.8  # the model learned something

    assert run_predict(scoring.model_uri, tmp_path / "new.tsv", tmp_path / "out.parquet") == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.parquet"), scored, check_dtype=False)

    predictor = load_model(scoring.model_uri)
    np.testing.assert_array_equal(predictor.predict(frame), scored["prediction"].to_numpy())
    np.testing.assert_allclose(predictor.predict_proba(frame), scored["probability"], rtol=1e-12)
    assert predictor.classes == ["no", "yes"] and predictor.features == ["f1", "f2"]
    assert predictor.config["data"]["path"] == "train.tsv"


# --- the pyfunc model -------------------------------------------------------------------------------------------


def test_pyfunc_accepts_integer_columns(scoring, tmp_path):
    import mlflow

    integers = frame_of(30).drop(columns="label").round().astype("int64")
    pyfunc = mlflow.pyfunc.load_model(scoring.model_uri)
    probability = pyfunc.predict(integers)
    expected = load_model(scoring.model_uri).predict_proba(integers.astype(float))
    np.testing.assert_allclose(probability, expected, rtol=1e-12)
    integers.to_csv(tmp_path / "ints.csv", index=False)  # the command takes them too
    assert run_predict(scoring.model_uri, tmp_path / "ints.csv", tmp_path / "out.csv") == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "out.csv")["probability"], expected, rtol=1e-12)


def test_pyfunc_and_load_model_refuse_nan_rows(scoring):
    import mlflow

    frame = frame_of(10).drop(columns="label")
    frame.loc[1, "f1"] = np.nan
    with pytest.raises(DataError, match=r"column 'f1', row 2: missing value"):
        mlflow.pyfunc.load_model(scoring.model_uri).predict(frame)
    with pytest.raises(DataError, match=r"column 'f1', row 2: missing value"):
        load_model(scoring.model_uri).predict_proba(frame)
    frame.loc[1, "f1"] = np.inf
    with pytest.raises(DataError, match=r"column 'f1', row 2: non-finite value inf"):
        mlflow.pyfunc.load_model(scoring.model_uri).predict(frame)
