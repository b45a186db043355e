"""The memory budget: parsed from ``data.memory_budget``, and what it decides (load or stream, chunk size)."""

from __future__ import annotations

import os
import re

from neuron_torch.errors import DataError

DEFAULT_SHARE = 4  # the default budget is 1/DEFAULT_SHARE of physical memory: room for other processes
FALLBACK_BUDGET = 1 << 30  # where the physical memory cannot be read (no sysconf)

# A loaded table is alive about this many times at once, as float64, while it is prepared: the pandas frame
# read from the file, its float64 feature matrix, one split indexed out of it and that split standardised.
LOAD_COPIES = 4
# A streamed chunk is alive about this many times at once: the Arrow batch, its float64 block (standardised in
# place) and its copy in the model's dtype or device; and this many chunks are alive together: the one being
# computed on, the one waiting in the prefetch queue and the one being read.
CHUNK_COPIES, CHUNKS_ALIVE = 3, 3
CHUNK_SHARE = 0.5  # chunks may take this share of what the reader leaves of the budget; the rest is slack
# pyarrow decodes a whole row group at a time, whatever the batch size asked for: reading one holds up to this
# many times its uncompressed size (benchmarks/README.md, "Memory", has the figures)
READ_COPIES = 2
MAX_CHUNK_ROWS = 1 << 20  # larger chunks bring no speed; they only hold memory longer

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def default_memory_budget() -> int:
    """A quarter of the machine's physical memory, in bytes (1 GiB where that cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // DEFAULT_SHARE
    except (AttributeError, ValueError, OSError):  # no sysconf, or the names unknown on this system
        return FALLBACK_BUDGET


def parse_memory_budget(value: str | int | None) -> int:
    """Bytes of a budget given as an int or a string like ``"2GB"``, ``"512MiB"``, ``"1.5G"``.

    Decimal units (kB, MB, GB, TB) count powers of 1000; binary ones (KiB, MiB, GiB, TiB) and the bare letters
    K, M, G, T, as ``free`` and container limits use them, count powers of 1024. Case is ignored.

    Parameters
    ----------
    value : str, int or None
        None gives :func:`default_memory_budget`.

    Returns
    -------
    int
        Bytes, at least 1.

    Raises
    ------
    DataError
        One line naming ``data.memory_budget`` for anything else.
    """
    if value is None:
        return default_memory_budget()
    if isinstance(value, bool):  # bool is an int subclass; True bytes is surely a mistake
        raise DataError(f"data.memory_budget must be a size like 2GB or 512MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        unit = match and _UNITS.get(match.group(2).lower())
        if not unit:
            raise DataError(f"data.memory_budget must be a size like 2GB or 512MiB, got {value!r}")
        size = int(float(match.group(1)) * unit)
    if size < 1:
        raise DataError(f"data.memory_budget must be at least 1 byte, got {value!r}")
    return size


def table_bytes(rows: int, columns: int, itemsize: int = 8) -> int:
    """Bytes of a ``rows × columns`` matrix of ``itemsize``-byte values."""
    return rows * columns * itemsize


def fits_in_memory(rows: int, columns: int, budget: int, itemsize: int = 8) -> bool:
    """Whether a table can be loaded whole: its float64 matrix, times :data:`LOAD_COPIES`, within ``budget``."""
    return LOAD_COPIES * table_bytes(rows, columns, itemsize) <= budget


def read_reserve(largest_row_group_bytes: int) -> int:
    """Bytes the Parquet reader holds while it reads the largest row group (see :data:`READ_COPIES`)."""
    return READ_COPIES * largest_row_group_bytes


def chunk_rows(budget: int, columns: int, reserve: int = 0, itemsize: int = 8) -> int:
    """Rows per streamed chunk, so that the chunks alive at once stay within :data:`CHUNK_SHARE` of what the
    reader's ``reserve`` leaves of ``budget``.

    Parameters
    ----------
    budget : int
        Bytes.
    columns : int
        Columns read per row (features, label, weight).
    reserve : int
        Bytes the reader holds besides the chunks, :func:`read_reserve` of the largest row group.
    itemsize : int
        Bytes per value as computed on (8: chunks are float64 until placed).

    Returns
    -------
    int
        Between 1 and :data:`MAX_CHUNK_ROWS`.

    Raises
    ------
    DataError
        When the reserve alone takes the budget: the shards' row groups are too large to stream within it.
    """
    if reserve >= budget:
        raise DataError(f"data.memory_budget of {budget / 2**20:.1f} MiB is too small to read these shards: "
                        f"their largest row group needs about {reserve / 2**20:.1f} MiB while it is read; raise "
                        "the budget or write the shards with smaller row groups (pyarrow's row_group_size)")
    per_row = CHUNK_COPIES * CHUNKS_ALIVE * columns * itemsize
    return int(max(1, min(MAX_CHUNK_ROWS, CHUNK_SHARE * (budget - reserve) // per_row)))
