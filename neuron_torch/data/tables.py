"""Reading a table and checking its feature values: the one home for both training and prediction.

Training (:func:`neuron_torch.data.datamodule.read_table`), ``neuron-torch predict``, :func:`neuron_torch.load_model`
and the pyfunc model all read files with :func:`read_frame` and turn feature columns into numbers with
:func:`feature_matrix`, so a file or a value is accepted or refused the same way everywhere. Nothing here
imports Lightning or MLflow: prediction does not wait for them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from neuron_torch.errors import DataError, first_line

if TYPE_CHECKING:
    import pandas

# file suffix → CSV separator; every reader of a text table uses this map
SEPARATORS = {".csv": ",", ".txt": ",", ".tsv": "\t"}
PARQUET = (".parquet", ".pq")

# Largest accepted |value|. Standardisation squares deviations from the mean: beyond ~1e154 a square
# overflows float64, the column's std becomes inf and the whole column silently turns to 0. 1e100 keeps
# every square and any sum of them over a table of up to 1e100 rows finite.
MAX_ABS = 1e100


def read_frame(path: str) -> "pandas.DataFrame":
    """Read a ``.csv``/``.tsv``/``.txt`` or ``.parquet``/``.pq`` file with a header row, as it is.

    Column names are checked before pandas sees them, since pandas renames a repeated CSV name (``a``,
    ``a.1``) without a word.

    Parameters
    ----------
    path : str
        The file, as the user named it (messages quote it as given).

    Returns
    -------
    DataFrame, shape (m, k)
        Every column of the file, names as ``str``; at least one row.

    Raises
    ------
    DataError
        Missing path, a folder, an unknown suffix, unreadable content, repeated column names, no rows.
    """
    import pandas as pd

    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: is a folder, not a file; give a .csv or .parquet file")
    if not file.exists():
        raise DataError(f"{path}: file not found")
    if not file.is_file():
        raise DataError(f"{path}: is not a regular file")
    suffix = file.suffix.lower()
    if suffix not in SEPARATORS and suffix not in PARQUET:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv or .parquet")
    kind = "parquet" if suffix in PARQUET else suffix[1:]
    try:
        if suffix in PARQUET:
            import pyarrow.parquet as pq

            _refuse_repeated(pq.read_schema(file).names, path)
            frame = pd.read_parquet(file)
        else:
            _refuse_repeated(_csv_header(file, SEPARATORS[suffix]), path)
            frame = pd.read_csv(file, sep=SEPARATORS[suffix])
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, csv.Error, UnicodeDecodeError, OSError, ValueError, TypeError) as err:
        # pyarrow's ArrowInvalid is a ValueError; its first line names what is wrong
        raise DataError(f"{path}: cannot be read as {kind}: {first_line(err)}") from None
    names = [str(c) for c in frame.columns]
    _refuse_repeated(names, path)  # e.g. parquet columns 1 and "1"
    frame.columns = names
    if len(frame) == 0:
        raise DataError(f"{path}: the table has a header but no rows")
    return frame


def feature_matrix(frame: "pandas.DataFrame", columns: Sequence[str], source: str) -> np.ndarray:
    """The named columns as one float64 matrix, every value a finite number a model can take.

    Parameters
    ----------
    frame : DataFrame, shape (m, k)
        Must hold every name of ``columns`` (callers check that, with their own context).
    columns : sequence of str, length n
    source : str
        The file (or ``"input"``) the rows came from, for the message.

    Returns
    -------
    ndarray, shape (m, n), float64

    Raises
    ------
    DataError
        Naming the source, column and row (1-based, counting data rows) of the first bad cell: a list or
        other nested value, text that is not a number, a missing value, inf, or a value above ``MAX_ABS``.
    """
    X = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, name in enumerate(columns):
        X[:, j] = numeric_column(frame[name], source, name)
    return X


def numeric_column(column: "pandas.Series", source: str, name: str) -> np.ndarray:
    """One feature column as float64 values, shape (m,); see :func:`feature_matrix` for what is refused."""
    import pandas as pd

    refuse_nested(column, source, name)
    if column.dtype == bool:
        column = column.astype(np.float64)
    try:
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError, OverflowError):  # e.g. Python ints beyond float64, odd objects
        values = np.array([_as_float(v) for v in column], dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raw = column.iloc[row]
        if _is_missing(raw):
            what = "missing value"
        elif np.isnan(values[row]):
            what = f"{raw!r} is not a number"
        else:
            what = f"non-finite value {raw}"
        raise DataError(f"{source}: column {name!r}, row {row + 1}: {what}")
    huge = np.abs(values) > MAX_ABS
    if huge.any():
        row = int(np.argmax(huge))
        raise DataError(f"{source}: column {name!r}, row {row + 1}: {values[row]:g} is too large "
                        f"(|value| > {MAX_ABS:g} overflows the standardisation); rescale the column")
    return values


def refuse_nested(column: "pandas.Series", source: str, name: str) -> None:
    """Raise DataError if any cell holds a list, array, mapping or set (a Parquet list or struct column)."""
    if column.dtype != object:
        return
    nested = column.map(lambda v: isinstance(v, (list, tuple, dict, set, np.ndarray))).to_numpy(dtype=bool)
    if nested.any():
        row = int(np.argmax(nested))
        kind = "a struct" if isinstance(column.iloc[row], dict) else "a list"
        raise DataError(f"{source}: column {name!r}, row {row + 1}: holds {kind}, not a single value; "
                        "each cell must be one number (drop the column or flatten it)")


def listing(values, limit: int = 8) -> str:
    """``a, b, c, ...``: the first ``limit`` values, for messages."""
    shown = [str(v) for v in list(values)[:limit]]
    return ", ".join(shown) + (", ..." if len(values) > limit else "")


def _csv_header(file: Path, separator: str) -> list[str]:
    """The raw column names of a text table's first row, as written ([] for an empty file)."""
    with open(file, newline="", encoding="utf-8-sig") as handle:
        return next(csv.reader(handle, delimiter=separator), [])


def _refuse_repeated(names: Sequence[str], path: str) -> None:
    seen: set[str] = set()
    for position, name in enumerate(names):
        if name == "":  # pandas names blank headers "Unnamed: k", each its own
            continue
        if name in seen:
            raise DataError(f"{path}: column name {name!r} appears more than once (column {position + 1}); "
                            "column names must be unique")
        seen.add(name)


def _is_missing(value) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _as_float(value) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float64
        return float("inf")
    except (TypeError, ValueError):
        return float("nan")
