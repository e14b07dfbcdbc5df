"""Views chosen at training time on a lattice cache: where each sample's view sits.

A sample of origin ``o`` (centre ``c``, structure ``s``) draws, reproducibly from (seed, epoch,
index): a lattice copy ``r`` of its structure (``--rotations K``: copy r holds the atoms turned
by ``R[s, r]`` about ``g[s]``, in the frame ``format.lattice.copy_frame`` defines), a whole-voxel jitter in ``[-J, J]`` per axis and a cube rotation.
Its view is the ``N``-voxel cube of copy r whose centre is nearest to ``R (c - g) + g``, shifted by
the jitter; ``center_A`` reports where that view's centre is in the structure's own frame
(``R^T (centre - g) + g``), so a view whose size has the other parity than the build's grid sits
half a voxel off the origin's centre and says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_tools import format as fmt
from cache_tools.read.rotations import N_CUBE_ROTATIONS

MAX_VIEW_VOXELS = 256

_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """splitmix64 over a few integers: a cheap, reproducible per-sample random number."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h



def mix_array(*values) -> np.ndarray:
    """splitmix64 over integers and integer arrays: a reproducible random number per element
    (the same numbers as ``mix`` for scalars)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for v in values:
            v = np.asarray(v).astype(np.int64).view(np.uint64) if np.ndim(v) else np.uint64(int(v) & (2**64 - 1))
            h = (h ^ v) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(29))
    return h


def check_view_options(grid_voxels: int, jitter_voxels: int, where: str) -> None:
    """One line naming the option when a view size or jitter makes no sense."""
    for name, value, low in (("grid_voxels", grid_voxels, 1), ("jitter_voxels", jitter_voxels, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    if grid_voxels > MAX_VIEW_VOXELS:
        raise ValueError(f"{where}: grid_voxels {grid_voxels} is more than {MAX_VIEW_VOXELS} voxels per side "
                         f"({4 * grid_voxels ** 3 / 2**20:.0f} MiB per channel of float32): not a training view")
    if jitter_voxels > 4 * grid_voxels:
        raise ValueError(f"{where}: jitter_voxels {jitter_voxels} moves a view by more than 4 of its widths "
                         f"({grid_voxels} voxels): the view would no longer be near its origin")


@dataclass
class Placement:
    """Where a batch of views sits: lattice ids, low corners (lattice voxels), copies, cube rotations."""
    lattices: np.ndarray
    corners: np.ndarray
    copies: np.ndarray
    cube: np.ndarray


class LatticeGeometry:
    """A lattice cache's frames: resolution, copies, their rotations; per-process arrays lazily."""

    def __init__(self, root: str, attrs: fmt.CacheAttrs):
        self.root = root
        self.resolution = float(attrs.params.image.resolution_A)
        self.build_voxels = int(attrs.params.image.grid_voxels)
        self.copies = int(attrs.params.rotations)
        self._mats: np.ndarray | None = None
        self._centers: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mats": None, "_centers": None}

    def _rotations(self) -> tuple[np.ndarray, np.ndarray]:
        if self._mats is None:
            self._mats = fmt.read_array(self.root, fmt.LATTICE_ROTATION)
            self._centers = fmt.read_array(self.root, fmt.LATTICE_ROTATION_CENTER)
        return self._mats, self._centers

    def to_copy(self, rows: np.ndarray, copies: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Points (Å, structure frame) in the frame of each structure's lattice copy."""
        points = np.asarray(points, np.float64)
        if self.copies == 1:
            return points
        mats, centers = self._rotations()
        g = centers[rows]
        t = np.where((copies > 0)[:, None], fmt.COPY_ORIGIN_A, g)
        return np.einsum("nij,nj->ni", mats[rows, copies], points - g) + t

    def from_copy(self, rows: np.ndarray, copies: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Points (Å) in a copy's frame back in the structure's frame."""
        points = np.asarray(points, np.float64)
        if self.copies == 1:
            return points
        mats, centers = self._rotations()
        g = centers[rows]
        t = np.where((copies > 0)[:, None], fmt.COPY_ORIGIN_A, g)
        return np.einsum("nji,nj->ni", mats[rows, copies], points - t) + g

    def rotation(self, rows: np.ndarray, copies: np.ndarray) -> np.ndarray:
        """(n, 3, 3) rotation of each sample's copy (the identity without --rotations)."""
        if self.copies == 1:
            return np.broadcast_to(np.eye(3), (len(rows), 3, 3)).copy()
        return self._rotations()[0][rows, copies].astype(np.float64)

    def place(self, seed: int, epoch: int, indices: np.ndarray, rows: np.ndarray, centers: np.ndarray,
              n: int, jitter: int, rotate: bool, tag: int = 0) -> Placement:
        """Views of ``n`` voxels around ``centers`` (Å, structure frame) of structures ``rows``,
        the random choices drawn from (seed, epoch, index, tag)."""
        count = len(indices)
        copies = (mix_array(seed, epoch, indices, 1, tag) % np.uint64(self.copies)).astype(np.int64) \
            if self.copies > 1 else np.zeros(count, np.int64)
        cube = (mix_array(seed, epoch, indices, 2, tag) % np.uint64(N_CUBE_ROTATIONS)).astype(np.int64) \
            if rotate else np.zeros(count, np.int64)
        corners = fmt.view_corner(self.to_copy(rows, copies, centers), self.resolution, n)
        if jitter:
            for axis in range(3):
                corners[:, axis] += (mix_array(seed, epoch, indices, 3 + axis, tag)
                                     % np.uint64(2 * jitter + 1)).astype(np.int64) - jitter
        return Placement(rows * self.copies + copies, corners, copies, cube)

    def view_centers(self, placement: Placement, rows: np.ndarray, n: int) -> np.ndarray:
        """Centres (Å, structure frame, float32) of placed views."""
        inside = fmt.view_center(placement.corners, self.resolution, n)
        return self.from_copy(rows, placement.copies, inside).astype(np.float32)
