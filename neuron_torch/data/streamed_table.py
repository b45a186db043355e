"""A sharded Parquet table larger than the memory budget: checked and summarised in one pass, then streamed.

The one pass reads every row once (as a loaded table is read once): it checks the values as loading would,
counts each split's rows, finds the label values and each class's training rows and weight, and merges the
training rows' feature moments (:func:`neuron_torch.data.streaming.feature_moments`). Training then reads the
table again in every update through :class:`neuron_torch.data.streaming.StreamedSplit`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from neuron_torch.data.budget import chunk_rows, read_reserve
from neuron_torch.data.chunks import read_chunks
from neuron_torch.data.shards import Piece, Shards
from neuron_torch.data.split import PARTS, TRAIN, Split
from neuron_torch.data.streaming import StreamedSplit, feature_moments

log = logging.getLogger("neuron_torch")

# Most rows of a split read for what needs rows in memory after training (the model's input example, the
# figures); the metrics themselves are taken over every row.
SAMPLE_ROWS = 100_000


class StreamedTable:
    """A table streamed from its shards: the summary of one checked pass, and its splits as streams.

    Parameters
    ----------
    shards : Shards
    features : sequence of str, length n
    target : str
    weight_column : str, optional
    split : Split
    budget : int
        Bytes; each chunk takes a share of it (:func:`neuron_torch.data.budget.chunk_rows`).
    standardize : bool
    classes_of : callable
        ``classes_of(values, rows)`` → ``(values in class order, class names)``: how the label values seen
        become classes (the rule a loaded table follows).

    Attributes
    ----------
    rows : dict of str to int
        Rows of each split ("train", "val", "test").
    mean, std : ndarray, shape (n,)
        The training rows' standardisation statistics (0 and 1 when ``standardize`` is false).
    values : list
        The label value of each class index, as stored.
    classes : tuple of str
    class_totals : ndarray, shape (k,)
        Each class's training rows, or their total weight with a weight column.
    """

    def __init__(self, shards: Shards, features: Sequence[str], target: str, weight_column: Optional[str],
                 split: Split, budget: int, standardize: bool,
                 classes_of: Callable[[list, int], tuple[list, tuple]]):
        self.shards, self.features, self.target, self.weight_column = shards, list(features), target, weight_column
        self.split = split
        columns = len(self.features) + 1 + (weight_column is not None)
        self.chunk_rows = chunk_rows(budget, columns, read_reserve(shards.largest_row_group_bytes))
        self._summarise(standardize, classes_of)

    def _summarise(self, standardize: bool, classes_of) -> None:
        import pandas as pd

        counts = np.zeros(3, dtype=np.int64)
        per_value: dict = {}  # label value → [training rows, training weight]

        def train_rows():
            reader = read_chunks(self.shards, self.features, self.chunk_rows, label=self.target,
                                 weight=self.weight_column, check=True)
            with reader:
                for chunk in reader:
                    part = self.split.of(chunk.index)
                    counts[:] += np.bincount(part, minlength=3)
                    train = part == TRAIN
                    labels = pd.Series(chunk.labels)
                    w = np.ones(len(labels)) if chunk.weights is None else chunk.weights
                    for value in pd.unique(labels):
                        per_value.setdefault(value, [0, 0.0])
                    grouped = pd.DataFrame({"v": labels[train], "w": w[train]}).groupby("v", sort=False)["w"]
                    for value, (n, total) in zip(grouped.size().index, zip(grouped.size(), grouped.sum())):
                        per_value[value][0] += int(n)
                        per_value[value][1] += float(total)
                    if train.any():
                        yield chunk._replace(X=chunk.X[train])

        moments = feature_moments(train_rows())
        self.rows = {name: int(counts[part]) for name, part in PARTS.items()}
        self.values, self.classes = classes_of(list(per_value), sum(self.rows.values()))
        self._index = {value: i for i, value in enumerate(self.values)}
        self.class_rows = np.array([per_value[v][0] for v in self.values], dtype=np.int64)
        self.class_totals = np.array([per_value[v][1] for v in self.values], dtype=np.float64)
        n = len(self.features)
        self.mean = moments.mean if standardize else np.zeros(n)
        self.std = moments.std if standardize else np.ones(n)

    # --- labels ---------------------------------------------------------------------------------------------

    def class_index(self, labels: np.ndarray) -> np.ndarray:
        """The class index of each stored label value, shape (r,) int64."""
        import pandas as pd

        return pd.Series(labels).map(self._index).to_numpy(dtype=np.int64)

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """The network's ``Y`` for stored label values: (r, 1) in {0, 1} for two classes, one-hot (r, k)."""
        y = self.class_index(labels)
        if len(self.classes) == 2:
            return y[:, None].astype(np.float64)
        return np.eye(len(self.classes))[y]

    # --- the splits -------------------------------------------------------------------------------------------

    def stream(self, name: str, dtype: torch.dtype = torch.float64, device="cpu",
               pieces: Optional[Sequence[Piece]] = None, class_weight: Optional[np.ndarray] = None) -> StreamedSplit:
        """Split ``name`` as a stream of ``(X, Y[, W])`` chunks, standardised, in ``dtype`` on ``device``.

        Parameters
        ----------
        name : {"train", "val", "test"}
        pieces : sequence of Piece, optional
            Only these rows (a data-parallel rank's).
        class_weight : ndarray, shape (k,), optional
            Each class's weight; rows then weigh their sample weight times it.
        """
        def row_weight(labels, weights):
            per_class = class_weight[self.class_index(labels)]
            return per_class if weights is None else weights * per_class
        return StreamedSplit(self.shards, self.features, self.target, self.targets, self.chunk_rows, self.split,
                             PARTS[name], self.mean, self.std, pieces, dtype, device, self.weight_column,
                             None if class_weight is None else row_weight)

    def sample(self, name: str, rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The first ``rows`` rows of split ``name`` (by default :data:`SAMPLE_ROWS`, or one chunk's rows when
        fewer, so the sample stays within the memory budget): raw features (r, n), class indices (r,) and
        sample weights (r,) or None."""
        rows = min(SAMPLE_ROWS, self.chunk_rows) if rows is None else rows
        Xs, ys, ws, taken = [], [], [], 0
        reader = read_chunks(self.shards, self.features, self.chunk_rows, label=self.target,
                             weight=self.weight_column, split=self.split, part=PARTS[name])
        with reader:
            for chunk in reader:
                keep = min(len(chunk.index), rows - taken)
                Xs.append(chunk.X[:keep])
                ys.append(self.class_index(chunk.labels[:keep]))
                ws.append(None if chunk.weights is None else chunk.weights[:keep])
                taken += keep
                if taken >= rows:
                    break
        n = len(self.features)
        X = np.concatenate(Xs) if Xs else np.empty((0, n))
        y = np.concatenate(ys) if ys else np.empty(0, dtype=np.int64)
        w = None if self.weight_column is None or not ws else np.concatenate(ws)
        return X, y.astype(np.float64), w
