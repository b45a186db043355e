"""``neuron-torch predict``: score a table with a model logged by a run, running no code from the store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from neuron_torch.cli.console import log, setup_logging, user_error

PREDICTION = "prediction"  # the column of predicted labels, for every model


def predict(args: Optional[list[str]] = None) -> int:
    """Score a table: the input rows plus the predicted probabilities and ``prediction`` (the label).

    Two classes add ``probability`` (of label 1) and ``prediction`` (label 1 where the probability is at least
    ``--threshold``); k classes add ``probability_<label>`` per class (each row sums to 1) and ``prediction``,
    the most probable class. Predictions are the original label values; numeric labels stay numbers.

    The model is read by :func:`neuron_torch.load_model` (tensors, JSON and YAML only), and the rows are
    checked as training checks them (:func:`neuron_torch.data.tables.feature_matrix`). Returns the exit code.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="neuron-torch predict", allow_abbrev=False,
                                     description="Score a CSV or Parquet table with a model logged by a run.")
    parser.add_argument("--model", required=True,
                        help="model URI: runs:/<run id>/model, models:/<name>/<version> or a local model folder")
    parser.add_argument("--input", required=True, help="CSV, TSV or Parquet file with the model's feature columns")
    parser.add_argument("--output", required=True, help="file to write: .csv (default), .tsv or .parquet")
    parser.add_argument("--threshold", type=float, default=None,
                        help="two-class models: probability from which the prediction is label 1 (default 0.5); "
                             "a k-class model predicts its most probable class")
    opts = parser.parse_args(args)
    setup_logging()

    from neuron_torch.errors import ModelLoadError
    from neuron_torch.tracking.loading import load_model, probability_columns
    from neuron_torch.errors import DataError
    from neuron_torch.data.tables import read_frame

    threshold = 0.5 if opts.threshold is None else opts.threshold
    if not 0.0 <= threshold <= 1.0:
        return user_error(f"--threshold must be between 0 and 1, got {threshold:g}")
    problem = _output_problem(opts.output)
    if problem:
        return user_error(problem)
    try:
        rows = read_frame(opts.input)
        if PREDICTION in rows.columns:  # every model adds it: said before the model is fetched
            return _taken(opts.input, PREDICTION)
        model = load_model(opts.model)
        if model.multiclass and opts.threshold is not None:
            return user_error(f"--threshold is for two-class models; {opts.model} has {len(model.classes)} "
                              "classes and predicts the most probable one")
        added = probability_columns(model.classes)
        taken = [name for name in added if name in rows.columns]
        if taken:
            return _taken(opts.input, taken[0])
        probability = model.predict_proba(rows, source=opts.input)  # (m,) or (m, k)
    except (DataError, ModelLoadError) as err:
        return user_error(err)
    if model.multiclass:
        index = probability.argmax(axis=1)  # (m,) the most probable class of each row
        for j, name in enumerate(added):
            rows[name] = probability[:, j]
    else:
        index = (probability >= threshold).astype(np.int64)  # (m,) 1 where label 1 is predicted
        rows[added[0]] = probability
    rows[PREDICTION] = _labels(index, model.classes)
    try:
        _write(rows, opts.output)
    except OSError as err:
        return user_error(f"{opts.output}: cannot be written ({err.strerror or err})")
    counts = np.bincount(index, minlength=len(model.classes))  # (k,) rows predicted per class
    if model.multiclass:
        per_class = ", ".join(f"{int(count)} {label!r}" for label, count in zip(model.classes, counts))
        log.info("%d rows scored, predicted (the most probable of %d classes): %s: %s", len(rows),
                 len(model.classes), per_class, opts.output)
    else:
        log.info("%d rows scored, %d predicted %r (label 1, probability >= %g), %d %r: %s", len(rows),
                 int(counts[1]), model.classes[1], threshold, int(counts[0]), model.classes[0], opts.output)
    return 0


def _taken(source: str, column: str) -> int:
    return user_error(f"{source}: already has a column {column!r}, which the output adds; rename or drop it")


def _labels(index, classes: list[str]):
    """The original label of each row's class; numeric labels (``0``/``1``, ``2``/``4``) stay numbers.

    Parameters
    ----------
    index : ndarray, shape (m,), int
        The predicted class index of each row (0 or 1 for two classes).
    classes : list of str, length k
        The label of each class index, as the model records them.

    Returns
    -------
    ndarray, shape (m,)
        Integers or floats where every label is a number, else the label strings.
    """
    from neuron_torch.tracking.loading import label_values

    values = label_values(classes)
    if all(isinstance(v, int) for v in values):  # a whole-number column stays integer in CSV and Parquet
        return np.asarray(values, dtype=np.int64)[index]
    return np.asarray(values, dtype=object if isinstance(values[0], str) else np.float64)[index]


def _write(rows, output: str) -> None:
    """Write the scored table in the format its suffix names, as input files are read (CSV by default)."""
    from neuron_torch.data.tables import PARQUET, SEPARATORS

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
