"""Which structures a dataset holds: the whole cache, a stored split, a stored subset, rows
given in memory, or the intersection of those.

A selection is one sorted array of global structure rows; everything local to a dataset
(sample indices, structure positions) derives from it through :meth:`Selection.table`.
It is small and picklable (the names, plus the in-memory rows if any); the arrays it
reads are memory-mapped where they are used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cache_tools import format as fmt


def subset_rows(root: str | os.PathLike, name: str, attrs: fmt.CacheAttrs | None = None) -> np.ndarray:
    """The stored rows of subset ``name`` (memory-mapped), or a CacheError naming the stored ones."""
    attrs = fmt.read_attrs(root) if attrs is None else attrs
    if name not in attrs.subsets:
        raise fmt.CacheError(f"{root}: no subset named {name!r} (available: "
                             f"{', '.join(attrs.subsets) or 'none; run `cache-tools subset`'})")
    return fmt.read_array(root, fmt.subset_array(name))


@dataclass(frozen=True)
class Selection:
    root: str
    split: str | None = None
    subset: str | None = None
    structures: np.ndarray | None = None  # sorted unique global rows kept in memory, or None
    split_code: int | None = None

    @classmethod
    def of(cls, root: str, attrs: fmt.CacheAttrs, split: str | None = None, subset: str | None = None,
           structures: Sequence[int] | np.ndarray | None = None) -> "Selection":
        """Check the names and rows against the cache (CacheError / IndexError naming them)."""
        rows = None
        if structures is not None:
            rows = np.unique(np.asarray(structures, dtype=np.int64))
            n_rows = len(fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE))
            if len(rows) and not (0 <= rows[0] and rows[-1] < n_rows):
                raise IndexError(f"structures: row {rows[0] if rows[0] < 0 else rows[-1]} out of range "
                                 f"for {n_rows} structures in {root}")
        code = None
        if split is not None:
            if split not in attrs.splits:
                raise fmt.CacheError(f"{root}: no split named {split!r} (available: "
                                     f"{', '.join(attrs.splits) or 'none; run `cache-tools split`'})")
            code = attrs.splits.index(split)
        if subset is not None:
            subset_rows(root, subset, attrs)  # raises CacheError naming the stored subsets
        return cls(root, split, subset, rows, code)

    @property
    def selective(self) -> bool:
        return self.split is not None or self.subset is not None or self.structures is not None

    def rows(self) -> np.ndarray:
        """The sorted int64 global rows of the structures selected."""
        n = len(fmt.read_array(self.root, fmt.STRUCTURE_ORIGIN_RANGE))
        rows = np.arange(n, dtype=np.int64) if self.structures is None else self.structures
        if self.split_code is not None:
            codes = fmt.read_array(self.root, fmt.STRUCTURE_SPLIT)
            rows = rows[codes[rows] == self.split_code]
        if self.subset is not None:
            rows = np.intersect1d(rows, subset_rows(self.root, self.subset), assume_unique=True)
        return rows

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(selected rows, first origin id of each, cumulative origin counts with a leading 0)."""
        rows = self.rows()
        ranges = fmt.read_array(self.root, fmt.STRUCTURE_ORIGIN_RANGE)[rows]
        cumulative = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(ranges[:, 1] - ranges[:, 0], out=cumulative[1:])
        return rows, np.ascontiguousarray(ranges[:, 0]), cumulative

    def describe(self) -> str:
        """The selection's name for messages: "split 'val'", "subset 'x'", both, or "the cache"."""
        parts = ([f"split {self.split!r}"] if self.split is not None else []) + \
                ([f"subset {self.subset!r}"] if self.subset is not None else []) + \
                (["the selected structures"] if self.structures is not None else [])
        return " and ".join(parts) or "the cache"
