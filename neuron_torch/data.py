"""The data: tables from files or generators, validated, split, standardised and placed on the device once."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

# DataError lives with the table reading that prediction shares; it is imported from here too
from neuron_torch.tables import (DataError, feature_matrix, listing, numeric_column, read_frame,  # noqa: F401
                                 refuse_nested)

log = logging.getLogger("neuron_torch")

Dataset = Literal["breast_cancer", "iris", "wine", "synthetic", "moons", "circles", "xor"]


@dataclass
class Table:
    """Features and class labels, before any split."""

    X: np.ndarray  # (m, n) float64
    y: np.ndarray  # (m,) float64 class index: in {0, 1} for two classes, {0, …, k − 1} for k
    feature_names: list[str]
    source: str  # where the rows came from, for messages and the run's tags
    classes: tuple[str, ...] = ("0", "1")  # the label value of each class index
    weight: Optional[np.ndarray] = None  # (m,) non-negative sample weights, or None

# A label column with more distinct values than this, or with fewer than two rows per value on average, is not
# a class label (a measurement, an id): it is refused rather than trained as that many classes.
MAX_CLASSES = 1000


# --- sources -------------------------------------------------------------------------------------------------


def breast_cancer() -> Table:
    """scikit-learn's breast-cancer table (569 × 30); label 1 is benign, as scikit-learn has it."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = [str(name) for name in bunch.feature_names]  # plain str: checkpoints load with weights_only
    return Table(bunch.data.astype(np.float64), bunch.target.astype(np.float64), names,
                 "breast_cancer", tuple(str(name) for name in bunch.target_names))


def bundled(name: str) -> Table:
    """scikit-learn's three-class tables: ``iris`` (150 × 4) and ``wine`` (178 × 13)."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = [str(n) for n in bunch.feature_names]
    return Table(bunch.data.astype(np.float64), bunch.target.astype(np.float64), names, name,
                 tuple(str(c) for c in bunch.target_names))


def generated(dataset: str, n_samples: int, n_features: int, noise: float, seed: int) -> Table:
    """Seeded synthetic tables: ``make_classification`` style, two moons, circles, or XOR quadrants."""
    from sklearn import datasets

    if n_samples < 1 or n_features < 1:
        raise DataError(f"data.n_samples and data.n_features must be >= 1, got {n_samples} and {n_features}")
    rng = np.random.default_rng(seed)
    if dataset == "synthetic":
        informative = max(1, min(n_features, n_features // 2 + 1))
        X, y = datasets.make_classification(n_samples, n_features, n_informative=informative,
                                            n_redundant=0, flip_y=0.01, random_state=seed)
    elif dataset == "moons":
        X, y = datasets.make_moons(n_samples, noise=noise, random_state=seed)
    elif dataset == "circles":
        X, y = datasets.make_circles(n_samples, noise=noise, factor=0.5, random_state=seed)
    else:  # xor: the label is whether the two coordinates have the same sign
        X = rng.uniform(-1, 1, size=(n_samples, 2))
        y = (X[:, 0] * X[:, 1] > 0).astype(np.float64)
        X = X + noise * rng.standard_normal(X.shape)
    names = [f"x{i}" for i in range(X.shape[1])]
    return Table(X.astype(np.float64), y.astype(np.float64), names, dataset)


def read_table(path: str, target: Optional[str], positive_label: Optional[str] = None,
               features: Optional[list[str]] = None, weight_column: Optional[str] = None) -> Table:
    """Read a CSV or Parquet file into features and class labels, rejecting what cannot be trained on.

    Parameters
    ----------
    path : str
        A ``.csv`` (or ``.tsv``/``.txt``) or ``.parquet``/``.pq`` file with a header row.
    target : str
        The label column: two distinct values (labels 0 and 1), or k > 2 (class indices 0 … k − 1 in sorted
        order of the values).
    positive_label : str, optional
        For two values, which becomes 1. Default: 1 for 0/1 labels, True for booleans, otherwise the larger
        value in sorted order.
    features : list of str, optional
        Feature columns to use; default every column but ``target`` and ``weight_column``.
    weight_column : str, optional
        A column of non-negative sample weights (never a feature).

    Raises
    ------
    DataError
        With a one-line message naming the file, column and row (1-based, counting data rows).
    """
    if target is None:
        raise DataError(f"{path}: set --data.target to the label column")
    frame = read_frame(path)
    if target not in frame.columns:
        raise DataError(f"{path}: no column {target!r} (columns: {listing(frame.columns)})")
    if weight_column is not None and weight_column not in frame.columns:
        raise DataError(f"{path}: no column {weight_column!r} for data.weight_column "
                        f"(columns: {listing(frame.columns)})")
    if weight_column is not None and weight_column == target:
        raise DataError(f"{path}: column {target!r} is the target and cannot also be the weight column")
    if features is None:
        features = [c for c in frame.columns if c not in (target, weight_column)]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {listing(frame.columns)})")
    repeated = [c for i, c in enumerate(features) if c in features[:i]]
    if repeated:
        raise DataError(f"{path}: data.features names column {repeated[0]!r} more than once")
    if target in features:
        raise DataError(f"{path}: column {target!r} is the target and cannot also be a feature")
    if weight_column is not None and weight_column in features:
        raise DataError(f"{path}: column {weight_column!r} holds the sample weights and cannot also be a feature")
    if not features:
        raise DataError(f"{path}: no feature columns besides the target {target!r}")

    X = feature_matrix(frame, features, path)  # the same checks as prediction applies
    y, classes = _labels(frame[target], path, target, positive_label)
    weight = None if weight_column is None else _sample_weights(frame[weight_column], path, weight_column)
    return Table(X, y, list(features), str(path), classes, weight)


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
    values = list(pd.unique(column))
    numeric = all(isinstance(v, (int, float, np.integer, np.floating, bool, np.bool_)) for v in values)
    values.sort(key=float if numeric else str)
    if len(values) < 2:
        raise DataError(f"{path}: column {name!r} has {len(values)} distinct label value"
                        f"{'s' if len(values) != 1 else ''} ({listing(values)}); at least 2 are needed")
    if len(values) > 2:
        if len(values) > MAX_CLASSES or len(values) > len(column) / 2:
            raise DataError(f"{path}: column {name!r} has {len(values)} distinct values in {len(column)} rows: "
                            "that is not a class label (set --data.target to the label column)")
        if positive_label is not None:
            raise DataError(f"{path}: data.positive_label is for a two-class label; column {name!r} has "
                            f"{len(values)} classes ({listing(values)})")
        index = {value: i for i, value in enumerate(values)}
        y = column.map(index).to_numpy(dtype=np.float64)
        return y, tuple(str(v) for v in values)
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
    y = (column == positive).to_numpy(dtype=np.float64)
    return y, (str(negative), str(positive))


def class_weights(class_weight, classes: Sequence[str], y: np.ndarray,
                  sample_weight: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The weight of each class, with scikit-learn's meaning of ``class_weight``.

    Parameters
    ----------
    class_weight : None, "balanced" or dict of str to float
        ``balanced`` gives class c the weight ``Σw / (k·Σ_{y=c} w)`` (``m / (k·m_c)`` unweighted); a mapping
        gives the listed labels their weight and the others 1.
    classes : sequence of str, length k
        The label of each class index.
    y : ndarray, shape (m,)
        Class indices of the rows the weights are fitted on (the training split).
    sample_weight : ndarray, shape (m,), optional

    Returns
    -------
    ndarray, shape (k,), or None when ``class_weight`` is None
    """
    from sklearn.utils.class_weight import compute_class_weight

    if class_weight is None:
        return None
    check_class_weight(class_weight, classes)
    if isinstance(class_weight, str):  # every class has training rows (prepare checks), so none divides by 0
        index = np.arange(len(classes))
        return compute_class_weight("balanced", classes=index, y=y.astype(np.int64), sample_weight=sample_weight)
    weights = np.ones(len(classes))
    for label, value in class_weight.items():
        weights[list(classes).index(str(label))] = float(value)
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


# --- what training iterates over -------------------------------------------------------------------------------


class BatchGroup:
    """The mini-batches of one training step, in order: ``batches`` is a list of ``(X, Y)`` pairs.

    A class of its own (not a list), so that a loader yielding ``[X, Y]`` lists is never taken for a group.
    """

    def __init__(self, batches: list[tuple[Tensor, Tensor]]):
        self.batches = batches


class BatchStream:
    """An endless stream of training batches cut from tensors that already sit on the device.

    A batch is ``(X, Y)``, or ``(X, Y, W)`` with sample weights ``W`` (m, 1). Full-batch gradient descent yields
    the same batch every step: nothing is copied or collated. With a
    ``batch_size``, each pass over the rows follows a fresh seeded permutation, and each item of the stream
    is a :class:`BatchGroup` of the next ``group`` mini-batches (the updates of one training step). The
    stream is one long epoch, so the Trainer's ``max_steps`` sets the number of updates. ``position`` is the
    index of the first mini-batch to hand out: a resumed run passes its update count and continues the
    sequence exactly where it stopped (the Trainer fetches one item ahead, so a count kept by the stream
    itself would be off).
    """

    def __init__(self, X: Tensor, Y: Tensor, batch_size: Optional[int] = None, seed: int = 0, position: int = 0,
                 group: int = 1, weight: Optional[Tensor] = None):
        self.X, self.Y, self.seed, self.group = X, Y, seed, group
        self.tensors = (X, Y) if weight is None else (X, Y, weight)
        m = X.shape[0]
        self.batch_size = m if batch_size is None or batch_size >= m else batch_size
        self.batches_per_pass = math.ceil(m / self.batch_size)
        self.position = position  # mini-batches handed out so far

    def __iter__(self) -> Iterator:
        if self.batch_size == self.X.shape[0]:
            while True:
                yield self.tensors
        batches = self._batches()
        while True:
            yield BatchGroup([next(batches) for _ in range(self.group)])

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            n_pass, start = divmod(self.position, self.batches_per_pass)
            order = self._permutation(n_pass)
            for k in range(start, self.batches_per_pass):
                rows = order[k * self.batch_size:(k + 1) * self.batch_size]
                self.position += 1
                yield tuple(t[rows] for t in self.tensors)

    def _permutation(self, n_pass: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + n_pass)
        return torch.randperm(self.X.shape[0], generator=generator).to(self.X.device)


class SingleBatch:
    """A loader of exactly one batch (a whole split, ``(X, Y)`` or ``(X, Y, W)``), for validation and test."""

    def __init__(self, batch: tuple[Tensor, ...]):
        self.batch = batch

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        yield self.batch

    def __len__(self) -> int:
        return 1


# --- the LightningDataModule -------------------------------------------------------------------------------------


class NeuronDataModule(L.LightningDataModule):
    """Classification data for the hand-written networks: two classes or k.

    The table is read, checked, split and standardised once, when first needed (the model's
    ``feature_names`` is linked to it, so that happens before any run is created); the splits are moved to
    the model's device and dtype once, when the Trainer asks for the loaders.

    Parameters
    ----------
    dataset : {"breast_cancer", "iris", "wine", "synthetic", "moons", "circles", "xor"}
        Built-in table, used when ``path`` is not given (iris and wine have three classes).
    path : str, optional
        A CSV or Parquet file; feature names are its column names.
    target : str, optional
        The label column of ``path``: two distinct values, or k > 2 classes (multinomial regression).
    positive_label : str, optional
        For two classes, the label value mapped to 1; default 1 for 0/1 labels, else the larger value in
        sorted order.
    features : list of str, optional
        The feature columns of ``path``; default all but ``target`` and ``weight_column``.
    weight_column : str, optional
        A column of ``path`` holding non-negative sample weights: the loss and its gradients become weighted
        means (a weight of 2 counts a row twice).
    n_samples, n_features : int
        Size of the generated tables (``moons``, ``circles`` and ``xor`` have 2 features).
    noise : float
        Noise of ``moons``, ``circles`` and ``xor``.
    val_fraction, test_fraction : float
        Shares of the rows held out, drawn by a seeded permutation. 0 holds none out: validation (test)
        metrics are then taken on the training rows.
    seed : int
        Seed of the generated tables, the split and the mini-batch order.
    standardize : bool
        Scale features to zero mean, unit variance with statistics of the training split only.
    batch_size : int, optional
        Rows per update; ``None`` is full-batch gradient descent.
    """

    def __init__(self, dataset: Dataset = "breast_cancer", path: Optional[str] = None,
                 target: Optional[str] = None, positive_label: Optional[str] = None,
                 features: Optional[list[str]] = None, weight_column: Optional[str] = None,
                 n_samples: int = 1000, n_features: int = 20,
                 noise: float = 0.2, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0,
                 standardize: bool = True, batch_size: Optional[int] = None):
        super().__init__()
        self.save_hyperparameters()
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= frac < 1:
                raise DataError(f"data.{name} must be in [0, 1), got {frac}")
        if weight_column is not None and path is None:
            raise DataError("data.weight_column names a column of data.path; the built-in tables have no weights")
        if val_fraction + test_fraction >= 1:
            raise DataError("data.val_fraction + data.test_fraction must be < 1: nothing is left to train on")
        if batch_size is not None and batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1 (or null for full batch), got {batch_size}")
        self._splits: Optional[dict[str, tuple[Tensor, Tensor]]] = None

    # the table, split and standardised (float64, CPU), computed once
    def prepare(self) -> None:
        if self._splits is not None:
            return
        hp = self.hparams
        if hp.path is not None:
            table = read_table(hp.path, hp.target, hp.positive_label, hp.features, hp.weight_column)
        elif hp.dataset == "breast_cancer":
            table = breast_cancer()
        elif hp.dataset in ("iris", "wine"):
            table = bundled(hp.dataset)
        else:
            table = generated(hp.dataset, hp.n_samples, hp.n_features, hp.noise, hp.seed)
        self.table_source, self._classes = table.source, table.classes
        self._feature_names = table.feature_names

        m = len(table.y)
        n_val, n_test = math.ceil(m * hp.val_fraction), math.ceil(m * hp.test_fraction)
        if m - n_val - n_test < 2:  # standardisation and learning need at least two training rows
            raise DataError(f"{table.source}: {m} row{'s' if m != 1 else ''} are too few to split into train "
                            f"(at least 2 rows), val ({hp.val_fraction}) and test ({hp.test_fraction})")
        order = np.random.default_rng(hp.seed).permutation(m)
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}

        X_train = table.X[parts["train"]]
        self.mean = X_train.mean(0) if hp.standardize else np.zeros(X_train.shape[1])
        self.std = X_train.std(0) if hp.standardize else np.ones(X_train.shape[1])
        overflowed = np.flatnonzero(~(np.isfinite(self.mean) & np.isfinite(self.std)))
        if overflowed.size:  # values are bounded when read; this guards the generated tables too
            raise DataError(f"{table.source}: column {table.feature_names[overflowed[0]]!r}: its mean or spread "
                            "overflows float64; rescale the column")
        constant = np.flatnonzero(self.std == 0)
        if constant.size:
            raise DataError(f"{table.source}: column {table.feature_names[constant[0]]!r} is constant on the "
                            "training split and cannot be standardised; drop it (data.features) or set "
                            "data.standardize false")
        counts = np.bincount(table.y[parts["train"]].astype(np.int64), minlength=len(table.classes))
        if not counts.all():
            absent = int(np.argmin(counts))
            raise DataError(f"{table.source}: class {table.classes[absent]!r} has no training rows "
                            f"({int((table.y == absent).sum())} in all): lower data.val_fraction and "
                            "data.test_fraction, or change data.seed")
        self._labels = {name: table.y[rows] for name, rows in parts.items()}  # class indices, (m_split,)
        self._splits = {
            name: (torch.from_numpy((table.X[rows] - self.mean) / self.std), self._targets(table.y[rows]))
            for name, rows in parts.items()
        }
        self._weights = {name: None if table.weight is None else torch.from_numpy(table.weight[rows]).unsqueeze(1)
                         for name, rows in parts.items()}
        if table.weight is not None and not table.weight[parts["train"]].any():
            raise DataError(f"{table.source}: column {hp.weight_column!r}: every training row has weight 0")
        if len(table.classes) == 2:
            labels = (f"label 1 = {table.classes[1]!r}, 0 = {table.classes[0]!r}"
                      + (f" (--data.positive_label {table.classes[0]} would make {table.classes[0]!r} label 1)"
                         if hp.path else ""))
        else:
            labels = f"{len(table.classes)} classes ({listing(table.classes)})"
        log.info("data: %s, %d features; train/val/test %d/%d/%d rows%s; %s", table.source,
                 len(self._feature_names), len(parts["train"]), n_val, n_test,
                 "" if n_val and n_test else " (metrics without a hold-out are on the training rows)", labels)

    def _targets(self, y: np.ndarray) -> Tensor:
        """The network's labels for class indices ``y`` (m,): (m, 1) in {0, 1} for two classes, one-hot (m, k)."""
        y = torch.from_numpy(y)
        if len(self._classes) == 2:
            return y.unsqueeze(1)
        return torch.nn.functional.one_hot(y.long(), len(self._classes)).to(torch.float64)

    @property
    def classes(self) -> list[str]:
        """The label value of each class index (two for binary data: label 0, label 1); reads the table."""
        self.prepare()
        return list(self._classes)

    @property
    def feature_names(self) -> list[str]:
        """Names of the features, in column order (reads the table on first use)."""
        self.prepare()
        return list(self._feature_names)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The standardised ``(X, Y)`` of split ``name`` ("train", "val" or "test"), float64 on the CPU.

        ``Y`` is (m, 1) in {0, 1} for two classes, one-hot (m, k) for k. A split with no rows (its fraction
        is 0) is the training split: metrics without a hold-out are taken on the rows trained on.
        """
        self.prepare()
        return self._splits[self.evaluated_on(name)]

    def weights(self, name: str) -> Optional[Tensor]:
        """The sample weights (m, 1) of split ``name`` (``data.weight_column``), or None without one."""
        self.prepare()
        return self._weights[self.evaluated_on(name)]

    def evaluated_on(self, name: str) -> str:
        """The split whose rows stand for ``name``: itself, or "train" when ``name`` holds no rows."""
        self.prepare()
        return name if len(self._labels[name]) else "train"

    def labels(self, name: str) -> np.ndarray:
        """The class index of each row of split ``name``, shape (m,)."""
        self.prepare()
        return self._labels[self.evaluated_on(name)]

    def raw_split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Split ``name`` as raw features ``X`` (m, n) and class indices ``y`` (m,), with the scaling undone."""
        X, _ = self.split(name)
        return X.numpy() * self.std + self.mean, self._labels[self.evaluated_on(name)]

    def setup(self, stage: str) -> None:
        self.prepare()

    def _placed(self, name: str) -> tuple[Tensor, ...]:
        """Split ``name`` as ``(X, Y)``, or ``(X, Y, W)`` with row weights, in the model's dtype and on its device
        (moved once, not per step). ``W`` is the sample weight times the model's class weight."""
        module = self.trainer.lightning_module
        param = next(module.parameters())
        X, Y = self.split(name)
        W = self.weights(name)
        if hasattr(module, "row_weights"):
            W = module.row_weights(torch.from_numpy(self._labels[self.evaluated_on(name)]), W)
        return tuple(t.to(param.device, param.dtype) for t in (X, Y) + ((W,) if W is not None else ()))

    def train_dataloader(self) -> BatchStream:
        tensors = self._placed("train")
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if world > 1:  # data parallel: each rank trains on its own rows; the module sums gradients over all
            tensors = tuple(t[rank::world] for t in tensors)
        # one batch per update: a run resumed at update k starts at batch k
        return BatchStream(*tensors[:2], weight=tensors[2] if len(tensors) > 2 else None,
                           batch_size=self.hparams.batch_size, seed=self.hparams.seed,
                           position=self.trainer.global_step,
                           group=getattr(self.trainer.lightning_module, "updates_per_step", 1))

    def val_dataloader(self) -> SingleBatch:
        return SingleBatch(self._placed("val"))

    def test_dataloader(self) -> SingleBatch:
        return SingleBatch(self._placed("test"))
