"""`pipeline check` on a lattice cache (``--layout lattice``): re-voxelize sampled blocks
(``--spot-check``) and rewrite damaged block shards (``--repair``) with the build's own code.

The unit of a lattice cache is the block, and a block belongs to one lattice: copy ``r`` of
structure ``s`` (lattice ``s * K + r``, ``--rotations K``; ``format/lattice.py``). So:

- the spot check voxelizes each sampled block *on its own* (``macromol_voxelize`` on the block's
  grid, in its copy's frame), the reference the build's tile-by-tile voxelizer must equal bit for
  bit, and compares the stored bytes;
- a repair rewrites whole block shard files (replaced atomically) with the build's own
  ``lattice_write_task``, re-voxelizing every structure with blocks in them (every copy of it), and
  publishes a shard only if every block reproduces its recorded crc32 (``lattice/block_crc32``).

``pipeline.repair`` calls these for lattice caches and holds the build lock around the rewrite.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.integrity import SHARD_KINDS, Cache, Problem
from cache_tools.commands.lattice_integrity import Blocks
from pipeline import write
from pipeline.errors import BuildError
from pipeline.parse import ParseError, parse_atoms
from pipeline.tasks import lattice_write_task, shard_pieces
from pipeline.voxelize import ImageSpec, voxelize

__all__ = ["LatticeTables", "damaged_block_shards", "rebuild_block_shards", "save_atoms", "spot_check_blocks",
           "stored_block"]


class LatticeTables:
    """A lattice cache's block tables, and where each block sits (its lattice, structure, copy, cell)."""

    def __init__(self, root: Path, copies: int):
        self.root, self.copies = root, copies
        self.grid = fmt.read_array(root, fmt.LATTICE_GRID)
        self.map_start = fmt.read_array(root, fmt.LATTICE_MAP_START)
        self.block_map = fmt.read_array(root, fmt.LATTICE_MAP)
        self.block_start = fmt.read_array(root, fmt.LATTICE_BLOCK_START)
        self.mats = fmt.read_array(root, fmt.LATTICE_ROTATION) if copies > 1 else None
        self.centers = fmt.read_array(root, fmt.LATTICE_ROTATION_CENTER) if copies > 1 else None
        starts = self.block_start[::copies]
        self.structure_blocks = np.stack([starts[:-1], starts[1:]], axis=1)  # [first, stop) per structure
        self._cells: dict[int, np.ndarray] = {}

    def lattice_of(self, block: int) -> int:
        return int(np.searchsorted(self.block_start, block, side="right")) - 1

    def cell(self, block: int) -> tuple[int, np.ndarray]:
        """(lattice, the block's place in its lattice's block map: int64 (3,), in blocks)."""
        lat = self.lattice_of(block)
        if lat not in self._cells:
            self._cells[lat] = fmt.storage_cells(self.block_map[self.map_start[lat]:self.map_start[lat + 1]])
        cell = int(self._cells[lat][block - int(self.block_start[lat])])
        dims = tuple(int(d) for d in self.grid[lat, 3:])
        return lat, np.array(np.unravel_index(cell, dims), np.int64)

    def copy_xyz(self, xyz: np.ndarray, row: int, copy: int) -> np.ndarray:
        """Atoms of structure ``row`` in the frame of its lattice copy ``copy`` (as the build voxelizes them)."""
        if self.mats is None:
            return xyz
        return fmt.copy_frame(xyz, self.mats[row, copy], self.centers[row], copy)


def stored_block(layout: fmt.VoxelLayout, block: int) -> bytes:
    """A block's stored bytes before compression, read straight from its shard file (CacheError if unreadable)."""
    shard, j = divmod(block, layout.items_per_shard)
    path = layout.shard_path(shard)
    try:
        with open(path, "rb") as fh:
            if layout.codec is None:
                fh.seek(j * layout.item_nbytes)
                data = fh.read(layout.item_nbytes)
            else:
                fh.seek(-layout.index_nbytes + 16 * j, 2)
                offset, length = np.frombuffer(fh.read(16), "<u8").tolist()
                fh.seek(offset)
                data = fh.read(length)
    except (OSError, ValueError) as exc:
        raise fmt.CacheError(f"cannot read {layout.shard_file(shard)} ({exc})") from None
    if layout.codec is not None:
        from numcodecs.zstd import decompress

        try:
            data = decompress(data)
        except (RuntimeError, ValueError):
            data = b""
    if len(data) != layout.item_nbytes:
        raise fmt.CacheError(f"does not read back as a block ({len(data)} bytes, expected {layout.item_nbytes})")
    return data


def spot_check_blocks(c: Cache, files: list[Path | None], usable: list[bool], n: int, seed: int,
                      progress: bool) -> int:
    """Re-parse and re-voxelize ``n`` random blocks of usable structures, each on its own in its
    copy's frame; compare with the stored bytes. Returns the number of blocks checked."""
    from tqdm import tqdm

    from pipeline.build import BuildParams

    params = BuildParams.from_cache(c.attrs.params)
    copies, edge, res = params.rotations, c.attrs.params.lattice.block_edge, params.image.resolution_A
    tables = LatticeTables(c.root, copies)
    blocks = Blocks(c)
    pool = np.concatenate([np.arange(*tables.structure_blocks[k]) for k in range(len(usable)) if usable[k]]
                          or [np.zeros(0, np.int64)])
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    spec = ImageSpec(edge, res, params.image.n_channels, params.image.atom_radius_A)
    assemblies = fmt.assemblies(c.root)
    atoms, current = None, -1
    for block in tqdm(chosen.tolist(), desc="spot check", unit="block", disable=not progress):
        lat, cell = tables.cell(block)
        row, copy = divmod(lat, copies)
        file = c.rel(c.layout.shard_path(block // c.layout.items_per_shard))
        if row != current:
            current = row
            try:
                atoms = parse_atoms(files[row], params.channels, assemblies[row], params.occupancy)
            except ParseError as exc:
                blocks.report("spot-check", f"source no longer parses: {exc}", block, block, file)
                atoms = None
        if atoms is None:
            continue
        corner = tables.grid[lat, :3].astype(np.int64) + cell * edge
        xyz = tables.copy_xyz(atoms.xyz, row, copy)
        image = voxelize(xyz, atoms.channel, (corner + edge / 2) * res, spec, occupancy=atoms.occupancy)
        expected = np.ascontiguousarray(params.storage.encode(np.ascontiguousarray(image.transpose(1, 2, 3, 0)))[0])
        try:
            stored = stored_block(c.layout, block)
        except fmt.CacheError as exc:
            blocks.report("spot-check", str(exc), block, block, file)
            continue
        if stored != expected.tobytes():
            a = np.frombuffer(stored, c.layout.dtype).astype(np.float64)
            b = expected.astype(np.float64).ravel()
            blocks.report("spot-check", "stored block differs from the re-voxelized one (max |difference| "
                          f"{np.nanmax(np.abs(a - b))} in stored units)", block, block, file)
    return len(chosen)


def damaged_block_shards(c: Cache, problems: list[Problem]) -> list[int]:
    """The block shards that problems of ``SHARD_KINDS`` name (by file: lattice problems name blocks
    in their detail and their shard file in ``file``)."""
    by_file = {c.rel(c.layout.shard_path(s)): s for s in range(c.layout.n_shards)}
    return sorted({by_file[p.file] for p in problems if p.kind in SHARD_KINDS and p.file in by_file})


def shard_structures(c: Cache, tables: LatticeTables, shard: int) -> list[int]:
    """Structure rows with blocks in block shard ``shard``."""
    lo = shard * c.layout.items_per_shard
    hi = lo + c.layout.origins_in_shard(shard)
    ranges = tables.structure_blocks
    return [k for k in range(len(ranges)) if ranges[k, 0] < hi and ranges[k, 1] > lo]


def save_atoms(root: Path, k: int, source: Path, params, assembly: str, recorded: int) -> None:
    """Parse structure ``k``'s source as the build did and save its atoms where the write tasks read
    them (``.build/atoms/k.npz``); BuildError when it no longer parses to the recorded atom count."""
    if write.atoms_path(root, k).exists():
        return
    try:
        atoms = parse_atoms(source, params.channels, assembly, params.occupancy)
    except ParseError as exc:
        raise BuildError(f"{source}: {exc}") from None
    if len(atoms) != recorded:
        raise BuildError(f"{source}: parses to {len(atoms)} atoms, the cache recorded "
                         f"{recorded} (parse rules changed?); rebuild the cache instead")
    write.save_atoms(root, k, atoms)


def rebuild_block_shards(root: Path, shards: list[int], sources: dict[int, Path], params, progress: bool) -> None:
    """Rewrite block shards with the build's lattice write task (the caller holds the build lock and
    has checked ``sources``, structure row -> file, unchanged). BuildError naming a shard whose blocks
    do not reproduce their recorded crc32s; nothing else is written."""
    from tqdm import tqdm

    layout = fmt.VoxelLayout(root, fmt.BLOCKS)
    tables = LatticeTables(root, params.rotations)
    atom_count = fmt.read_array(root, fmt.STRUCTURE_ATOM_COUNT)
    assemblies = fmt.assemblies(root)
    crc32 = fmt.read_array(root, fmt.BLOCK_CRC32)
    rows = list(range(len(tables.structure_blocks)))
    (root / fmt.BUILD_DIR).mkdir(exist_ok=True)
    try:
        for shard in tqdm(shards, desc="repair", unit="shard", disable=not progress):
            pieces = shard_pieces(tables.structure_blocks, list(zip(rows, rows)), layout, [shard])
            for (k, _), _, _ in pieces:
                save_atoms(root, k, sources[k], params, assemblies[k], int(atom_count[k]))
            lo = shard * layout.items_per_shard
            try:
                lattice_write_task(str(root), [shard], pieces, params.image, params.storage,
                                   expected_crc32=crc32[lo:lo + layout.origins_in_shard(shard)])
            except write.ChecksumMismatch as exc:
                raise BuildError(f"block shard {shard} not repaired: {str(exc).replace('origin', 'block')}") from None
    finally:
        shutil.rmtree(root / fmt.BUILD_DIR, ignore_errors=True)
