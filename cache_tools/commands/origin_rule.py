"""The rule form of `cache-tools origins`: origins picked from a lattice cache's stored voxels,
with no parsing and no voxelizing.

The build's rule counts heavy atoms within ``neighbor_radius_A`` of each atom. A lattice cache
no longer has the atoms, but it has their mass: FractionAtom spreads each atom over the voxels
its sphere overlaps, one unit in all (all channels together), so the voxel values summed over
a ball count the atoms whose mass lies in it. The rule, per structure (copy 0 of its lattice):

- candidates: the lattice points a build of this grid can centre an image on (voxel centres
  for an odd grid, voxel corners for an even one) whose own voxel (for an even grid, the voxel
  above the corner) holds mass;
- the mass of a point: the sum of the dequantized values (all channels) of the voxels whose
  centres lie within ``neighbor_radius_A`` of it, minus 1: the atom the point sits on, as the
  build leaves each atom out of its own count; a candidate is kept when that is at least
  ``min_neighbors``;
- the kept points are thinned greedily, in an order seeded by ``seed`` and the structure's
  source hash (as the build's), so that none is within ``min_spacing_A`` of another, capped at
  ``max_per_structure``, and sorted (x, then y, then z).

It counts mass, not atoms: an atom near the ball's surface counts by the part of its mass in
voxels whose centres are inside, so the count is off by the fraction of a few atoms; the
README ("Origin sets") measures how close the result comes to the build's own origins.

Memory stays bounded whatever the structure's size: the lattice is read in cubes of
``CUBE_VOXELS`` per side plus a margin of the radius (:meth:`LatticeReader.read`), and only the
cubes that hold stored blocks are read.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from cache_tools import format as fmt
from cache_tools.read.lattice import LatticeReader

CUBE_VOXELS = 64  # interior of one cube read at a time (a multiple of every block edge the build uses)


@dataclass(frozen=True)
class MassRule:
    min_neighbors: int = 30
    neighbor_radius_A: float = 6.0
    min_spacing_A: float = 6.0
    max_per_structure: int = 1000
    seed: int = 0

    def to_record(self) -> dict:
        return asdict(self)


def ball_runs(radius_A: float, resolution_A: float, shift: float) -> tuple[int, list[tuple[int, int, int, int]]]:
    """The voxels whose centres lie within ``radius_A`` of a lattice point, as z-runs: (margin H,
    [(ex, ey, ez_lo, ez_hi)]), offsets e of voxel ``k + e`` from the point's own voxel ``k``;
    the point sits ``shift`` voxels above its voxel's low corner (1/2 odd grid, 0 even)."""
    r = radius_A / resolution_A
    margin = int(math.ceil(r)) + 1
    span = np.arange(-margin, margin + 1)
    d = span + 0.5 - shift  # offset of voxel k+e's centre from the point, in voxels
    runs = []
    for ex, dx in zip(span.tolist(), d.tolist()):
        for ey, dy in zip(span.tolist(), d.tolist()):
            inside = span[dx * dx + dy * dy + d * d <= r * r + 1e-9]
            if len(inside):
                runs.append((ex, ey, int(inside[0]), int(inside[-1])))
    return margin, runs


def ball_sums(mass: np.ndarray, points: np.ndarray, runs: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Sum of ``mass`` over the ball around each of ``points`` (indices into ``mass``, at least the
    ball's margin in from every side): prefix sums along z, then per (x, y) run of the ball one
    difference of two gathered prefix sums; exact in int64 (float64 for float caches)."""
    nx, ny, nz = mass.shape
    prefix = np.zeros((nx, ny, nz + 1), mass.dtype)
    np.cumsum(mass, axis=2, out=prefix[:, :, 1:])
    flat = prefix.ravel()
    base = (points[:, 0] * ny + points[:, 1]) * (nz + 1) + points[:, 2]
    out = np.zeros(len(points), mass.dtype)
    for ex, ey, lo, hi in runs:
        shift = (ex * ny + ey) * (nz + 1)
        out += flat[base + (shift + hi + 1)]
        out -= flat[base + (shift + lo)]
    return out


class MassCounter:
    """Reads one lattice cache's structures cube by cube and finds the points that pass the count."""

    def __init__(self, root: str, attrs: fmt.CacheAttrs, rule: MassRule, reader: LatticeReader | None = None,
                 cube_voxels: int = CUBE_VOXELS):
        self.root, self.rule, self.cube_voxels = root, rule, cube_voxels
        self.reader = reader or LatticeReader(root, threads=1)  # one thread per structure (threads=None imports torch)
        self.resolution = float(attrs.params.image.resolution_A)
        self.shift = fmt.lattice_point_offset(attrs.params.image.grid_voxels)
        self.scale = float(attrs.scale)
        self.copies = int(attrs.params.rotations)
        self.margin, self.runs = ball_runs(rule.neighbor_radius_A, self.resolution, self.shift)
        self.grid = fmt.read_array(root, fmt.LATTICE_GRID).astype(np.int64)
        self.map_start = fmt.read_array(root, fmt.LATTICE_MAP_START)
        self.block_map = fmt.read_array(root, fmt.LATTICE_MAP)
        self.edge = self.reader.edge
        self.integer = self.reader.dtype.kind in "ui"  # uint8: exact integer sums, scaled at the end

    def points(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(lattice points (k, 3) int64 in voxel indices, their mass counts) of structure ``row``
        that pass the rule's count, sorted (x, y, z)."""
        lattice = row * self.copies  # copy 0: the structure in its own frame
        corner, dims = self.grid[lattice, :3], self.grid[lattice, 3:]
        cells = self.block_map[self.map_start[lattice]:self.map_start[lattice + 1]].reshape(*dims.tolist())
        step = max(1, self.cube_voxels // self.edge)  # blocks per cube side
        found, counts = [], []
        for bx in range(0, dims[0], step):
            for by in range(0, dims[1], step):
                for bz in range(0, dims[2], step):
                    if not (cells[bx:bx + step, by:by + step, bz:bz + step] >= 0).any():
                        continue
                    lo = corner + self.edge * np.array([bx, by, bz])
                    side = self.edge * np.minimum(step, dims - [bx, by, bz])
                    k, c = self._cube(lattice, lo, side)
                    found.append(k)
                    counts.append(c)
        if not found:
            return np.zeros((0, 3), np.int64), np.zeros(0)
        points, values = np.concatenate(found), np.concatenate(counts)
        order = np.lexsort(points.T[::-1])
        return points[order], values[order]

    def _cube(self, lattice: int, lo: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points of the cube [lo, lo + side) passing the count: read with a margin, summed over channels."""
        h = self.margin
        n = int(side.max()) + 2 * h
        view = np.empty((1, n, n, n, self.reader.n_channels), self.reader.dtype)
        self.reader.read(np.array([lattice]), (lo - h)[None], n, view)
        mass = view[0, ..., 0].astype(np.int64 if self.integer else np.float64)
        for c in range(1, view.shape[-1]):  # channel by channel: 3x faster than a sum over the short last axis
            mass += view[0, ..., c]
        sx, sy, sz = side.tolist()
        own = np.argwhere(mass[h:h + sx, h:h + sy, h:h + sz] > 0)  # candidates: their own voxel holds mass
        if not len(own):
            return np.zeros((0, 3), np.int64), np.zeros(0)
        count = ball_sums(mass, own + h, self.runs) * self.scale - 1.0  # its own atom left out, as the build's
        keep = count >= self.rule.min_neighbors
        return own[keep] + lo, count[keep]

    def centers_A(self, points: np.ndarray) -> np.ndarray:
        """Centres (Å, float64) of lattice points (voxel indices)."""
        return (points + self.shift) * self.resolution


def thin(points_A: np.ndarray, order: np.ndarray, spacing: float, cap: int) -> np.ndarray:
    """Greedy, as the build's: walk ``order``, keep a point unless a kept one is within ``spacing``;
    stop at ``cap`` kept (0: no cap). Returns the kept indices in the order kept."""
    if spacing <= 0:
        return order[:cap] if cap > 0 else order
    from scipy.spatial import cKDTree

    pts = points_A[order]
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


def pick(counter: MassCounter, row: int, sha256: bytes) -> tuple[np.ndarray, int]:
    """(centres (k, 3) float64 Å sorted (x, y, z), candidates that passed the count) of one structure."""
    points, _ = counter.points(row)
    if len(points) == 0:
        return np.zeros((0, 3)), 0
    rule = counter.rule
    rng = np.random.default_rng([rule.seed, zlib.crc32(sha256.hex().encode())])  # as pipeline/origins.py seeds
    centers = counter.centers_A(points)
    kept = np.sort(thin(centers, rng.permutation(len(points)), rule.min_spacing_A, rule.max_per_structure))
    return centers[kept], len(points)  # points are sorted (x, y, z), so sorted indices keep that order
