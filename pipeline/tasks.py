"""The build's two tasks, run on dask workers (top-level, so they pickle by reference).

*scan*: parse files, pick their origins, keep the atoms and the result in ``.build/``.
*write*: voxelize the origins of consecutive shards and publish each shard.
A repair runs the same write task in-process, so it writes the bytes a build writes.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from cache_tools import format as fmt
from pipeline import metadata, write
from pipeline.cluster import peak_rss_bytes, reset_peak_rss
from pipeline.encode import LatticeEncoder, OriginEncoder, snap_centers, tile_order
from pipeline.lattice import LatticeVoxelizer
from pipeline.lattice import scan_fields as lattice_scan_fields
from pipeline.origins import Listed, OriginRule, pick_origins
from pipeline.parse import AssemblyError, ParseError, check_source, parse_atoms
from pipeline.voxelize import ImageSpec, Storage


def scan_task(root: str, items: list[tuple[int, str, str]], channels: list[list[str]],
              rule: OriginRule, listed: dict[str, Listed] | None,
              snap: ImageSpec | None = None, box_half_A: float = np.inf,
              lattice: tuple[int, int, int] | None = None,
              assembly: str = fmt.ASSEMBLY_ASYM, occupancy: str = "one") -> tuple[list[tuple[int, int]], int]:
    """Parse files and pick their origins; returns ([(file index, origins or -1 on failure)],
    the worker's peak RSS during the task).

    ``listed``: the --origins file's structures (their centres, and the assembly a row names,
    which overrides ``assembly``). ``assembly``, ``occupancy``: which atoms (pipeline.parse).
    ``snap``: move the centres to that image lattice (pipeline.encode), picked or listed alike.
    ``box_half_A``: an atom touches an image only within this distance of its centre
    along every axis; listed origins with no atom that close (empty images) are counted.
    ``lattice``: (block edge, copies, seed) of a lattice-layout build: also record each
    structure's blocks (``pipeline.lattice.scan_fields``).
    An assembly named by id that a file lacks is recorded as a failure marked ``usage``:
    the build stops with a usage error (the input asked for the impossible), not a FAILED line.
    """
    reset_peak_rss()
    out = []
    for index, source, sid in items:
        sha, reason = "", None
        try:
            check_source(source)  # before opening: a FIFO would block forever
            sha = fmt.file_sha256(source)
        except ParseError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"cannot read: {exc.strerror or exc}"
        n, empty, blocks, usage = -1, "", {}, False
        rows = listed.get(sid) if listed is not None else None
        wanted = rows.assembly if rows is not None and rows.assembly is not None else assembly
        if reason is None:
            try:
                atoms = parse_atoms(source, channels, wanted, occupancy)
                if listed is not None:
                    if rows is None:
                        raise ParseError(f"no origins for id '{sid}' in the --origins file")
                    centers = asked = rows.centers
                    if snap is not None:  # judged where the images will be, not where they were asked for
                        centers = snap_centers(centers, snap)
                    empty = empty_origins(atoms.xyz, centers, box_half_A, listed=asked)
                else:
                    centers = pick_origins(atoms.xyz, rule, sha)
                    if len(centers) == 0:
                        raise ParseError(
                            f"no origins: no atom has >= {rule.min_neighbors} heavy atoms within "
                            f"{rule.neighbor_radius_A} Å ({len(atoms)} heavy atoms)")
                if lattice is not None:
                    blocks = lattice_scan_fields(atoms.xyz, snap, *lattice, sha)
            except AssemblyError as exc:
                reason, usage = str(exc), True
            except ParseError as exc:
                reason = str(exc)
            except (ImportError, MemoryError):
                raise  # a broken environment, not a broken file: stop the build and say so
            except Exception as exc:  # gemmi/numpy surprises: one line, never abort the build
                reason = f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        # Writes into the store stay outside the try: an OSError here (a full disk) is not the
        # file's fault, so it stops the build (resumable) instead of recording the file as failed.
        if reason is None:
            write.save_atoms(root, index, atoms)
            n = len(centers)
            if snap is not None:
                centers = snap_centers(centers, snap)  # idempotent for listed centres
                centers = centers[tile_order(centers, snap)]
            write.publish_npz(write.scan_path(root, index), centers=centers.astype(np.float32),
                              n_atoms=np.int64(len(atoms)), sha256=np.array(sha),
                              entry_id=np.array(atoms.entry_id), empty_origins=np.array(empty),
                              assembly=np.array(atoms.assembly), assembly_note=np.array(atoms.assembly_note),
                              **metadata.scan_fields(atoms.block, atoms.n_models, atoms.n_chains), **blocks)
        else:
            write.publish_npz(write.scan_path(root, index), reason=np.array(reason), sha256=np.array(sha),
                              source=np.array(source), id=np.array(sid),  # shown by `info` mid-build
                              **({"usage": np.array(wanted)} if usage else {}))
        out.append((index, n))
    return out, peak_rss_bytes()


def empty_origins(xyz: np.ndarray, centers: np.ndarray, box_half_A: float,
                  listed: np.ndarray | None = None) -> str:
    """'' or a one-line note on the listed origins whose images (at ``centers``, snapped or
    not) hold no atom (kept, reported); rows are quoted as listed."""
    from scipy.spatial import cKDTree

    if not np.isfinite(box_half_A) or len(xyz) == 0:
        return ""
    distance, _ = cKDTree(xyz).query(centers, p=np.inf)  # per-axis (Chebyshev) distance
    far = np.flatnonzero(distance >= box_half_A)
    if not len(far):
        return ""
    c = (centers if listed is None else listed)[far[0]]
    return (f"{len(far)} of {len(centers)} --origins rows are empty images, e.g. ({c[0]:g}, {c[1]:g}, {c[2]:g}): "
            f"no atom within the image (nearest is {distance[far[0]]:.1f} Å away along an axis)")


def write_task(root: str, shards: list[int], pieces: list[tuple[int, int, int]], spec: ImageSpec,
               storage: Storage, rotations: int, expected_crc32: np.ndarray | None = None,
               lattice: bool = True) -> tuple[list[int], int, int]:
    """Voxelize consecutive shards' origins; pieces are (file index, first origin, stop origin)
    and cover the shards' origins. Returns (shards, origins written, peak RSS).

    A structure is encoded once across the shards of a task, so its lattice tiles are
    not cut at shard boundaries (``build.plan_write_tasks``); each shard is still published on
    its own, so a crash loses at most the shard in progress.
    ``lattice``: crop images from lattice tiles (centres were snapped), else one by one.
    ``expected_crc32`` (a repair), one per origin of the shards: refuse to publish bytes
    that differ from the build's.
    """
    reset_peak_rss()
    layout = fmt.VoxelLayout(root)
    centers = fmt.read_array(root, fmt.CENTER)
    mats = fmt.read_array(root, fmt.ROTATION) if rotations > 1 else None
    saturated = 0
    encoder_class = LatticeEncoder if lattice else OriginEncoder

    def origin_bytes():
        nonlocal saturated
        for index, start, stop in pieces:
            atoms = write.load_npz(write.atoms_path(root, index))
            encoder = encoder_class(atoms["xyz"], atoms["channel"], spec, storage, occupancy=atoms.get("occupancy"))
            for stored, sat in encoder.encode_many(np.asarray(centers[start:stop], dtype=np.float64),
                                                   mats[start:stop] if mats is not None else None):
                saturated += sat
                yield stored

    stream, done = origin_bytes(), 0
    for shard in shards:
        n, before = layout.origins_in_shard(shard), saturated
        write.write_shard(layout, shard, itertools.islice(stream, n), saturated=lambda: saturated - before,
                          expected_crc32=None if expected_crc32 is None else expected_crc32[done:done + n])
        done += n
    return shards, done, peak_rss_bytes()


def lattice_write_task(root: str, shards: list[int], pieces: list[tuple[tuple[int, int], int, int]],
                       spec: ImageSpec, storage: Storage,
                       expected_crc32: np.ndarray | None = None) -> tuple[list[int], int, int]:
    """Voxelize the blocks of consecutive shards of a lattice cache; pieces are ((file index,
    structure row), first block, stop block). Returns (shards, blocks written, peak RSS).

    Each lattice is voxelized tile by tile, once across the shards of a task; each shard is
    published on its own with its blocks' crc32s and fills. ``expected_crc32`` (a repair),
    one per block of the shards: refuse to publish bytes that differ from the build's.
    """
    reset_peak_rss()
    layout = fmt.VoxelLayout(root, fmt.BLOCKS)
    edge = int(layout.item_shape[0])
    grid, block_map = fmt.read_array(root, fmt.LATTICE_GRID), fmt.read_array(root, fmt.LATTICE_MAP)
    map_start, block_start = fmt.read_array(root, fmt.LATTICE_MAP_START), fmt.read_array(root, fmt.LATTICE_BLOCK_START)
    copies = (len(block_start) - 1) // len(fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE))
    mats = fmt.read_array(root, fmt.LATTICE_ROTATION) if copies > 1 else None
    centers = fmt.read_array(root, fmt.LATTICE_ROTATION_CENTER) if copies > 1 else None
    saturated, fills = 0, []

    def block_bytes():
        nonlocal saturated
        for (index, row), start, stop in pieces:
            atoms = write.load_npz(write.atoms_path(root, index))
            for copy in range(copies):
                lat = row * copies + copy
                lo, hi = int(block_start[lat]), int(block_start[lat + 1])
                a, b = max(lo, start), min(hi, stop)
                if a >= b:
                    continue
                cells = fmt.storage_cells(block_map[map_start[lat]:map_start[lat + 1]])
                xyz = atoms["xyz"] if mats is None else fmt.copy_frame(atoms["xyz"], mats[row, copy], centers[row], copy)
                voxelizer = LatticeVoxelizer(xyz, atoms["channel"], spec, storage, edge, grid[lat, :3], grid[lat, 3:],
                                             occupancy=atoms.get("occupancy"))
                for stored, sat, fill in voxelizer.blocks(cells[a - lo:b - lo]):
                    saturated += sat
                    fills.append(fill)
                    yield stored

    stream, done = block_bytes(), 0
    for shard in shards:
        n, before, first = layout.origins_in_shard(shard), saturated, len(fills)
        write.write_shard(layout, shard, itertools.islice(stream, n), saturated=lambda: saturated - before,
                          expected_crc32=None if expected_crc32 is None else expected_crc32[done:done + n],
                          extra=lambda: {"fill": np.array(fills[first:first + n], np.uint16)})
        done += n
    return shards, done, peak_rss_bytes()


def shard_pieces(ranges: np.ndarray, file_index: Sequence[int], layout: fmt.VoxelLayout,
                 shards: list[int]) -> list[tuple[int, int, int]]:
    """write_task's pieces: (file index, start, stop) runs of the structures (``ranges``,
    whose atoms are saved under ``file_index``) that overlap consecutive shards."""
    lo = shards[0] * layout.origins_per_shard
    hi = shards[-1] * layout.origins_per_shard + layout.origins_in_shard(shards[-1])
    first = int(np.searchsorted(ranges[:, 1], lo, side="right"))
    pieces = []
    for k in range(first, len(ranges)):
        start, stop = max(lo, int(ranges[k, 0])), min(hi, int(ranges[k, 1]))
        if start >= hi:
            break
        if start < stop:
            pieces.append((file_index[k], start, stop))
    return pieces
