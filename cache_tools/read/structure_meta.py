"""Per-structure metadata columns (method, resolution, dates, models, polymers, chains) as the
expression grammar and ``ds.structure_meta(k)`` see them.

Every column is one memory-mapped array of the cache (``format.STRUCTURE_META_ARRAYS``
plus the core tables), so selecting over 200k structures is a few vectorized numpy
comparisons and no Python object exists per structure. A cache built before these
columns existed opens normally; asking for them raises a :class:`CacheError` that says
they are absent.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools import format as fmt

# expression column -> (kind, array name or derived source, one-line meaning)
COLUMNS: dict[str, tuple[str, str, str]] = {
    "method": ("set", fmt.STRUCTURE_METHOD, "experimental method, e.g. 'X-RAY DIFFRACTION' (== means includes)"),
    "resolution": ("float", fmt.STRUCTURE_RESOLUTION, "best refinement/reconstruction resolution in Å"),
    "deposited": ("date", fmt.STRUCTURE_DEPOSITED, "initial deposition date, YYYY-MM-DD"),
    "released": ("date", fmt.STRUCTURE_RELEASED, "first release date, YYYY-MM-DD"),
    "models": ("int", fmt.STRUCTURE_N_MODELS, "number of models in the file"),
    "polymer": ("set", fmt.STRUCTURE_POLYMER, "polymer type present: 'protein', 'DNA' or 'RNA'"),
    "chains": ("int", fmt.STRUCTURE_N_CHAINS, "chains in the first model"),
    "atoms": ("int", fmt.STRUCTURE_ATOM_COUNT, "heavy atoms voxelized"),
    "origins": ("int", fmt.STRUCTURE_ORIGIN_RANGE, "origins (images) stored for the structure"),
    "id": ("str", fmt.STRUCTURE_ID, "structure id (from the file name)"),
}
VOCABULARY = {"method": fmt.METHODS, "polymer": fmt.POLYMERS}


def has_structure_meta(root: str | os.PathLike) -> bool:
    """True when the cache records structure metadata (built after it was added)."""
    return all(Path(root, name, "zarr.json").exists() for name in fmt.STRUCTURE_META_ARRAYS)


def bits_to_names(bits: int, vocabulary: tuple[str, ...]) -> list[str]:
    return [name for i, name in enumerate(vocabulary) if bits >> i & 1]


class StructureColumns:
    """Lazily memory-mapped columns of one cache; values are numpy arrays over all structures."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.present = has_structure_meta(root)
        self._arrays: dict[str, np.ndarray] = {}
        self._ids: list[str] | None = None

    def _absent(self) -> fmt.CacheError:
        return fmt.CacheError(f"{self.root}: no structure metadata (the cache was built before method, "
                              "resolution and dates were recorded; rebuild it to use them)")

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            if name in fmt.STRUCTURE_META_ARRAYS and not self.present:
                raise self._absent()
            self._arrays[name] = fmt.read_array(self.root, name)
        return self._arrays[name]

    def values(self, column: str) -> np.ndarray | list[str]:
        """The column's raw values over all structures (bits, floats, days, counts; ids as str)."""
        kind, source, _ = COLUMNS[column]
        if column == "origins":
            ranges = self.array(source)
            return ranges[:, 1] - ranges[:, 0]
        if column == "id":
            if self._ids is None:
                blob, offsets = fmt.read_ragged_strings(self.root, fmt.STRUCTURE_ID)
                self._ids = [fmt.ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]
            return self._ids
        return self.array(source)

    def row(self, k: int) -> dict[str, Any]:
        """Decoded metadata of global structure row ``k``: lists of names, float, dates or None."""
        if not self.present:
            raise self._absent()
        res = float(self.array(fmt.STRUCTURE_RESOLUTION)[k])
        return {
            "method": bits_to_names(int(self.array(fmt.STRUCTURE_METHOD)[k]), fmt.METHODS),
            "resolution_A": res,
            "deposited": fmt.days_to_date(int(self.array(fmt.STRUCTURE_DEPOSITED)[k])),
            "released": fmt.days_to_date(int(self.array(fmt.STRUCTURE_RELEASED)[k])),
            "n_models": int(self.array(fmt.STRUCTURE_N_MODELS)[k]),
            "polymer": bits_to_names(int(self.array(fmt.STRUCTURE_POLYMER)[k]), fmt.POLYMERS),
            "n_chains": int(self.array(fmt.STRUCTURE_N_CHAINS)[k]),
        }
