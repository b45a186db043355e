"""The data: tables from files or generators, validated, split, standardised and placed on the device once."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from torch import Tensor

from neuron_torch.data.batches import BatchStream, SingleBatch, StreamedBatches
from neuron_torch.data.labels import _labels, _sample_weights, class_weights, label_classes
from neuron_torch.data.split import PARTS, Split
from neuron_torch.data.storage import storage_dtype
from neuron_torch.data.summary import DataSummary
# DataError lives with the table reading that prediction shares; it is imported from here too
from neuron_torch.data.tables import PARQUET, feature_matrix, listing, read_frame  # noqa: F401
from neuron_torch.errors import DataError

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



# --- sources -------------------------------------------------------------------------------------------------


def breast_cancer() -> Table:
    """scikit-learn's breast-cancer table (569 × 30); label 1 is benign, as scikit-learn has it."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = [str(name) for name in bunch.feature_names]  # plain str: checkpoints load with weights_only
    return Table(bunch.data.astype(np.float64), bunch.target.astype(np.float64), names,
                 "breast_cancer", tuple(str(name) for name in bunch.target_names))


def is_sharded(path: str) -> bool:
    """Whether ``data.path`` names Parquet rows that may be streamed: a Parquet file, a folder or a glob."""
    from pathlib import Path

    return Path(path).is_dir() or any(c in path for c in "*?[") or Path(path).suffix.lower() in PARQUET


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
               features: Optional[list[str]] = None, weight_column: Optional[str] = None,
               frame: Optional["pandas.DataFrame"] = None, source: Optional[str] = None) -> Table:
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
    frame : DataFrame, optional
        The rows, already read (the shards of a folder or glob); ``path`` then only names them.
    source : str, optional
        What messages call the table; ``path`` by default.

    Raises
    ------
    DataError
        With a one-line message naming the file, column and row (1-based, counting data rows).
    """
    if target is None:
        raise DataError(f"{path}: set --data.target to the label column")
    frame = read_frame(path) if frame is None else frame
    path = path if source is None else source
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


# --- the LightningDataModule -------------------------------------------------------------------------------------


class NeuronDataModule(L.LightningDataModule):
    """Classification data for the hand-written networks: two classes or k.

    The table is read, checked, split and standardised once, when first needed (the model's
    ``feature_names`` is linked to it, so that happens before any run is created), and what the model needs of
    it is :attr:`summary`. The splits are moved to the model's device and dtype once, when the Trainer asks for
    the loaders, with each row's weight in the loss (its sample weight times its class's weight) beside them.

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
        Shares of the rows held out: each row's split is a hash of its index and ``seed``
        (:mod:`neuron_torch.data.split`), so the sizes are near, not exactly, these shares. 0 holds none out:
        validation (test) metrics are then taken on the training rows.
    seed : int
        Seed of the generated tables, the split and the mini-batch order.
    standardize : bool
        Scale features to zero mean, unit variance with statistics of the training split only.
    batch_size : int, optional
        Rows per update; ``None`` is full-batch gradient descent.
    memory_budget : str, optional
        Bytes a Parquet table may take in memory (``2GB``, ``512MiB``; default a quarter of the machine's
        memory). A table that fits is loaded; a larger one (a file, a folder of shards or a glob) is streamed
        chunk by chunk in every update, with the same numbers.
    dtype : {"model", "bfloat16"}
        How the training rows' ``X`` is stored on the device: in the parameters' dtype, or as bfloat16 (CUDA,
        float32 parameters, the single neuron's fused kernel), which halves the bytes every update reads; the
        kernel accumulates in float32. Validation and test rows keep the parameters' dtype.
    class_weight : "balanced" or dict of str to float, optional
        Weights per class, with scikit-learn's meaning (the config's ``model.class_weight``, linked here by the
        command line): each row's weight in the loss is its sample weight (or 1) times its class's weight;
        ``balanced`` gives class c ``Σw / (k·Σ_{y=c} w)`` over the training rows. Fitted once, when the table
        is read, into :attr:`class_weight`.
    """

    def __init__(self, dataset: Dataset = "breast_cancer", path: Optional[str] = None,
                 target: Optional[str] = None, positive_label: Optional[str] = None,
                 features: Optional[list[str]] = None, weight_column: Optional[str] = None,
                 n_samples: int = 1000, n_features: int = 20,
                 noise: float = 0.2, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0,
                 standardize: bool = True, batch_size: Optional[int] = None, memory_budget: Optional[str] = None,
                 dtype: Literal["model", "bfloat16"] = "model",
                 class_weight: Union[Literal["balanced"], dict[str, float], None] = None):
        super().__init__()
        self.save_hyperparameters()
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= frac < 1:
                raise DataError(f"data.{name} must be in [0, 1), got {frac}")
        if weight_column is not None and path is None:
            raise DataError("data.weight_column names a column of data.path; the built-in tables have no weights")
        if val_fraction + test_fraction >= 1:
            raise DataError("data.val_fraction + data.test_fraction must be < 1: nothing is left to train on")
        self._splits: Optional[dict[str, tuple[Tensor, Tensor]]] = None
        self.streamed = None  # a StreamedTable when the table is larger than the memory budget
        self.class_weight: Optional[np.ndarray] = None  # (k,) each class's weight, fitted in prepare()
        self._summary: Optional[DataSummary] = None
        self._threads_set = False  # torch's threads lowered once for a streamed table's reading thread

    def prepare(self) -> None:
        """Read, check, split and standardise the table, fit the class weights and summarise it; once.

        Raises
        ------
        DataError
            With one line naming the file, column and row, or the ``model.class_weight`` that cannot apply.
        """
        if self._summary is not None:
            return
        self._read()
        hp = self.hparams
        # from the training rows' class totals, before any run exists: a weight that cannot be is told now
        totals = self._class_totals()
        self.class_weight = class_weights(hp.class_weight, self._classes, totals)
        self._summary = DataSummary(tuple(self._feature_names), tuple(self._classes), self.mean, self.std,
                                    totals, self.streamed is not None, hp.class_weight)

    @property
    def summary(self) -> DataSummary:
        """What the model needs of the data (reads the table on first use)."""
        self.prepare()
        return self._summary

    def _read(self) -> None:
        """The table read, checked, split and standardised: float64 tensors on the CPU, or a streamed table."""
        hp = self.hparams
        split = Split(hp.seed, hp.val_fraction, hp.test_fraction)
        if hp.path is not None and is_sharded(hp.path):
            table = self._sharded(hp.path, split)
            if table is None:  # streamed: summarised, nothing loaded
                self._splits = {}
                return
        elif hp.path is not None:
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
        # each row's split is a function of its index and the seed alone, so a streamed table splits alike
        part = split.of(np.arange(m))
        parts = {name: np.flatnonzero(part == code) for name, code in PARTS.items()}
        n_val, n_test = len(parts["val"]), len(parts["test"])
        self._check_split(table.source, m, len(parts["train"]), n_val, n_test)

        X_train = table.X[parts["train"]]
        self.mean = X_train.mean(0) if hp.standardize else np.zeros(X_train.shape[1])
        self.std = X_train.std(0) if hp.standardize else np.ones(X_train.shape[1])
        self._check_statistics(table.source)
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
        self._log_table(table.source, len(parts["train"]), n_val, n_test, table.classes)

    def _log_table(self, source: str, n_train: int, n_val: int, n_test: int, classes: Sequence[str],
                   streamed: str = "") -> None:
        if len(classes) == 2:
            labels = (f"label 1 = {classes[1]!r}, 0 = {classes[0]!r}"
                      + (f" (--data.positive_label {classes[0]} would make {classes[0]!r} label 1)"
                         if self.hparams.path else ""))
        else:
            labels = f"{len(classes)} classes ({listing(classes)})"
        log.info("data: %s, %d features; train/val/test %d/%d/%d rows%s; %s%s", source,
                 len(self._feature_names), n_train, n_val, n_test,
                 "" if n_val and n_test else " (metrics without a hold-out are on the training rows)", labels,
                 streamed)

    def _sharded(self, path: str, split: Split) -> Optional[Table]:
        """A Parquet file, folder of shards or glob: the loaded :class:`Table` when it fits the memory budget;
        otherwise None, with the table summarised for streaming in :attr:`streamed`."""
        from neuron_torch.data.budget import fits_in_memory, parse_memory_budget
        from neuron_torch.data.shards import check_columns, open_shards
        from neuron_torch.data.streamed_table import StreamedTable

        hp = self.hparams
        if hp.target is None:
            raise DataError(f"{path}: set --data.target to the label column")
        shards = open_shards(path)
        others = [hp.target] + ([hp.weight_column] if hp.weight_column else [])
        features = hp.features or [c for c in shards.columns if c not in others]
        budget = parse_memory_budget(hp.memory_budget)
        if fits_in_memory(shards.rows, len(features) + len(others), budget):
            if len(shards.paths) == 1:
                return read_table(shards.paths[0], hp.target, hp.positive_label, hp.features, hp.weight_column,
                                  source=path)
            import pyarrow as pa
            import pyarrow.parquet as pq

            needed = [*features, *others]  # in one order, whatever each shard's own
            frame = pa.concat_tables([pq.read_table(shard, columns=needed).select(needed)
                                      for shard in shards.paths]).to_pandas()
            return read_table(path, hp.target, hp.positive_label, hp.features, hp.weight_column, frame=frame)
        check_columns(shards, features, others)
        if hp.batch_size is not None:  # before the pass over every row, not after it
            raise DataError(f"{path}: data.batch_size with a table streamed from its shards is not supported; "
                            "full-batch updates stream every row (raise data.memory_budget to load it)")

        def classes_of(values: list, rows: int):
            return label_classes(values, rows, path, hp.target, hp.positive_label)

        table = StreamedTable(shards, features, hp.target, hp.weight_column, split, budget, hp.standardize,
                              classes_of)
        self.streamed, self.table_source, self._classes = table, path, table.classes
        self._feature_names = list(features)
        self.mean, self.std = table.mean, table.std
        self._check_split(path, shards.rows, table.rows["train"], table.rows["val"], table.rows["test"])
        self._check_statistics(path)
        if not table.class_rows.all():
            absent = int(np.argmin(table.class_rows))
            raise DataError(f"{path}: class {table.classes[absent]!r} has no training rows: lower "
                            "data.val_fraction and data.test_fraction, or change data.seed")
        if not table.class_totals.sum():
            raise DataError(f"{path}: column {hp.weight_column!r}: every training row has weight 0")
        self._log_table(path, table.rows["train"], table.rows["val"], table.rows["test"], table.classes,
                        f"; streamed in chunks of {table.chunk_rows} rows ({len(shards.paths)} shards, "
                        f"{shards.rows} rows, over the memory budget)")
        return None

    def _check_split(self, source: str, m: int, n_train: int, n_val: int, n_test: int) -> None:
        """Refuse a split with under two training rows (standardisation and learning need them), or with no
        row in a hold-out that was asked for (its fraction > 0)."""
        hp = self.hparams
        if n_train < 2 or (hp.val_fraction > 0 and not n_val) or (hp.test_fraction > 0 and not n_test):
            raise DataError(f"{source}: {m} row{'s' if m != 1 else ''} are too few to split into train "
                            f"(at least 2 rows), val ({hp.val_fraction}) and test ({hp.test_fraction})")

    def _check_statistics(self, source: str) -> None:
        """Refuse standardisation statistics that overflowed or a column constant on the training rows."""
        overflowed = np.flatnonzero(~(np.isfinite(self.mean) & np.isfinite(self.std)))
        if overflowed.size:  # values are bounded when read; this guards the generated tables too
            raise DataError(f"{source}: column {self._feature_names[overflowed[0]]!r}: its mean or spread "
                            "overflows float64; rescale the column")
        constant = np.flatnonzero(self.std == 0)
        if constant.size:
            raise DataError(f"{source}: column {self._feature_names[constant[0]]!r} is constant on the "
                            "training split and cannot be standardised; drop it (data.features) or set "
                            "data.standardize false")

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
        is 0) is the training split: metrics without a hold-out are taken on the rows trained on. A streamed
        table gives its first :data:`~neuron_torch.data.streamed_table.SAMPLE_ROWS` rows (for the model's example
        and the figures; training and metrics stream every row).
        """
        self.prepare()
        if self.streamed is not None:
            X, y, _ = self._sample(self.evaluated_on(name))
            return torch.from_numpy((X - self.mean) / self.std), self._targets(y)
        return self._splits[self.evaluated_on(name)]

    def weights(self, name: str) -> Optional[Tensor]:
        """Each row's weight in the loss for split ``name``, shape (m, 1): its sample weight
        (``data.weight_column``, else 1) times its class's weight (``class_weight``); None when neither applies
        (the plain mean). A streamed table gives its first rows' (as :meth:`split`)."""
        self.prepare()
        on = self.evaluated_on(name)
        if self.streamed is not None:
            _, y, w = self._sample(on)
            return self._row_weights(y, None if w is None else torch.from_numpy(w).unsqueeze(1))
        return self._row_weights(self._labels[on], self._weights[on])

    def _row_weights(self, y: np.ndarray, weight: Optional[Tensor]) -> Optional[Tensor]:
        """Sample weights ``weight`` (m, 1) or None, times the class weight of each class index in ``y`` (m,)."""
        if self.class_weight is None:
            return weight
        per_class = torch.from_numpy(self.class_weight)[torch.from_numpy(y).long()].unsqueeze(1)  # (m, 1)
        return per_class if weight is None else weight * per_class

    def evaluated_on(self, name: str) -> str:
        """The split whose rows stand for ``name``: itself, or "train" when ``name`` holds no rows."""
        self.prepare()
        rows = self.streamed.rows[name] if self.streamed is not None else len(self._labels[name])
        return name if rows else "train"

    def labels(self, name: str) -> np.ndarray:
        """The class index of each row of split ``name``, shape (m,)."""
        self.prepare()
        if self.streamed is not None:
            return self._sample(self.evaluated_on(name))[1]
        return self._labels[self.evaluated_on(name)]

    def _class_totals(self) -> np.ndarray:
        """Each class's training rows, or their total sample weight with ``data.weight_column``, shape (k,)."""
        if self.streamed is not None:
            return self.streamed.class_totals
        w = self._weights["train"]
        return np.bincount(self._labels["train"].astype(np.int64), None if w is None else w[:, 0].numpy(),
                           minlength=len(self._classes)).astype(np.float64)

    def raw_split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Split ``name`` as raw features ``X`` (m, n) and class indices ``y`` (m,), with the scaling undone
        (a streamed table's first rows, as :meth:`split`)."""
        self.prepare()
        if self.streamed is not None:
            return self._sample(self.evaluated_on(name))[:2]
        X, _ = self.split(name)
        return X.numpy() * self.std + self.mean, self._labels[self.evaluated_on(name)]

    def _sample(self, name: str) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """A streamed split's first rows, read once: raw features, class indices, sample weights."""
        samples = self.__dict__.setdefault("_samples", {})
        if name not in samples:
            samples[name] = self.streamed.sample(name)
        return samples[name]

    def setup(self, stage: str) -> None:
        self.prepare()
        if (self.streamed is not None and stage == "fit" and not self._threads_set
                and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1):
            self._threads_set = True
            # the reading thread decodes the next chunk while torch computes on this one: leave it a core. With
            # torch on every core the two contend (benchmarks/README.md)
            threads = torch.get_num_threads() - 1
            torch.set_num_threads(threads)
            log.info("data: streaming with %d torch thread%s and one reading thread (OMP_NUM_THREADS sets it)",
                     threads, "s" if threads != 1 else "")

    def _placed(self, name: str, rank: int = 0, world: int = 1):
        """Split ``name`` as ``(X, Y)``, or ``(X, Y, W)`` with row weights (:meth:`weights`), in the model's dtype
        and on its device (moved once, not per step). A streamed table gives a
        :class:`~neuron_torch.data.streaming.StreamedSplit` of those chunks instead, of the rows of ``rank`` among
        ``world`` data-parallel ranks."""
        param = next(self.trainer.lightning_module.parameters())
        if self.streamed is not None:
            from neuron_torch.data.shards import rank_pieces

            pieces = rank_pieces(self.streamed.shards, rank, world) if world > 1 else None
            return self.streamed.stream(self.evaluated_on(name), param.dtype, param.device, pieces, self.class_weight)
        X, Y = self.split(name)
        W = self.weights(name)
        tensors = tuple(t.to(param.device, param.dtype) for t in (X, Y) + ((W,) if W is not None else ()))
        if name == "train" and self.hparams.dtype != "model":  # X rounded once here, never per update
            tensors = (X.to(param.device, storage_dtype(self.hparams.dtype, param.dtype, param.device)),
                       *tensors[1:])
        if world > 1:  # data parallel: each rank trains on its own rows; the module sums gradients over all
            tensors = tuple(t[rank::world] for t in tensors)
        return tensors

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        placed = self._placed("train", rank, world)
        if self.streamed is not None:
            return StreamedBatches(placed)
        # one batch per update: a run resumed at update k starts at batch k
        return BatchStream(*placed[:2], weight=placed[2] if len(placed) > 2 else None,
                           batch_size=self.hparams.batch_size, seed=self.hparams.seed,
                           position=self.trainer.global_step)

    def val_dataloader(self) -> SingleBatch:
        return SingleBatch(self._placed("val"))

    def test_dataloader(self) -> SingleBatch:
        return SingleBatch(self._placed("test"))
