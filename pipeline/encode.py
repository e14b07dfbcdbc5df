"""The stored bytes of a structure's origins: per origin, or cropped from lattice tiles.

Per origin (``OriginEncoder``, ``--exact-centers``): one ``macromol_voxelize`` call per
image, on the atoms near its centre.

Lattice (``LatticeEncoder``, the default): every origin's centre is snapped to the image
lattice (``snap_centers``), the planes ``k * resolution`` on each axis, so that each image's
voxel boundaries are lattice planes: with an odd ``grid_voxels`` the centre sits mid-voxel
(``k + 1/2``), with an even one on a plane. Then a cube of the lattice (a *tile*) is
voxelized once with the same kernel and each image is a slice copy of it. The kernel's
FractionAtom/Sum value of a voxel depends only on the atoms overlapping it (and their occupancy weights), added in the
same order, and the voxel's corners, which both grids compute exactly (half-integer
multiples of a resolution with a short mantissa, ``lattice_exact``): so a crop equals
the image voxelized at its centre, bit for bit (tests/test_lattice.py checks every sample
file, odd and even grids). An origin whose centre is not on the lattice (unsnapped, or a
resolution like 0.3 Å whose multiples are not exact floats) is voxelized on its own.

Tiles follow the origins, never the whole bounding box of an assembly: consecutive
origins join a tile while the cube around their images stays within ``tile_bytes``, and
the build stores a large structure's origins block by block (``tile_order``) so that
consecutive origins share tiles; memory is one tile plus one structure's atoms.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Iterator

import numpy as np

from pipeline.voxelize import ImageSpec, Storage, add_atoms, image_reach_A, rotate_about, voxelize

TILE_BYTES = 64 * 2**20  # one float32 tile: a 161³ cube of 4 channels


def lattice_offset(spec: ImageSpec) -> float:
    """Where centres sit relative to the lattice planes: mid-voxel for odd grids, on a plane for even."""
    return (spec.grid_voxels % 2) * spec.resolution_A / 2


def lattice_exact(spec: ImageSpec) -> bool:
    """True when lattice coordinates are exact floats (resolution n / 2**k with a small n:
    1, 0.5, 0.75, 1.5 Å...), which bit-identical crops need."""
    return Fraction(spec.resolution_A).numerator < 2**8


def snap_centers(centers: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Move each centre to the nearest lattice point (at most resolution/2 per axis), float32-exact."""
    res, off = spec.resolution_A, lattice_offset(spec)
    snapped = np.rint((np.asarray(centers, dtype=np.float64) - off) / res) * res + off
    return snapped.astype(np.float32)


def tile_side(spec: ImageSpec, tile_bytes: int = TILE_BYTES) -> int:
    """Voxels per side of the largest float32 tile within ``tile_bytes`` (at least one image)."""
    side = int(round((tile_bytes / (4 * spec.n_channels)) ** (1 / 3)))
    while spec.n_channels * side ** 3 * 4 > tile_bytes:
        side -= 1
    return max(spec.grid_voxels, side)


def tile_order(centers: np.ndarray, spec: ImageSpec, tile_bytes: int = TILE_BYTES) -> np.ndarray:
    """The order to store a structure's lattice origins in: by tile-sized block, then as given.

    A structure whose images fit in one tile keeps its order (atom order). A larger one
    (a ribosome) is cut into blocks of the lattice, anchored at its lowest image corner,
    whose images fit in a tile; origins of one block get consecutive ids, so the writer
    voxelizes each block once and emits origins in id order without buffering them.
    """
    n = len(centers)
    if n == 0:
        return np.arange(0)
    L = spec.grid_voxels
    q = np.rint((np.asarray(centers, dtype=np.float64) - lattice_offset(spec)) / spec.resolution_A).astype(np.int64)
    side = tile_side(spec, tile_bytes)
    if int((q.max(axis=0) - q.min(axis=0)).max()) + L <= side:
        return np.arange(n)
    block = (q - q.min(axis=0)) // (side - L + 1)
    return np.lexsort((np.arange(n), block[:, 2], block[:, 1], block[:, 0]))


class OriginEncoder:
    """Stored bytes of single origins, each voxelized on its own: the reference the checks use."""

    def __init__(self, xyz: np.ndarray, channel: np.ndarray, spec: ImageSpec, storage: Storage,
                 occupancy: np.ndarray | None = None):
        from scipy.spatial import cKDTree

        self.xyz, self.channel, self.occupancy = xyz, channel.astype(np.int64), occupancy
        self.tree = cKDTree(xyz)  # neighbours of each centre, instead of scanning every atom
        self.spec, self.storage = spec, storage
        self.reach = image_reach_A(spec) + 1e-6
        self.buffer = np.empty(spec.shape, dtype=np.float32)

    def encode(self, center: np.ndarray, rotations: np.ndarray | None = None,
               first: np.ndarray | None = None) -> tuple[bytes, int]:
        """(stored bytes, saturated voxels) of the image(s) centred on ``center``.

        ``rotations`` (R, 3, 3), as stored in the cache, gives R images (the first is the
        identity); None gives the one canonical image. ``first``: the canonical image when
        the caller already has it (a lattice crop).
        """
        center = np.asarray(center).astype(np.float64)
        count = 1 if rotations is None else len(rotations)
        if first is None or count > 1:
            near = np.sort(np.asarray(self.tree.query_ball_point(center, self.reach), dtype=np.intp))  # atom order: same sums
            near_xyz, near_channel = self.xyz[near], self.channel[near]
            near_occupancy = None if self.occupancy is None else self.occupancy[near]
        parts, saturated = [], 0
        for r in range(count):
            if r == 0 and first is not None:
                img = first
            else:
                coords = near_xyz if r == 0 else rotate_about(near_xyz, center, rotations[r].astype(np.float64))
                img = voxelize(coords, near_channel, center, self.spec, out=self.buffer, occupancy=near_occupancy)
            stored, sat = self.storage.encode(img)
            saturated += sat
            parts.append(stored.tobytes())
        return b"".join(parts), saturated

    def encode_many(self, centers: np.ndarray, rotations: np.ndarray | None = None) -> Iterator[tuple[bytes, int]]:
        for j in range(len(centers)):
            yield self.encode(centers[j], rotations[j] if rotations is not None else None)


class LatticeEncoder:
    """Stored bytes of a structure's lattice origins, cropped from voxelized tiles (module docstring)."""

    def __init__(self, xyz: np.ndarray, channel: np.ndarray, spec: ImageSpec, storage: Storage,
                 tile_bytes: int = TILE_BYTES, occupancy: np.ndarray | None = None):
        self.xyz, self.channel, self.occupancy = xyz, channel.astype(np.int64), occupancy
        self.spec, self.storage = spec, storage
        self.max_side = tile_side(spec, tile_bytes)
        self._buffer = np.empty(0, np.float32)
        self._per_origin: OriginEncoder | None = None
        self.tiles = self.atoms_voxelized = 0  # work done (for benchmarks)

    def per_origin(self) -> OriginEncoder:
        if self._per_origin is None:
            self._per_origin = OriginEncoder(self.xyz, self.channel, self.spec, self.storage, self.occupancy)
        return self._per_origin

    def corners(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lattice index of each image's low corner, which centres are on the lattice)."""
        spec = self.spec
        k = (np.asarray(centers, dtype=np.float64) - lattice_offset(spec)) / spec.resolution_A
        q = np.rint(k)
        on = np.all(q == k, axis=1) & lattice_exact(spec) & np.all(np.abs(q) < 2**30, axis=1)
        return q.astype(np.int64) - spec.grid_voxels // 2, on

    def runs(self, q: np.ndarray, on: np.ndarray) -> Iterator[tuple[int, int, np.ndarray | None, int]]:
        """(start, stop, tile corner, tile side) of consecutive lattice origins sharing a tile;
        (j, j + 1, None, 0) for an origin off the lattice."""
        L, n, j = self.spec.grid_voxels, len(q), 0
        while j < n:
            if not on[j]:
                yield j, j + 1, None, 0
                j += 1
                continue
            lo, hi, stop = q[j].copy(), q[j] + L, j + 1
            while stop < n and on[stop]:
                nlo, nhi = np.minimum(lo, q[stop]), np.maximum(hi, q[stop] + L)
                if int((nhi - nlo).max()) > self.max_side:
                    break
                lo, hi, stop = nlo, nhi, stop + 1
            yield j, stop, lo, int((hi - lo).max())
            j = stop

    def tile(self, lo: np.ndarray, side: int, corners: np.ndarray) -> np.ndarray:
        """The voxelized lattice cube with low corner ``lo`` (lattice index) and ``side`` voxels,
        exact inside the images whose low corners are ``corners``.

        Only atoms that can touch one of those images are voxelized: a tile around sparse
        origins (the 1,000 of a ribosome) costs what their images cost, not the whole cube.
        """
        spec = self.spec
        res, r, L = spec.resolution_A, spec.atom_radius_A, spec.grid_voxels
        size = spec.n_channels * side ** 3
        if self._buffer.size < size:
            self._buffer = np.empty(size, np.float32)
        img = self._buffer[:size].reshape(spec.n_channels, side, side, side)
        img.fill(0)
        lo_A, hi_A = lo * res, (lo + side) * res
        candidates = np.flatnonzero(np.all((self.xyz >= lo_A - r) & (self.xyz <= hi_A + r), axis=1))
        # Cells (of the lattice, padded by k) an atom touching an image can have its centre in.
        k = int(np.ceil(r / res)) + 1
        cover = np.zeros((side + 2 * k,) * 3, dtype=bool)
        for a, b, c in corners - lo:
            cover[a:a + L + 2 * k, b:b + L + 2 * k, c:c + L + 2 * k] = True
        cell = np.floor((self.xyz[candidates] - lo_A) / res).astype(np.int64) + k
        cell = np.clip(cell, 0, side + 2 * k - 1)  # candidates lie within the padding anyway
        near = candidates[cover[cell[:, 0], cell[:, 1], cell[:, 2]]]
        add_atoms(img, side, res, lo_A + side * res / 2, self.xyz[near], self.channel[near], r,
                  None if self.occupancy is None else self.occupancy[near])
        self.tiles += 1
        self.atoms_voxelized += len(near)
        return img

    def encode_many(self, centers: np.ndarray, rotations: np.ndarray | None = None) -> Iterator[tuple[bytes, int]]:
        """(stored bytes, saturated voxels) of each origin, in order; ``rotations`` (n, R, 3, 3)
        or None. Rotated images (R > 1) are voxelized per origin about the snapped centre."""
        L = self.spec.grid_voxels
        q, on = self.corners(centers)
        for start, stop, lo, side in self.runs(q, on):
            tile = self.tile(lo, side, q[start:stop]) if lo is not None else None
            for j in range(start, stop):
                mats = rotations[j] if rotations is not None else None
                if tile is None:
                    yield self.per_origin().encode(centers[j], mats)
                    continue
                a, b, c = q[j] - lo
                crop = tile[:, a:a + L, b:b + L, c:c + L]
                if mats is not None and len(mats) > 1:
                    yield self.per_origin().encode(centers[j], mats, first=crop)
                else:
                    stored, sat = self.storage.encode(crop)
                    yield stored.tobytes(), sat
