"""What the model needs to know of its data, handed over once: the data's summary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataSummary:
    """The table as the model sees it, once it is read, split and checked.

    Attributes
    ----------
    feature_names : tuple of str, length n
        The feature columns, in order.
    classes : tuple of str, length k
        The label value of each class index.
    mean, std : ndarray, shape (n,)
        The standardisation statistics of the training rows (0 and 1 without standardisation); the model keeps
        them with its weights, so that it takes raw features.
    class_totals : ndarray, shape (k,)
        Each class's training rows, or their total sample weight with a weight column.
    class_weight : "balanced", dict or None
        The class weights the rows are weighed with (``NeuronDataModule(class_weight=...)``, which the command
        line links from ``model.class_weight``); the model checks that it asked for the same.
    streamed : bool
        Whether the table is streamed from its shards (too large for memory): its metrics then keep a fixed-size
        state, not every prediction.
    """

    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    class_totals: np.ndarray
    streamed: bool
    class_weight: object = None
