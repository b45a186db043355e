"""Reading a sharded table chunk by chunk, one chunk ahead on a background thread.

A chunk is at most ``chunk_rows`` consecutive rows of one shard, read with only the columns needed, turned into
a float64 block and, where asked, checked, cut to one split and standardised, all on the reading thread: Parquet
decoding and these conversions release the GIL, so they overlap the consumer's compute on the chunk before.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, NamedTuple, Optional, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuron_torch.errors import DataError, first_line
from neuron_torch.data.shards import Piece, Shards
from neuron_torch.data.split import Split
from neuron_torch.data.tables import MAX_ABS

T = TypeVar("T")
FILL_ROWS = 4096  # rows per block when standardising: a block of rows stays in cache between its two steps
# Parquet reads through a buffer of this size instead of loading each column chunk of a row group whole
# beforehand (pyarrow's pre_buffer): a row group being read then holds less memory (benchmarks/README.md, "Memory").
READ_BUFFER = 1 << 16
THREADS = True


class Chunk(NamedTuple):
    """Rows read together, in global order.

    Attributes
    ----------
    index : ndarray of int64, shape (r,)
        Global index of each row.
    X : ndarray, shape (r, n)
        Feature values, C-contiguous, float64 unless the reader was given another dtype (standardised when it
        was given a centre and scale).
    labels : ndarray, shape (r,), or None
        The label column as stored (numbers, booleans or strings).
    weights : ndarray of float64, shape (r,), or None
    path : str
        The shard the rows came from.
    """

    index: np.ndarray
    X: np.ndarray
    labels: Optional[np.ndarray]
    weights: Optional[np.ndarray]
    path: str


class Prefetch(Generic[T]):
    """Iterate ``produce()`` on a background thread, ``depth`` items ahead of the consumer.

    Use it in a ``with`` block (or call :meth:`close`): a consumer that stops early stops the thread, which
    closes ``produce()``'s iterator (and so its open files) on its way out. An exception raised by the producer
    is raised again in the consumer, where it would have been raised without the thread.
    """

    _DONE = object()

    def __init__(self, produce: Callable[[], Iterator[T]], depth: int = 1, name: str = "neuron-torch-prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Iterator[T]]) -> None:
        items = None
        try:
            items = produce()
            for item in items:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as err:  # handed to the consumer, which raises it
            self._put(err)
        finally:
            if hasattr(items, "close"):
                items.close()

    def _put(self, item) -> bool:
        """Wait for room in the queue; False once the consumer has stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread and wait for it; the items it read ahead are dropped."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)  # room for a put already under way
            except queue.Empty:
                pass
        self._queue = queue.Queue()  # drop references to chunks read ahead

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_chunks(shards: Shards, features: Sequence[str], chunk_rows: int, label: Optional[str] = None,
                weight: Optional[str] = None, pieces: Optional[Sequence[Piece]] = None,
                split: Optional[Split] = None, part: int = 0, center: Optional[np.ndarray] = None,
                scale: Optional[np.ndarray] = None, check: bool = False, dtype=np.float64) -> Prefetch[Chunk]:
    """Chunks of the rows of ``pieces`` (all rows by default), read one chunk ahead on a background thread.

    Parameters
    ----------
    shards : Shards
    features : sequence of str, length n
        Feature columns, in the order of ``X``'s columns.
    chunk_rows : int
        Most rows per chunk (see :func:`neuron_torch.data.budget.chunk_rows`).
    label, weight : str, optional
        The label and sample-weight columns to read along.
    pieces : sequence of Piece, optional
        The rows to read, e.g. a rank's (:func:`neuron_torch.data.shards.rank_pieces`); in global order.
    split : Split, optional
        Keep only the rows of part ``part`` (0 train, 1 validation, 2 test); every row when None.
    center, scale : ndarray, shape (n,), optional
        Standardise ``X`` in place: ``(X − center) / scale``.
    check : bool
        Check every row read (before the split is applied) as a loaded table is checked: finite features within
        ``MAX_ABS``, no missing label, finite non-negative weights. A run checks once, on its first pass.
    dtype : numpy dtype
        Of ``X``, standardised in that dtype on the reading thread, off the consumer's time.

    Returns
    -------
    Prefetch of Chunk
        Use it in a ``with`` block. Chunks with no row of the part are skipped.

    Raises
    ------
    DataError
        While iterating: one line naming the shard when it is gone, changed since the table was opened, or
        cannot be decoded; with the column and row (1-based within the shard) when ``check`` finds a bad value.
    """
    pieces = list(shards.pieces() if pieces is None else pieces)
    columns = [*features, *(c for c in (label, weight) if c is not None)]

    def produce() -> Iterator[Chunk]:
        for run in _runs(pieces):
            yield from _read_run(shards, run, features, columns, chunk_rows, label, weight, split, part, center,
                                 scale, check, dtype)

    return Prefetch(produce)


def _runs(pieces: list[Piece]) -> list[list[Piece]]:
    """Pieces grouped into runs of consecutive rows of one shard, each read with one Parquet file open."""
    runs: list[list[Piece]] = []
    for piece in pieces:
        if runs and runs[-1][-1].path == piece.path and runs[-1][-1].start + runs[-1][-1].rows == piece.start:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs


def _read_run(shards, run, features, columns, chunk_rows, label, weight, split, part, center, scale, check, dtype):
    path = run[0].path
    shard_row = _shard_row(shards, run[0])  # 0-based row within the shard of the run's first row, for messages
    if shards.stamp_of(path) != shards.stamps[path]:
        raise DataError(f"{path}: shard of {shards.source} changed since the table was opened; restart the run")
    try:
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER) as reader:
            for piece in run:
                # a whole row group at once: pyarrow decodes one whole anyway, even for iter_batches, and
                # read_row_group does it faster (its columns in parallel)
                group = reader.read_row_group(piece.row_group, columns=columns, use_threads=THREADS)
                if group.num_rows < piece.offset + piece.rows:
                    raise DataError(f"{path}: shard of {shards.source} holds fewer rows than its footer says")
                chunks = _group_chunks(group.slice(piece.offset, piece.rows), piece.start, shard_row, chunk_rows,
                                       features, label, weight, split, part, center, scale, check, dtype, path)
                del group  # the generator holds the only reference: the row group is freed when it is done
                yield from chunks
                shard_row += piece.rows
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: shard of {shards.source} cannot be read: {first_line(err)}") from None


def _group_chunks(group: pa.Table, start, shard_row, chunk_rows, features, label, weight, split, part, center, scale,
                  check, dtype, path) -> Iterator[Chunk]:
    """The chunks of one row group (or the part of it a rank reads), ``start`` the global index of its first row."""
    for batch in group.to_batches(max_chunksize=chunk_rows):
        r = batch.num_rows
        index = np.arange(start, start + r, dtype=np.int64)
        keep = None if split is None else split.of(index) == part
        chunk = _chunk(batch, index, keep, features, label, weight, path, shard_row, check, center, scale, dtype)
        start, shard_row = start + r, shard_row + r
        if len(chunk.index):
            yield chunk


def _shard_row(shards: Shards, piece: Piece) -> int:
    before = sum(g.rows for g in shards.row_groups if g.path == piece.path and g.row_group < piece.row_group)
    return before + piece.offset


def _chunk(batch: pa.RecordBatch, index: np.ndarray, keep: Optional[np.ndarray], features, label, weight, path,
           shard_row, check, center, scale, dtype) -> Chunk:
    """One batch as a Chunk: checked (every row), turned into rows, cut to the kept rows, then standardised in
    ``dtype`` block by block."""
    arrays, columns = [], []
    for name in features:
        column = batch.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: column {name!r}, row {shard_row + row + 1}: missing value")
        if pa.types.is_boolean(column.type):  # the row-major export below takes numbers only
            column = column.cast(pa.float64())
        arrays.append(column)
        if check:
            columns.append(column.to_numpy())  # a view: numeric, no nulls
    labels = weights = None
    if label is not None:
        column = batch.column(label)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: column {label!r}, row {shard_row + row + 1}: missing label")
        labels = np.array(column.to_numpy(zero_copy_only=False))  # a copy: a view would keep the row group alive
    if weight is not None:
        weights = np.asarray(batch.column(weight).to_numpy(zero_copy_only=False), dtype=np.float64)
    if check:  # before the split is applied: a bad value is refused whichever split its row is in
        _check_values(columns, features, weights, weight, path, shard_row)
    # columns to rows in Arrow's C++ rather than numpy column assignments (benchmarks/README.md: the reader's
    # time), in the columns' common type
    T = np.asarray(pa.RecordBatch.from_arrays(arrays, names=list(features)).to_tensor(row_major=True))
    if keep is not None and not keep.all():
        T = T[keep]
        index, labels, weights = (None if a is None else a[keep] for a in (index, labels, weights))

    r, n = T.shape
    if center is None and T.dtype == dtype and T.flags.writeable:
        return Chunk(index, T, labels, weights, path)
    X = np.empty((r, n), dtype=dtype)
    if center is None:
        X[...] = T
        return Chunk(index, X, labels, weights, path)
    # in X's own dtype: a float32 model gets (x − mean)·(1/std) rounded once to float32, within an ulp or two
    # of the loaded table's float64 result cast to float32; float64 stays within an ulp of it
    center, inverse = center.astype(dtype), (1.0 / scale).astype(dtype)
    for lo in range(0, r, FILL_ROWS):  # block by block: the block stays in cache from one step to the next
        part = X[lo:lo + FILL_ROWS]
        np.subtract(T[lo:lo + FILL_ROWS], center, out=part)
        part *= inverse
    return Chunk(index, X, labels, weights, path)


def _check_values(columns, features, weights, weight, path, shard_row) -> None:
    for name, column in zip(features, columns):
        if column.dtype.kind != "f":  # integers and booleans are finite and far below MAX_ABS
            continue
        if column.dtype.itemsize < 8:  # every finite float32 is below MAX_ABS, which float32 cannot even hold
            bad = ~np.isfinite(column)
        else:
            bad = ~(np.abs(column) <= MAX_ABS)  # NaN compares False: caught with inf and the too large
        if bad.any():
            row = int(np.argmax(bad))
            value = float(column[row])
            what = (f"non-finite value {value}" if not np.isfinite(value) else
                    f"{value:g} is too large (|value| > {MAX_ABS:g} overflows the standardisation); rescale the "
                    "column")
            raise DataError(f"{path}: column {name!r}, row {shard_row + row + 1}: {what}")
    if weights is not None:
        bad = ~(weights >= 0) | ~np.isfinite(weights)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{path}: column {weight!r}, row {shard_row + row + 1}: weight {weights[row]} is not "
                            "a finite number >= 0")
