"""Which structures a dataset holds: the whole cache, a stored split, a stored subset, rows
given in memory, or the intersection of those; and which origins: the build's, or a stored
origin set (``cache-tools origins``, lattice caches only).

A selection is one sorted array of global structure rows; everything local to a dataset
(sample indices, structure positions) derives from it through :meth:`Selection.table`.
With an origin set, origin ids index the set, the structures it has no origin in drop out,
and each structure's origins are its range in the set.
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


def split_counts(root: str | os.PathLike, attrs: fmt.CacheAttrs | None = None) -> dict[str, int]:
    """Structures in each stored split ({} when the cache has none): `cache-tools split` always
    names train, val and test, so a name alone does not say a split holds anything."""
    attrs = fmt.read_attrs(root) if attrs is None else attrs
    if not attrs.splits:
        return {}
    counts = np.bincount(fmt.read_array(root, fmt.STRUCTURE_SPLIT), minlength=len(attrs.splits))
    return {name: int(counts[k]) for k, name in enumerate(attrs.splits)}


def origin_set_array(root: str | os.PathLike, name: str, part: str, attrs: fmt.CacheAttrs | None = None) -> np.ndarray:
    """One array of origin set ``name`` (memory-mapped), or a CacheError naming the stored sets."""
    attrs = fmt.read_attrs(root) if attrs is None else attrs
    if name not in attrs.origin_sets:
        raise fmt.CacheError(f"{root}: no origin set named {name!r} (available: "
                             f"{', '.join(attrs.origin_sets) or 'none; run `cache-tools origins`'})")
    return fmt.read_array(root, fmt.origin_set_array(name, part))


def origin_arrays(root: str | os.PathLike, origins: str | None) -> tuple[str, str, str]:
    """(centres, structure index, per-structure origin ranges) array names of the build's origins
    (``origins=None``) or of origin set ``origins``."""
    if origins is None:
        return fmt.CENTER, fmt.STRUCTURE_INDEX, fmt.STRUCTURE_ORIGIN_RANGE
    return tuple(fmt.origin_set_array(origins, part) for part in fmt.ORIGIN_SET_PARTS)


def check_origin_set(root: str | os.PathLike, attrs: fmt.CacheAttrs, name: str) -> None:
    """CacheError unless origin set ``name`` can be used here: a lattice cache (views are cut at
    training time, anywhere) that holds a set of that name, with arrays of consistent shapes."""
    if attrs.params.lattice is None:
        raise fmt.CacheError(f"{root}: origins={name!r}: origin sets need views cut at training time, and this "
                             f"cache stores one {attrs.params.image.grid_voxels}³ image per origin (views cannot "
                             "be cut there); build it with `pipeline build-cache --layout lattice`")
    centers = origin_set_array(root, name, fmt.ORIGIN_SET_CENTER, attrs)
    index = fmt.read_array(root, fmt.origin_set_array(name, fmt.ORIGIN_SET_STRUCTURE_INDEX))
    ranges = fmt.read_array(root, fmt.origin_set_array(name, fmt.ORIGIN_SET_RANGE))
    n_rows = len(fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE))
    if centers.shape != (len(index), 3) or ranges.shape != (n_rows, 2) or \
            (n_rows and (ranges[0, 0] != 0 or ranges[-1, 1] != len(index))):
        raise fmt.CacheError(f"{root}: origin set {name!r} is damaged (its arrays disagree: {len(centers)} centres, "
                             f"{len(index)} structure indices, ranges {ranges.shape}); run cache-tools check")


@dataclass(frozen=True)
class Selection:
    root: str
    split: str | None = None
    subset: str | None = None
    structures: np.ndarray | None = None  # sorted unique global rows kept in memory, or None
    split_code: int | None = None
    origins: str | None = None            # an origin set's name, or None: the build's origins

    @classmethod
    def of(cls, root: str, attrs: fmt.CacheAttrs, split: str | None = None, subset: str | None = None,
           structures: Sequence[int] | np.ndarray | None = None, origins: str | None = None) -> "Selection":
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
        if origins is not None:
            check_origin_set(root, attrs, origins)  # CacheError naming the stored sets
        return cls(root, split, subset, rows, code, origins)

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
        if self.origins is not None:  # structures the set has no origin in hold no sample
            ranges = self.origin_ranges()[rows]
            rows = rows[ranges[:, 1] > ranges[:, 0]]
        return rows

    def origin_ranges(self) -> np.ndarray:
        """(M, 2) [start, stop) origin ids of every structure: the build's, or the origin set's."""
        return fmt.read_array(self.root, origin_arrays(self.root, self.origins)[2])

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(selected rows, first origin id of each, cumulative origin counts with a leading 0)."""
        rows = self.rows()
        ranges = self.origin_ranges()[rows]
        cumulative = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(ranges[:, 1] - ranges[:, 0], out=cumulative[1:])
        return rows, np.ascontiguousarray(ranges[:, 0]), cumulative

    def describe(self) -> str:
        """The selection's name for messages: "split 'val'", "subset 'x'", both, or "the cache"."""
        parts = ([f"split {self.split!r}"] if self.split is not None else []) + \
                ([f"subset {self.subset!r}"] if self.subset is not None else []) + \
                (["the selected structures"] if self.structures is not None else [])
        where = " and ".join(parts) or "the cache"
        return where if self.origins is None else f"{where} (origin set {self.origins!r})"
