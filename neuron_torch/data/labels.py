"""Label columns and weights: which values are classes, their order, and each class's or row's weight."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from neuron_torch.errors import DataError
from neuron_torch.data.tables import listing, numeric_column, refuse_nested

# A label column with more distinct values than this, or with fewer than two rows per value on average, is not
# a class label (a measurement, an id): it is refused rather than trained as that many classes.
MAX_CLASSES = 1000


def _sample_weights(column, path: str, name: str) -> np.ndarray:
    """A weight column as float64 (m,): finite numbers (as features are checked), none negative, not all 0."""
    weight = numeric_column(column, path, name)
    negative = np.flatnonzero(weight < 0)
    if negative.size:
        raise DataError(f"{path}: column {name!r}, row {negative[0] + 1}: sample weight {weight[negative[0]]:g} "
                        "is negative")
    if not weight.any():
        raise DataError(f"{path}: column {name!r}: every sample weight is 0")
    return weight


def _labels(column, path: str, name: str, positive_label: Optional[str]) -> tuple[np.ndarray, tuple]:
    """Class indices (m,) and the label value of each index: 0/1 for two values, sorted order for k > 2."""
    import pandas as pd

    refuse_nested(column, path, name)
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(f"{path}: column {name!r}, row {int(np.argmax(missing)) + 1}: missing label")
    values, classes = label_classes(list(pd.unique(column)), len(column), path, name, positive_label)
    y = column.map({value: i for i, value in enumerate(values)}).to_numpy(dtype=np.float64)
    return y, classes


def label_classes(values: list, rows: int, path: str, name: str, positive_label: Optional[str]
                  ) -> tuple[list, tuple[str, ...]]:
    """The classes of a label column's distinct ``values``: the values in class order, and their names.

    Two values give labels 0 and 1 (``positive_label`` chooses 1; by default 1 of 0/1, True of booleans, the
    larger value otherwise); k > 2 values give classes 0 … k − 1 in sorted order.

    Raises
    ------
    DataError
        Fewer than two values; more than :data:`MAX_CLASSES` or more than half of ``rows`` (not a label);
        ``positive_label`` that is not a value, or given for k > 2 classes.
    """
    numeric = all(isinstance(v, (int, float, np.integer, np.floating, bool, np.bool_)) for v in values)
    values = sorted(values, key=float if numeric else str)
    if len(values) < 2:
        raise DataError(f"{path}: column {name!r} has {len(values)} distinct label value"
                        f"{'s' if len(values) != 1 else ''} ({listing(values)}); at least 2 are needed")
    if len(values) > 2:
        if len(values) > MAX_CLASSES or len(values) > rows / 2:
            raise DataError(f"{path}: column {name!r} has {len(values)} distinct values in {rows} rows: "
                            "that is not a class label (set --data.target to the label column)")
        if positive_label is not None:
            raise DataError(f"{path}: data.positive_label is for a two-class label; column {name!r} has "
                            f"{len(values)} classes ({listing(values)})")
        return values, tuple(str(v) for v in values)
    if positive_label is None:
        positive = values[1]  # 1 of 0/1, True of booleans, the larger value otherwise
    else:
        matches = [v for v in values if str(v) == str(positive_label)
                   or (numeric and _as_float(positive_label) == float(v))]
        if not matches:
            raise DataError(f"{path}: data.positive_label {positive_label!r} is not a value of column "
                            f"{name!r} ({listing(values)})")
        positive = matches[0]
    negative = values[0] if positive is values[1] or positive == values[1] else values[1]
    return [negative, positive], (str(negative), str(positive))


def class_weights(class_weight, classes: Sequence[str], totals: np.ndarray) -> Optional[np.ndarray]:
    """The weight of each class, with scikit-learn's meaning of ``class_weight``.

    Parameters
    ----------
    class_weight : None, "balanced" or dict of str to float
        ``balanced`` gives class c the weight ``Σw / (k·Σ_{y=c} w)`` (``m / (k·m_c)`` unweighted), as
        scikit-learn's ``compute_class_weight`` does with sample weights; a mapping gives the listed labels
        their weight and the others 1.
    classes : sequence of str, length k
        The label of each class index.
    totals : ndarray, shape (k,)
        Each class's training rows, or their total sample weight.

    Returns
    -------
    ndarray, shape (k,), or None when ``class_weight`` is None
    """
    check_class_weight(class_weight, classes)
    if class_weight is None:
        return None
    totals = np.asarray(totals, dtype=np.float64)
    if isinstance(class_weight, str):
        empty = np.flatnonzero(totals == 0)
        if empty.size:  # rows, but all of weight 0: balanced would weigh the class infinitely
            raise DataError(f"model.class_weight balanced: class {classes[empty[0]]!r} has training weight 0")
        return totals.sum() / (len(classes) * totals)
    weights = np.ones(len(classes))
    for label, value in class_weight.items():
        weights[list(classes).index(str(label))] = float(value)
    if not (weights * totals).sum():
        raise DataError("model.class_weight gives every training row weight 0")
    return weights


def check_class_weight(class_weight, classes: Sequence[str]) -> None:
    """Refuse a ``model.class_weight`` that is not ``balanced`` or a mapping of known labels to numbers >= 0."""
    if class_weight is None:
        return
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise DataError(f"model.class_weight must be 'balanced' or a mapping label: weight, got {class_weight!r}")
        return
    for label, value in class_weight.items():
        if str(label) not in classes:
            raise DataError(f"model.class_weight names label {label!r}, which is not a class ({listing(classes)})")
        if not (np.isfinite(float(value)) and float(value) >= 0):
            raise DataError(f"model.class_weight for label {label!r} must be a number >= 0, got {value!r}")


def _as_float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
