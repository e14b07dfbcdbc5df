"""Structures of a dataset's selection: local positions, global rows, ids, origins, metadata.

A mixin of :class:`~cache_tools.read.dataset.VoxelCacheDataset` (kept apart: it is about the
structures table, not about reading images). The host provides ``root``, ``selection``,
``_n_structures``, ``_table()`` (selected rows, their first origins, cumulative origin
counts) and ``_local()`` (its per-process state with ``meta`` and ``ids`` slots).
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np

from cache_tools import format as fmt


class StructureNavigation:
    """Local structure positions (what a dataset takes) and global rows (what samples return)."""

    @property
    def n_structures(self) -> int:
        """Structures in this dataset (its split), not in the whole cache."""
        return self._n_structures

    def _structure(self, k: int) -> int:
        """Local structure position ``k`` (negative counts from the end), checked."""
        k = operator.index(k)
        if not -self._n_structures <= k < self._n_structures:
            raise IndexError(f"structure {k} out of range for {self._n_structures} structures"
                             + (f" in {self.selection.describe()}" if self.selection.selective else ""))
        return k % self._n_structures

    def structure_row(self, k: int) -> int:
        """Global structures-table row (the ``structure_index`` of its samples) of local structure ``k``."""
        return int(self._table()[0][self._structure(k)])

    def local_structure(self, row: int) -> int:
        """Local position of global structure ``row`` (a sample's ``structure_index``); ValueError if absent."""
        row = operator.index(row)
        rows = self._table()[0]
        k = int(np.searchsorted(rows, row))
        if k == len(rows) or rows[k] != row:
            raise ValueError(f"structure row {row} is not in {self.selection.describe()}")
        return k

    def origins_of_structure(self, k: int) -> range:
        """Local sample indices of local structure ``k`` (contiguous): ``ds[i] for i in range``."""
        k = self._structure(k)
        cumulative = self._table()[2]
        return range(int(cumulative[k]), int(cumulative[k + 1]))

    def structure_meta(self, k: int) -> dict[str, Any]:
        """Metadata of local structure ``k`` recorded at build time: ``method`` and ``polymer``
        (lists of names), ``resolution_A`` (NaN if absent), ``deposited``/``released``
        (``datetime.date`` or None), ``n_models``, ``n_chains``. CacheError on a cache built
        before they were recorded."""
        row = self.structure_row(k)
        state = self._local()
        if state.meta is None:
            from cache_tools.read.structure_meta import StructureColumns
            state.meta = StructureColumns(self.root)
        return state.meta.row(row)

    def structure_id(self, k: int) -> str:
        """The id of local structure ``k`` (from its file name, e.g. '1abc')."""
        blob, offsets = self._strings()
        return fmt.ragged_item(blob, offsets, self.structure_row(k))

    def _strings(self) -> tuple[np.ndarray, np.ndarray]:
        state = self._local()
        if state.ids is None:
            state.ids = fmt.read_ragged_strings(self.root, fmt.STRUCTURE_ID)
        return state.ids
