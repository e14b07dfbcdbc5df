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


def read_origins_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``--origins FILE``: CSV rows ``structure_id,x,y,z`` (a header row is allowed)."""
    by_structure: dict[str, list[tuple[float, float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                raise ValueError(f"{path}:{lineno}: expected 'structure_id,x,y,z', got {len(row)} fields")
            try:
                xyz = (float(row[1]), float(row[2]), float(row[3]))
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise ValueError(f"{path}:{lineno}: coordinates are not numbers: {row[1:]}") from None
            if not all(np.isfinite(xyz)):
                raise ValueError(f"{path}:{lineno}: coordinates are not finite: {row[1:]}")
            by_structure.setdefault(row[0].strip().lower(), []).append(xyz)
    return {k: np.asarray(v, dtype=np.float64) for k, v in by_structure.items()}
