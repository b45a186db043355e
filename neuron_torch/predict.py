"""``neuron-torch predict``: score a table with a model logged by a run, running no code from the store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from neuron_torch.console import log, setup_logging, user_error

OUTPUT_COLUMNS = ("probability", "prediction")


def predict(args: Optional[list[str]] = None) -> int:
    """Score a table: the input rows plus ``probability`` (of label 1) and ``prediction`` (the label).

    The model is read by :func:`neuron_torch.load_model` (tensors, JSON and YAML only), and the rows are
    checked as training checks them (:func:`neuron_torch.tables.feature_matrix`). Returns the exit code.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="neuron-torch predict", allow_abbrev=False,
                                     description="Score a CSV or Parquet table with a model logged by a run.")
    parser.add_argument("--model", required=True,
                        help="model URI: runs:/<run id>/model, models:/<name>/<version> or a local model folder")
    parser.add_argument("--input", required=True, help="CSV, TSV or Parquet file with the model's feature columns")
    parser.add_argument("--output", required=True, help="file to write: .csv (default), .tsv or .parquet")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability from which the prediction is label 1 (default 0.5)")
    opts = parser.parse_args(args)
    setup_logging()

    from neuron_torch.loading import ModelLoadError, load_model
    from neuron_torch.tables import DataError, read_frame

    if not 0.0 <= opts.threshold <= 1.0:
        return user_error(f"--threshold must be between 0 and 1, got {opts.threshold:g}")
    problem = _output_problem(opts.output)
    if problem:
        return user_error(problem)
    try:
        rows = read_frame(opts.input)
        taken = [name for name in OUTPUT_COLUMNS if name in rows.columns]
        if taken:
            return user_error(f"{opts.input}: already has a column {taken[0]!r}, which the output adds; "
                              "rename or drop it")
        model = load_model(opts.model)
        probability = model.predict_proba(rows, source=opts.input)
    except (DataError, ModelLoadError) as err:
        return user_error(err)
    rows["probability"] = probability
    rows["prediction"] = _labels(probability >= opts.threshold, model.classes)
    try:
        _write(rows, opts.output)
    except OSError as err:
        return user_error(f"{opts.output}: cannot be written ({err.strerror or err})")
    positive = int((probability >= opts.threshold).sum())
    log.info("%d rows scored, %d predicted %r (label 1, probability >= %g), %d %r: %s", len(rows), positive,
             model.classes[1], opts.threshold, len(rows) - positive, model.classes[0], opts.output)
    return 0


def _labels(is_positive, classes: list[str]):
    """The original label of each row; numeric labels (``0``/``1``, ``2``/``4``) stay numbers in the file."""
    import numpy as np

    values: list = list(classes)
    try:
        numbers = [float(label) for label in classes]
        values = [int(v) if v.is_integer() else v for v in numbers]
    except ValueError:
        pass
    return np.where(is_positive, values[1], values[0])


def _write(rows, output: str) -> None:
    """Write the scored table in the format its suffix names, as input files are read (CSV by default)."""
    from neuron_torch.tables import PARQUET, SEPARATORS

    suffix = Path(output).suffix.lower()
    if suffix in PARQUET:
        rows.to_parquet(output, index=False)
    else:
        rows.to_csv(output, sep=SEPARATORS.get(suffix, ","), index=False)


def _output_problem(output: str) -> Optional[str]:
    """Why ``output`` cannot be written, checked before any work; None when it can."""
    path = Path(output)
    folder = path.parent
    if path.is_dir():
        return f"{output}: is a folder; give a file name for the scored table"
    if not folder.exists():
        return f"{output}: the folder {str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"{output}: {str(folder)!r} is not a folder"
    return None
