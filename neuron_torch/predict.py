"""``neuron-torch predict``: score a table with a model logged by a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from neuron_torch.console import log, setup_logging, user_error


def predict(args: Optional[list[str]] = None) -> int:
    """Score a table with a logged model: the input rows plus ``probability`` and ``prediction`` columns."""
    import argparse

    parser = argparse.ArgumentParser(prog="neuron-torch predict", allow_abbrev=False,
                                     description="Score a CSV or Parquet table with a model logged by a run.")
    parser.add_argument("--model", required=True, help="model URI: runs:/<run id>/model or models:/<name>/<version>")
    parser.add_argument("--input", required=True, help="CSV or Parquet file with the model's feature columns")
    parser.add_argument("--output", required=True, help="CSV file to write")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability at which prediction is 1")
    opts = parser.parse_args(args)
    setup_logging()

    import pandas as pd

    source = Path(opts.input)
    if not source.is_file():
        return user_error(f"{opts.input}: file not found")
    try:
        rows = pd.read_parquet(source) if source.suffix.lower() in (".parquet", ".pq") else pd.read_csv(source)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        return user_error(f"{opts.input}: cannot be read: {str(err).splitlines()[0]}")

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from neuron_torch.tracking import fluent_tracking_uri, resolve_tracking_uri

    try:
        with fluent_tracking_uri(resolve_tracking_uri(None)):
            model = mlflow.pyfunc.load_model(opts.model)
    except Exception as err:  # MLflow raises several types for a URI that names nothing
        return user_error(f"cannot load model {opts.model}: {str(err).splitlines()[0]}")
    needed = model.metadata.get_input_schema().input_names()
    missing = [name for name in needed if name not in rows.columns]
    if missing:
        return user_error(f"{opts.input}: no column {missing[0]!r}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                           f"the model needs {len(needed)}: {', '.join(needed)}")
    for name in needed:
        values = pd.to_numeric(rows[name], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(bad.argmax())
            return user_error(f"{opts.input}: column {name!r}, row {row + 1}: {rows[name].iloc[row]!s} "
                               "is not a number")
        rows[name] = values.astype("float64")
    probability = model.predict(rows[needed])
    rows["probability"] = probability
    rows["prediction"] = (rows["probability"] >= opts.threshold).astype(int)
    rows.to_csv(opts.output, index=False)
    log.info("%d rows scored, %d predicted 1 (threshold %g): %s", len(rows), int(rows["prediction"].sum()),
             opts.threshold, opts.output)
    return 0
