"""The lattice layout: each structure voxelized once on the image lattice, kept as its non-empty
b³ blocks, so that a view of any size can be cut at any lattice point at training time.

The lattice: voxel ``v`` (an integer per axis) covers ``[v * res, (v + 1) * res)`` Å along
each axis of the structure's frame. A view of ``N`` voxels whose low corner is voxel ``q``
equals ``macromol_voxelize`` on ``Grid(N, res, centre=(q + N / 2) * res)``, bit for bit
(the voxel boundaries are the same floats; ``pipeline/encode.py`` explains why).

Arrays, besides ``origins/*`` and ``structures/*`` as in the per-origin layout::

    blocks/                 (n_blocks, b, b, b, C) stored dtype; sharded, one block per inner
                            chunk (raw, or one zstd frame with its checksum); channel-last, so
                            one (x, y) row of a block is one contiguous run of b * C values
    lattice/grid            (n_lattices, 6) int32: low corner of block (0, 0, 0) in lattice
                            voxels (a multiple of b), then blocks per axis
    lattice/map_start       (n_lattices + 1,) int64: where each lattice's block map starts
    lattice/block_start     (n_lattices + 1,) int64: each lattice's first block id (its blocks
                            are ids block_start[l] .. block_start[l + 1] - 1)
    lattice/block_map       (sum of nx * ny * nz,) int32: block id of each cell (x-major),
                            -1 for a block with no atom near it (all zeros, not stored)
    lattice/block_crc32     (n_blocks,) uint32: zlib.crc32 of each block as stored, before compression
    lattice/block_fill      (n_blocks,) uint16: voxels of the block with a non-zero channel
    lattice/rotation        (n_structures, K, 3, 3) float64, K > 1 only: copy r of structure s
                            holds the atoms x turned by R = rotation[s, r] about g =
                            rotation_center_A[s]: R (x - g) + t_r (``copy_frame``)
    lattice/rotation_center_A (n_structures, 3) float64, K > 1 only

Lattice ``s * K + r`` is copy ``r`` of structure ``s`` (K = 1: lattice ``s``). Blocks are
stored lattice by lattice, each in block-map order, so a structure's blocks are contiguous.

Origin sets (``cache-tools origins``), named sets of view centres chosen after the build, each
in its own directory (``attrs.origin_sets[NAME]`` says how it was made)::

    origin_sets/<NAME>/center_A         (K, 3) float32  centres (Å), on the build grid's lattice
    origin_sets/<NAME>/structure_index  (K,)   int32    structure row of each; sorted
    origin_sets/<NAME>/origin_range     (M, 2) int64    [start, stop) per structure (empty when the
                                                        set has none there); tiling 0..K-1
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_tools.format.names import check_name

BLOCKS = "blocks"
LATTICE_GRID = "lattice/grid"
LATTICE_MAP_START = "lattice/map_start"
LATTICE_MAP = "lattice/block_map"
LATTICE_BLOCK_START = "lattice/block_start"
BLOCK_CRC32 = "lattice/block_crc32"
BLOCK_FILL = "lattice/block_fill"
LATTICE_ROTATION = "lattice/rotation"
LATTICE_ROTATION_CENTER = "lattice/rotation_center_A"
LATTICE_ARRAYS = (LATTICE_GRID, LATTICE_MAP_START, LATTICE_MAP, LATTICE_BLOCK_START, BLOCK_CRC32, BLOCK_FILL,
                  LATTICE_ROTATION, LATTICE_ROTATION_CENTER)

ORIGIN_SETS_DIR = "origin_sets"
ORIGIN_SET_CENTER = "center_A"
ORIGIN_SET_STRUCTURE_INDEX = "structure_index"
ORIGIN_SET_RANGE = "origin_range"
ORIGIN_SET_PARTS = (ORIGIN_SET_CENTER, ORIGIN_SET_STRUCTURE_INDEX, ORIGIN_SET_RANGE)


def origin_set_dir(name: str) -> str:
    """Directory of origin set ``name`` (a plain word: it becomes a directory; not zarr.json, the
    name of its group's metadata file): the rule of split and subset names."""
    return f"{ORIGIN_SETS_DIR}/{check_name('origin set', name)}"


def origin_set_array(name: str, part: str) -> str:
    """Array name of one part (``ORIGIN_SET_PARTS``) of origin set ``name``."""
    if part not in ORIGIN_SET_PARTS:
        raise ValueError(f"origin set part {part!r}: one of {', '.join(ORIGIN_SET_PARTS)}")
    return f"{origin_set_dir(name)}/{part}"


LAYOUTS = ("origins", "lattice")
DEFAULT_LAYOUT = "origins"
# 8: BENCHMARKS.md "Lattice": raw 8³ blocks store the sample in 1.05x the bytes of per-origin zstd
# (16³: 1.8x), zstd 8³ in 321 B/origin (16³: 233), and a compressed view decodes 35 frames of
# 2 KiB (16³: 10 of 16 KiB), which with the block cache is the faster of the two.
DEFAULT_BLOCK_EDGE = 8
EMPTY_BLOCK = -1


@dataclass(frozen=True)
class LatticeParams:
    """How a lattice cache was built (part of its ``CacheParams``)."""
    block_edge: int = DEFAULT_BLOCK_EDGE

    def to_json(self) -> dict:
        return {"block_edge": self.block_edge}


COPY_ORIGIN_A = 4096.0  # where a rotated copy (r >= 1) puts its structure's centre, on every axis:
# far from 0, so every atom and view centre of the copy has the same sign and binade, and the
# voxelizer's differences of coordinates are exact floats wherever the view sits (a view equals
# the voxelizer bit for bit; atoms turned about their own centre, near 0, lose that).


def copy_offset(copy: int, center: np.ndarray) -> np.ndarray:
    """t_r of ``copy_frame``: the structure's centre for copy 0 (no move), COPY_ORIGIN_A otherwise."""
    return np.asarray(center, np.float64) if copy == 0 else np.full(3, COPY_ORIGIN_A)


def copy_frame(points: np.ndarray, rotation: np.ndarray, center: np.ndarray, copy: int) -> np.ndarray:
    """Points (Å) of a structure in the frame of its lattice copy ``copy``: R (x - g) + t_r."""
    if copy == 0:
        return np.asarray(points, np.float64)
    return (np.asarray(points, np.float64) - center) @ np.asarray(rotation).T + copy_offset(copy, center)


def storage_cells(block_map: np.ndarray) -> np.ndarray:
    """The cells of one lattice's stored blocks, in storage (id) order."""
    cells = np.flatnonzero(block_map >= 0)
    return cells[np.argsort(block_map[cells], kind="stable")]


def view_corner(centers_A: np.ndarray, resolution_A: float, n: int) -> np.ndarray:
    """Low-corner lattice voxel (int64, per axis) of the ``n``-voxel view centred nearest to
    each centre: exactly on it when ``2 * centre / resolution`` and ``n`` have the same parity
    (as for the origins of a build whose grid has n's parity), else half a voxel above it."""
    twice = np.rint(2 * np.asarray(centers_A, np.float64) / resolution_A).astype(np.int64)
    return (twice - n + 1) // 2


def lattice_point_offset(grid_voxels: int) -> float:
    """Where a build's image centres sit relative to the lattice planes, in voxels: mid-voxel
    (1/2) for an odd grid, on a plane (0) for an even one (pipeline/encode.py ``lattice_offset``)."""
    return (grid_voxels % 2) / 2


def snap_to_lattice(centers_A: np.ndarray, resolution_A: float, grid_voxels: int) -> np.ndarray:
    """Each centre moved to the nearest centre a build of ``grid_voxels`` can have (at most
    ``resolution_A / 2`` per axis), float32: the build's snapping of ``--origins`` rows."""
    offset = lattice_point_offset(grid_voxels) * resolution_A
    snapped = np.rint((np.asarray(centers_A, np.float64) - offset) / resolution_A) * resolution_A + offset
    return snapped.astype(np.float32)


def view_center(corners: np.ndarray, resolution_A: float, n: int) -> np.ndarray:
    """Centre in Å (float64) of the ``n``-voxel views with these low corners."""
    return (np.asarray(corners, np.float64) + n / 2) * resolution_A


def block_range(lo_voxel: np.ndarray, hi_voxel: np.ndarray, corner: np.ndarray, edge: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (relative to a lattice's corner) holding voxels ``lo..hi`` inclusive, per axis."""
    return (np.asarray(lo_voxel) - corner) // edge, (np.asarray(hi_voxel) - corner) // edge
