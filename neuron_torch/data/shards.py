"""A table stored as Parquet shards: which files, their schema and row groups, read from the files' footers.

``data.path`` may name one Parquet file, a folder of them or a glob; the shards are taken in sorted path order,
so a row's *global index* (its position counting through the shards in that order) is the same on every run and
every rank. Everything here reads metadata only; the rows themselves are read by :mod:`neuron_torch.data.chunks`.
Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neuron_torch.errors import DataError, first_line
from neuron_torch.data.tables import PARQUET, listing


@dataclass(frozen=True)
class Piece:
    """Consecutive rows of one row group: rows ``offset .. offset + rows`` of group ``row_group`` of ``path``."""

    path: str
    row_group: int
    offset: int  # first row within the row group
    rows: int
    start: int  # global index of the first row
    group_bytes: int = 0  # the whole row group's size uncompressed (all columns), from the footer


@dataclass(frozen=True)
class Shards:
    """The shards of one table, as their footers describe them (no row is read).

    Attributes
    ----------
    source : str
        ``data.path`` as the user gave it, for messages.
    paths : tuple of str
        The shard files in sorted order: the order of the global row index.
    schema : pyarrow.Schema
        The columns every shard has (checked equal across shards by :func:`open_shards`).
    row_groups : tuple of Piece
        Every non-empty row group, whole, in global order.
    stamps : dict of str to (int, int)
        Each shard's size and modification time when opened: a shard replaced during a run is noticed.
    """

    source: str
    paths: tuple[str, ...]
    schema: pa.Schema
    row_groups: tuple[Piece, ...]
    stamps: dict

    @property
    def rows(self) -> int:
        """Total rows over all shards."""
        last = self.row_groups[-1]
        return last.start + last.rows

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def largest_row_group_bytes(self) -> int:
        """Uncompressed bytes of the largest row group: Parquet readers hold a row group's pages while reading it."""
        return max(group.group_bytes for group in self.row_groups)

    def pieces(self, lo: int = 0, hi: int | None = None) -> list[Piece]:
        """The parts of row groups that hold global rows ``lo .. hi`` (all rows by default), in order."""
        hi = self.rows if hi is None else hi
        out = []
        for group in self.row_groups:
            first, last = max(lo, group.start), min(hi, group.start + group.rows)
            if first < last:
                out.append(Piece(group.path, group.row_group, group.offset + first - group.start, last - first,
                                 first, group.group_bytes))
        return out

    def stamp_of(self, path: str) -> tuple[int, int]:
        """``(size, mtime_ns)`` of ``path`` now, to compare with :attr:`stamps` (DataError if it is gone)."""
        try:
            status = os.stat(path)
        except OSError as err:
            raise DataError(f"{path}: shard of {self.source} cannot be read any more: {first_line(err)}") from None
        return status.st_size, status.st_mtime_ns


def resolve_paths(path: str) -> list[str]:
    """The Parquet files ``path`` names, sorted: the file itself, the ``.parquet``/``.pq`` files of a folder
    (not its subfolders), or the files a glob matches (``**`` reaches into subfolders).

    Raises
    ------
    DataError
        Nothing there, an empty folder, a glob that matches no file.
    """
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{path}: no file matches")
        return files
    target = Path(path)
    if target.is_dir():
        files = sorted(str(p) for p in target.iterdir() if p.suffix.lower() in PARQUET and p.is_file())
        if not files:
            raise DataError(f"{path}: the folder holds no .parquet or .pq file")
        return files
    if not target.exists():
        raise DataError(f"{path}: file not found")
    return [path]


def open_shards(path: str) -> Shards:
    """Resolve ``path``, read every shard's footer and check that all shards share one schema.

    Parameters
    ----------
    path : str
        A Parquet file, a folder of Parquet files or a glob.

    Returns
    -------
    Shards

    Raises
    ------
    DataError
        One line naming the shard (and the column, where one is at fault): unreadable footer, repeated column
        name, a column missing from a shard or added in it, a column whose type differs from the first shard's,
        no rows at all.
    """
    paths = resolve_paths(path)
    schema, groups, stamps, start = None, [], {}, 0
    for shard in paths:
        try:
            status = os.stat(shard)
            stamps[shard] = status.st_size, status.st_mtime_ns
            meta = pq.read_metadata(shard)
            shard_schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{shard}: cannot be read as parquet: {first_line(err)}") from None
        _refuse_repeated(shard_schema, shard)
        if schema is None:
            schema = shard_schema
        else:
            _check_same_schema(schema, paths[0], shard_schema, shard)
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            rows = group.num_rows
            if rows:
                groups.append(Piece(shard, i, 0, rows, start, group.total_byte_size))
                start += rows
    if not groups:
        raise DataError(f"{path}: the shards hold no rows ({len(paths)} file{'s' if len(paths) != 1 else ''})")
    return Shards(path, tuple(paths), schema, tuple(groups), stamps)


def check_columns(shards: Shards, features: list[str], others: list[str]) -> None:
    """Check that the shards hold ``features`` as numeric columns and every name of ``others`` (label, weight).

    Raises
    ------
    DataError
        Naming the first shard and the column: missing, or a feature whose type is not a number or a boolean.
    """
    first = shards.paths[0]
    for name in [*features, *others]:
        if name not in shards.schema.names:
            raise DataError(f"{first}: no column {name!r} (columns: {listing(shards.columns)})")
    for name in features:
        kind = shards.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise DataError(f"{first}: column {name!r} holds {kind}, not numbers; a feature must be numeric")


def rank_rows(total: int, rank: int, world: int) -> tuple[int, int]:
    """The global rows ``lo .. hi`` a data-parallel rank owns: contiguous, sizes within one row of each other.

    Contiguous ranges (not whole row groups) keep the ranks balanced however uneven the row groups are; a
    row group cut by a boundary is read in part by each of its two ranks. Every row belongs to exactly one rank.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0 .. {world - 1}, got {rank}")
    return total * rank // world, total * (rank + 1) // world


def rank_pieces(shards: Shards, rank: int, world: int) -> list[Piece]:
    """The pieces of row groups rank ``rank`` of ``world`` streams (see :func:`rank_rows`)."""
    return shards.pieces(*rank_rows(shards.rows, rank, world))


def _refuse_repeated(schema: pa.Schema, shard: str) -> None:
    seen = set()
    for name in schema.names:
        if name in seen:
            raise DataError(f"{shard}: column name {name!r} appears more than once; column names must be unique")
        seen.add(name)


def _check_same_schema(schema: pa.Schema, first: str, other: pa.Schema, shard: str) -> None:
    """Column names and types equal, in any order (columns are read by name)."""
    for field in schema:
        if field.name not in other.names:
            raise DataError(f"{shard}: no column {field.name!r}, which {first} has; every shard needs the same "
                            "columns")
        kind = other.field(field.name).type
        if kind != field.type:
            raise DataError(f"{shard}: column {field.name!r} holds {kind}, but {field.type} in {first}; every "
                            "shard needs the same column types")
    extra = [name for name in other.names if name not in schema.names]
    if extra:
        raise DataError(f"{shard}: column {extra[0]!r} is not in {first}; every shard needs the same columns")
