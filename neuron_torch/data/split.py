"""Which split a row belongs to, decided from its global index and the seed alone.

A row's split is a pure function of ``(global index, seed)``, so it is the same whether the table is loaded or
streamed, whichever chunk or rank the row is read in, and in whatever order. The function is a counter-based
hash (splitmix64, Steele, Lea & Flood 2014, the seeding generator of Java's ``SplittableRandom``) mapped to
[0, 1) and compared with the fractions: the split's sizes are binomial around ``m·fraction``, not exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2
PARTS = {"train": TRAIN, "val": VAL, "test": TEST}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment, 2^64 / φ
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BLOCK = 1 << 20  # indices hashed per block when counting, 8 MB of uint64 at a time


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (uint64 in, uint64 out)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform_of(index: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) for each global row index, fixed by the index and the seed.

    Parameters
    ----------
    index : ndarray of int, shape (r,)
        Global row indices (>= 0).
    seed : int

    Returns
    -------
    ndarray of float64, shape (r,)
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64 by design
        # the seed is hashed first: seeds s and s + 1 then start unrelated streams instead of shifted ones
        key = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) * _GOLDEN + _GOLDEN)
        z = _mix(key + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # the top 53 bits: every double in [0, 1)


def split_of(index: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """The split of each row: 0 train, 1 validation, 2 test.

    Parameters
    ----------
    index : ndarray of int, shape (r,)
        Global row indices.
    seed : int
    val_fraction, test_fraction : float
        Expected shares of validation and test rows; 0 gives none at all.

    Returns
    -------
    ndarray of int8, shape (r,)
    """
    u = uniform_of(index, seed)
    part = np.full(u.shape, TRAIN, dtype=np.int8)
    part[u < val_fraction + test_fraction] = TEST
    part[u < val_fraction] = VAL  # u < 0 never holds: a fraction of 0 leaves the part empty
    return part


@dataclass(frozen=True)
class Split:
    """The seed and fractions of a train / validation / test split (see :func:`split_of`)."""

    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self):
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1: nothing is left to train on")

    def of(self, index: np.ndarray) -> np.ndarray:
        """The part (0, 1, 2) of each global index, shape (r,) int8."""
        return split_of(index, self.seed, self.val_fraction, self.test_fraction)

    def counts(self, rows: int, lo: int = 0) -> dict[str, int]:
        """Rows of each part among global indices ``lo .. lo + rows``, hashed in blocks (no data is read)."""
        totals = np.zeros(3, dtype=np.int64)
        for start in range(lo, lo + rows, _BLOCK):
            totals += np.bincount(self.of(np.arange(start, min(start + _BLOCK, lo + rows))), minlength=3)
        return {name: int(totals[part]) for name, part in PARTS.items()}
