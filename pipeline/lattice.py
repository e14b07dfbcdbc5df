"""The lattice layout's build side: which blocks a structure needs, and their voxels.

A block is kept when an atom's sphere can reach it: decided from the coordinates alone
(``block_set``), during the scan, so that every block has its id, shard and place before
anything is voxelized, exactly as origins do in the per-origin layout. A kept block whose
voxels all quantize to zero is stored anyway (it compresses to a few bytes); a block not
kept is zeros by construction.

Voxelizing (``LatticeVoxelizer``): cubes of the lattice (*tiles*, at most ``TILE_BYTES`` of
float32) are voxelized with the same kernel as every image (``pipeline.voxelize.add_atoms``)
on grids whose voxel boundaries are lattice planes, then cut into blocks; the build stores a
lattice's blocks tile by tile, so each tile is voxelized once. A view cut from the blocks
equals the image voxelized at its centre, bit for bit (``pipeline/encode.py`` says why).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from cache_tools import format as fmt
from pipeline.encode import TILE_BYTES, lattice_exact
from pipeline.voxelize import ImageSpec, Storage, add_atoms

_MARGIN = 1e-6  # Å: a block an atom's sphere only grazes is kept (never dropped by rounding)


def tile_blocks(spec: ImageSpec, edge: int, tile_bytes: int = TILE_BYTES) -> int:
    """Blocks per side of the largest float32 tile within ``tile_bytes`` (at least one)."""
    side = int((tile_bytes / (4 * spec.n_channels)) ** (1 / 3)) // edge
    return max(1, side)


def block_set(xyz: np.ndarray, spec: ImageSpec, edge: int,
              tile_bytes: int = TILE_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corner, dims, cells) of one lattice: the low corner of block (0, 0, 0) in lattice voxels
    (a multiple of ``edge``), blocks per axis, and the kept blocks' cell numbers (x-major in the
    block map) in the order the build stores them: tile by tile, then x-major."""
    if not lattice_exact(spec):
        raise ValueError(f"--resolution {spec.resolution_A}: the lattice layout needs a resolution whose "
                         "multiples are exact floats (n / 2**k with a small n, e.g. 1, 0.5, 0.75 Å)")
    res, r = spec.resolution_A, spec.atom_radius_A + _MARGIN
    lo = np.floor((xyz - r) / res).astype(np.int64)          # lowest voxel an atom can touch
    hi = np.floor((xyz + r) / res).astype(np.int64)          # highest
    corner = (lo.min(axis=0) // edge) * edge
    dims = (hi.max(axis=0) - corner) // edge + 1
    b_lo, b_hi = (lo - corner) // edge, (hi - corner) // edge
    # An atom reaches every block of b_lo..b_hi per axis (a radius below a block's width: at
    # most 2 per axis); enumerate the combinations.
    span = b_hi - b_lo
    cells = []
    for dx in range(int(span[:, 0].max()) + 1):
        for dy in range(int(span[:, 1].max()) + 1):
            for dz in range(int(span[:, 2].max()) + 1):
                ok = (span[:, 0] >= dx) & (span[:, 1] >= dy) & (span[:, 2] >= dz)
                b = b_lo[ok] + (dx, dy, dz)
                cells.append((b[:, 0] * dims[1] + b[:, 1]) * dims[2] + b[:, 2])
    cells = np.unique(np.concatenate(cells))
    return corner.astype(np.int64), dims.astype(np.int64), storage_order(cells, dims, tile_blocks(spec, edge, tile_bytes))


def storage_order(cells: np.ndarray, dims: np.ndarray, per_tile: int) -> np.ndarray:
    """``cells`` ordered tile by tile (tiles of ``per_tile`` blocks per side, x-major), x-major inside."""
    b = np.stack(np.unravel_index(cells, tuple(int(d) for d in dims)), axis=1)
    t = b // per_tile
    return cells[np.lexsort((cells, t[:, 2], t[:, 1], t[:, 0]))]


class LatticeVoxelizer:
    """Stored bytes of a lattice's blocks, in the order asked (the storage order)."""

    def __init__(self, xyz: np.ndarray, channel: np.ndarray, spec: ImageSpec, storage: Storage, edge: int,
                 corner: np.ndarray, dims: np.ndarray, tile_bytes: int = TILE_BYTES,
                 occupancy: np.ndarray | None = None):
        self.xyz, self.channel, self.occupancy = xyz, channel.astype(np.int64), occupancy  # occupancy: weights or None
        self.spec, self.storage, self.edge = spec, storage, edge
        self.corner, self.dims = np.asarray(corner, np.int64), np.asarray(dims, np.int64)
        self.per_tile = tile_blocks(spec, edge, tile_bytes)
        self._tile_key: tuple | None = None
        self._tile: np.ndarray | None = None
        self.tiles = self.atoms_voxelized = 0  # work done (for benchmarks and tests)

    def _voxelize_tile(self, key: tuple[int, int, int], wanted: np.ndarray) -> np.ndarray:
        """Channel-last float32 voxels of tile ``key`` (clipped to the lattice's blocks), exact in
        the ``wanted`` blocks (lattice block coordinates, (n, 3)).

        Only atoms whose sphere reaches a wanted block are voxelized: a task that writes a few
        blocks of a large structure pays for those blocks, not for the whole tile.
        """
        spec, e = self.spec, self.edge
        first = np.array(key) * self.per_tile
        count = np.minimum(self.per_tile, self.dims - first)
        side = int(count.max()) * e                                   # the kernel's grids are cubes
        lo = self.corner + first * e                                  # lattice voxel of the tile corner
        res, r = spec.resolution_A, spec.atom_radius_A
        want = np.zeros(tuple(count), bool)
        rel = wanted - first
        want[rel[:, 0], rel[:, 1], rel[:, 2]] = True
        b_lo = np.floor((self.xyz - r - _MARGIN) / res).astype(np.int64) // e - self.corner // e - first
        b_hi = np.floor((self.xyz + r + _MARGIN) / res).astype(np.int64) // e - self.corner // e - first
        reach = np.zeros(len(self.xyz), bool)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    b = np.minimum(b_lo + (dx, dy, dz), b_hi)         # the (at most 2) blocks per axis
                    inside = np.all((b >= 0) & (b < count), axis=1)
                    hit = np.zeros(len(b), bool)
                    hit[inside] = want[b[inside, 0], b[inside, 1], b[inside, 2]]
                    reach |= hit
        near = np.flatnonzero(reach)                                  # in atom order: the same sums
        img = np.zeros((spec.n_channels, side, side, side), np.float32)
        add_atoms(img, side, res, lo * res + side * res / 2, self.xyz[near], self.channel[near], r,
                  None if self.occupancy is None else self.occupancy[near])
        self.tiles += 1
        self.atoms_voxelized += len(near)
        return np.ascontiguousarray(img.transpose(1, 2, 3, 0))

    def blocks(self, cells: np.ndarray) -> Iterator[tuple[bytes, int, int]]:
        """(stored bytes, saturated voxels, filled voxels) of each cell's block, channel-last."""
        e, t = self.edge, self.per_tile
        b = np.stack(np.unravel_index(cells, tuple(int(d) for d in self.dims)), axis=1)
        keys = b // t
        for i, (bx, by, bz) in enumerate(b.tolist()):
            key = (bx // t, by // t, bz // t)
            if key != self._tile_key:
                same = np.all(keys == key, axis=1)  # this tile's blocks among those asked for
                self._tile, self._tile_key = self._voxelize_tile(key, b[same]), key
            x, y, z = (bx % t) * e, (by % t) * e, (bz % t) * e
            block = self._tile[x:x + e, y:y + e, z:z + e]
            stored, saturated = self.storage.encode(block)
            stored = np.ascontiguousarray(stored)
            filled = int(np.count_nonzero(stored.reshape(-1, stored.shape[-1]).any(axis=1)))
            yield stored.tobytes(), saturated, filled


def lattice_rotations(seed: int, structure_row_seed: int, count: int) -> np.ndarray:
    """(count, 3, 3) rotations of one structure's lattice copies: the identity, then seeded random ones."""
    from pipeline.voxelize import random_rotation

    rng = np.random.default_rng([seed, 0x1A77, structure_row_seed])
    mats = np.empty((count, 3, 3))
    mats[0] = np.eye(3)
    for k in range(1, count):
        mats[k] = random_rotation(rng)
    return mats


def blocks_array_metadata(n_blocks: int, edge: int, n_channels: int, dtype: str, blocks_per_shard: int,
                          compression: str, level: int) -> dict:
    """zarr v3 metadata of the blocks array: shards of whole blocks, channel-last, raw or zstd."""
    return fmt.sharded_array_metadata(n_blocks, (edge, edge, edge, n_channels), dtype, blocks_per_shard,
                                      compression=compression, level=level)




def scan_fields(xyz: np.ndarray, spec: ImageSpec, edge: int, copies: int, seed: int, sha256: str) -> dict:
    """What the scan records of a structure's lattices (its copies), for the layout phase:
    each copy's corner, dims and kept cells (storage order), and the copies' rotations."""
    import zlib

    center = xyz.mean(axis=0)
    mats = lattice_rotations(seed, zlib.crc32(sha256.encode()), copies)
    corners, dims, counts, cells = [], [], [], []
    for copy, mat in enumerate(mats):
        c, d, k = block_set(fmt.copy_frame(xyz, mat, center, copy), spec, edge)
        corners.append(c)
        dims.append(d)
        counts.append(len(k))
        cells.append(k)
    return {"lattice_corner": np.array(corners, np.int64), "lattice_dims": np.array(dims, np.int64),
            "lattice_count": np.array(counts, np.int64), "lattice_cells": np.concatenate(cells),
            "lattice_rotation": mats, "lattice_center": center}
