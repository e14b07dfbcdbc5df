"""Pick image centres ("origins") in a structure.

Default rule (the neighbour-count rule): a heavy non-water atom is a candidate when
at least ``min_neighbors`` other heavy atoms lie within ``neighbor_radius_A`` of it,
which keeps buried and interface atoms and drops dangling surface ones. Candidates
are then thinned greedily, in a seeded random order, so that no two origins of a
structure are closer than ``min_spacing_A``, and capped at ``max_per_structure``.
The result is sorted by atom order, so consecutive origin ids are spatial neighbours
along the chain (good locality for block-shuffled reading).

The random order is seeded by (seed, the file's content hash): the same file gives
the same origins whatever else is in the build.
"""
from __future__ import annotations

import csv
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OriginRule:
    min_neighbors: int = 30
    neighbor_radius_A: float = 6.0
    min_spacing_A: float = 6.0
    max_per_structure: int = 1000
    seed: int = 0

    def to_attrs(self) -> dict:
        return {"rule": "neighbor-count", **asdict(self)}


def pick_origins(xyz: np.ndarray, rule: OriginRule, content_sha256: str) -> np.ndarray:
    """Return the selected origin centres, (k, 3) float64, possibly empty."""
    from scipy.spatial import cKDTree

    if len(xyz) == 0:
        return np.zeros((0, 3))
    tree = cKDTree(xyz)
    counts = tree.query_ball_point(xyz, rule.neighbor_radius_A, return_length=True) - 1
    candidates = np.flatnonzero(counts >= rule.min_neighbors)
    if len(candidates) == 0:
        return np.zeros((0, 3))
    rng = np.random.default_rng([rule.seed, zlib.crc32(content_sha256.encode())])
    order = candidates[rng.permutation(len(candidates))]
    chosen = _thin(xyz, order, rule.min_spacing_A, rule.max_per_structure)
    return xyz[np.sort(chosen)]  # the first-chosen are a random, well spread subset


def _thin(xyz: np.ndarray, order: np.ndarray, spacing: float, cap: int = 0) -> np.ndarray:
    """Greedy: walk ``order``, keep an atom unless a kept one is within ``spacing``; stop at
    ``cap`` kept (0: no cap). Neighbours are looked up for kept atoms only, so memory stays
    linear in the atoms (a list of all close pairs of a 200k-atom entry is ~300 MiB)."""
    if spacing <= 0:
        return order[:cap] if cap > 0 else order
    from scipy.spatial import cKDTree

    pts = xyz[order]
    tree = cKDTree(pts)
    blocked = np.zeros(len(order), bool)
    kept = []
    for i in range(len(order)):
        if blocked[i]:
            continue
        kept.append(i)
        if len(kept) == cap:
            break
        blocked[tree.query_ball_point(pts[i], spacing)] = True
    return order[np.asarray(kept, dtype=np.int64)]


@dataclass(frozen=True)
class Listed:
    """One structure's rows of ``--origins FILE``: its centres, and the split and assembly
    its rows name (None without that column); ``line`` is its first row's line number."""
    centers: np.ndarray        # (k, 3) float64, Å
    line: int
    split: str | None = None
    assembly: str | None = None


@dataclass(frozen=True)
class OriginsFile:
    """``--origins FILE`` parsed: rows grouped by structure id (lower-cased), in file order."""
    path: str
    structures: dict[str, Listed]
    has_split: bool = False
    has_assembly: bool = False

    def where(self, sid: str) -> str:
        """'origins.csv:12' of a structure's first row, for messages."""
        return f"{self.path}:{self.structures[sid].line}"


COLUMNS = ("structure_id", "x", "y", "z")
OPTIONAL_COLUMNS = ("split", "assembly")


def _columns(path, header: list[str]) -> dict[str, int] | None:
    """Column positions named by a header row, or None for today's positional 4 columns."""
    names = [h.strip().lower() for h in header]
    if len(names) == 4 and not set(names) & set(OPTIONAL_COLUMNS):
        return None  # any 4-column header (e.g. "id,x,y,z"): positional, as before names were read
    unknown = [h for h in names if h not in COLUMNS + OPTIONAL_COLUMNS]
    missing = [c for c in COLUMNS if c not in names]
    if unknown or missing or len(set(names)) != len(names):
        problem = (f"unknown column {unknown[0]!r}" if unknown else f"no column {missing[0]!r}" if missing
                   else "a column is named twice")
        raise ValueError(f"{path}:1: {problem} in the header (columns: {', '.join(COLUMNS)}, and optionally "
                         f"{' and '.join(OPTIONAL_COLUMNS)})")
    return {name: names.index(name) for name in names}


def read_origins_file(path: str | Path) -> OriginsFile:
    """Read ``--origins FILE``: CSV rows ``structure_id,x,y,z``, optionally with columns
    ``split`` and ``assembly`` named by a header row (a header row is always allowed).

    Raises ValueError naming the row: fields that are not numbers, an empty or malformed
    split or assembly value, or a structure whose rows disagree on its split or assembly.
    """
    from cache_tools.format import check_assembly, check_name

    by_structure: dict[str, dict] = {}
    columns: dict[str, int] | None = None
    width, first = 4, True
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or row[0].startswith("#"):
                continue
            header, first = first, False
            if header and len(row) >= 4 and not _numbers(row[1:4] if len(row) == 4 else row):
                columns = _columns(path, row)
                width = len(row)
                continue
            if len(row) != width:
                expected = "structure_id,x,y,z" if columns is None else ",".join(sorted(columns, key=columns.get))
                raise ValueError(f"{path}:{lineno}: expected {width} fields '{expected}', got {len(row)}")
            at = columns or dict(zip(COLUMNS, range(4)))
            coords = [row[at[c]] for c in ("x", "y", "z")]
            try:
                xyz = tuple(float(v) for v in coords)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: coordinates are not numbers: {coords}") from None
            if not all(np.isfinite(xyz)):
                raise ValueError(f"{path}:{lineno}: coordinates are not finite: {coords}")
            sid = row[at["structure_id"]].strip().lower()
            entry = by_structure.setdefault(sid, {"centers": [], "line": lineno})
            entry["centers"].append(xyz)
            for column, check in (("split", lambda v: check_name("split", v)), ("assembly", check_assembly)):
                if column not in at:
                    continue
                value = row[at[column]].strip()
                if not value:
                    raise ValueError(f"{path}:{lineno}: empty {column} value for structure {sid!r} "
                                     "(every row needs one)")
                try:
                    check(value)
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno}: {exc}") from None
                before = entry.setdefault(column, value)
                if before != value:
                    raise ValueError(f"{path}:{lineno}: structure {sid!r} has {column} {value!r} here but "
                                     f"{before!r} on line {entry['line']} (a structure has one {column})")
    return OriginsFile(str(path), {sid: Listed(np.asarray(e["centers"], dtype=np.float64), e["line"],
                                               e.get("split"), e.get("assembly"))
                                   for sid, e in by_structure.items()},
                       has_split=columns is not None and "split" in columns,
                       has_assembly=columns is not None and "assembly" in columns)


def _numbers(fields: list[str]) -> bool:
    """Whether any of ``fields`` is a number (a data row has three; a header row none)."""
    for f in fields:
        try:
            float(f)
            return True
        except ValueError:
            continue
    return False
