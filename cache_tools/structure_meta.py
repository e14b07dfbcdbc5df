"""Per-structure metadata columns (method, resolution, dates, models, polymers, chains) as the
expression grammar and ``ds.structure_meta(k)`` see them.

Every column is one memory-mapped array of the cache (``format.STRUCTURE_META_ARRAYS``
plus the core tables), so selecting over 200k structures is a few vectorized numpy
comparisons and no Python object exists per structure. A cache built before these
columns existed opens normally; asking for them raises a :class:`CacheError` that says
they are absent.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools import format as fmt

_EPOCH = dt.date(1970, 1, 1)

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


def days_to_date(days: int) -> dt.date | None:
    return None if days == fmt.DATE_MISSING else _EPOCH + dt.timedelta(days=int(days))


def date_to_days(text: str) -> int:
    """'YYYY-MM-DD' -> days since 1970-01-01 (ValueError names the bad date)."""
    try:
        return (dt.date.fromisoformat(text) - _EPOCH).days
    except ValueError:
        raise ValueError(f"{text!r} is not a date (expected YYYY-MM-DD)") from None


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
            "deposited": days_to_date(int(self.array(fmt.STRUCTURE_DEPOSITED)[k])),
            "released": days_to_date(int(self.array(fmt.STRUCTURE_RELEASED)[k])),
            "n_models": int(self.array(fmt.STRUCTURE_N_MODELS)[k]),
            "polymer": bits_to_names(int(self.array(fmt.STRUCTURE_POLYMER)[k]), fmt.POLYMERS),
            "n_chains": int(self.array(fmt.STRUCTURE_N_CHAINS)[k]),
        }


def distributions(root: str | os.PathLike) -> dict[str, Any] | None:
    """What `cache-tools info` shows: counts per method/polymer, ranges of the numbers and dates."""
    cols = StructureColumns(root)
    if not cols.present:
        return None
    out: dict[str, Any] = {}
    for column in ("method", "polymer"):
        bits = cols.values(column).astype(np.int64)
        out[column] = {name: int((bits >> i & 1).sum()) for i, name in enumerate(VOCABULARY[column])
                       if (bits >> i & 1).any()}
        out[column]["(none)"] = int((bits == 0).sum())
    res = cols.values("resolution")
    known = res[~np.isnan(res)]
    edges = [0, 1.5, 2.0, 2.5, 3.0, 4.0, np.inf]
    out["resolution_A"] = {
        "absent": int(np.isnan(res).sum()),
        **({"min": float(known.min()), "median": float(np.median(known)), "max": float(known.max())}
           if len(known) else {}),
        "histogram": {(f"<{hi:g}" if lo == 0 else f">={lo:g}" if hi == np.inf else f"{lo:g}-{hi:g}"):
                      int(((known >= lo) & (known < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])},
    }
    for column in ("deposited", "released"):
        days = cols.values(column)
        known = np.sort(days[days != fmt.DATE_MISSING])
        out[column] = {"absent": int(len(days) - len(known))}
        if len(known):
            out[column].update(first=str(days_to_date(known[0])), median=str(days_to_date(known[len(known) // 2])),
                               last=str(days_to_date(known[-1])))
    for column in ("models", "chains"):
        v = cols.values(column)
        out[column] = {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())} if len(v) else {}
    return out


def format_distributions(d: dict[str, Any] | None) -> list[str]:
    if d is None:
        return ["  metadata:   absent (built before structure metadata was recorded)"]
    def counts(c: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in c.items() if v or k != "(none)")
    res = d["resolution_A"]
    lines = [f"  method:     {counts(d['method'])}",
             f"  polymer:    {counts(d['polymer'])}",
             "  resolution: " + (f"min {res['min']:.2f}, median {res['median']:.2f}, max {res['max']:.2f} Å; "
                                 if "min" in res else "")
             + ", ".join(f"{k} {v}" for k, v in res["histogram"].items()) + f"; absent {res['absent']}"]
    for column in ("deposited", "released"):
        c = d[column]
        lines.append(f"  {column + ':':<11} " + (f"{c['first']} .. {c['last']} (median {c['median']}); "
                                                  if "first" in c else "") + f"absent {c['absent']}")
    for column in ("models", "chains"):
        c = d[column]
        if c:
            lines.append(f"  {column + ':':<11} min {c['min']}, median {c['median']:g}, max {c['max']}")
    return lines
