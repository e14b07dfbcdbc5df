"""The checks of a lattice cache's blocks (``pipeline build-cache --layout lattice``), each problem
one line naming the blocks, their structure and the shard file: shard files and zarr's shard
index, then every block's crc32 (``lattice/block_crc32``, over its bytes before compression, so a
compressed block is decoded first, which checks its zstd frame and checksum too) and values.

Read straight from the shard files (not through the training reader, which refuses a cache
with a missing shard), one shard at a time on ``workers`` threads.
"""
from __future__ import annotations

import mmap
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.integrity import Cache, Problem, _runs

DETAILS = {"undecodable": "compressed bytes do not decode (zstd frame or its checksum damaged)",
           "checksum": "crc32 differs from the one recorded at build time (bytes changed)",
           "non-finite": "NaN or infinite voxel values", "negative": "negative voxel values"}


class Blocks:
    """Which structure each block belongs to (None when the lattice tables are damaged)."""

    def __init__(self, c: Cache):
        self.c = c
        self.copies = int(c.attrs.params.rotations)  # lattice s * copies + r is copy r of structure s
        try:
            self.start = fmt.read_array(c.root, fmt.LATTICE_BLOCK_START)
        except fmt.CacheError:
            self.start = None

    def report(self, kind: str, detail: str, first: int, last: int, file: str) -> None:
        """One problem per structure the block range [first, last] touches."""
        pieces = [(None, first, last)]
        if self.start is not None and self.c.ids is not None:
            pieces, block = [], first
            while block <= last:
                lattice = int(np.searchsorted(self.start, block, side="right")) - 1
                stop = min(last, int(self.start[lattice + 1]) - 1) if lattice + 1 < len(self.start) else last
                pieces.append((lattice // self.copies, block, stop))
                block = stop + 1
        for k, a, b in pieces:
            sid, source = self.c.name(k) if k is not None and k < len(self.c.ids or []) else (None, None)
            where = f"block {a}" if a == b else f"blocks {a}-{b}"
            self.c.problems.append(Problem(kind, f"{where}: {detail}", None, sid, source, file))


def check_block_files(c: Cache, blocks: Blocks) -> list[int]:
    """Sizes and shard indexes of the blocks' shard files; returns the shards whose bytes can be read."""
    layout, readable = c.layout, []
    for shard in range(layout.n_shards):
        lo = shard * layout.items_per_shard
        problem = layout.shard_problem(shard)
        if problem is None:
            readable.append(shard)
            continue
        kind, detail = problem
        blocks.report(kind, detail.replace("origin", "block"), lo, lo + layout.origins_in_shard(shard) - 1,
                      c.rel(layout.shard_path(shard)))
        if kind == "shard-index" and layout.codec is None:
            readable.append(shard)
    return readable


def _scan_shard(c: Cache, shard: int, crc32: np.ndarray | None) -> tuple[int, dict[str, list[int]]]:
    """(bytes checked, {problem kind: blocks}) of one shard file's blocks."""
    layout = c.layout
    found: dict[str, list[int]] = {kind: [] for kind in DETAILS}
    first, count, size = shard * layout.items_per_shard, layout.origins_in_shard(shard), layout.item_nbytes
    with open(layout.shard_path(shard), "rb") as fh:  # mapped: a raw shard is up to ~1 GiB
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if layout.codec is not None:
        from numcodecs.zstd import decompress

        index = np.frombuffer(data[len(data) - layout.index_nbytes:], "<u8").reshape(-1, 2)
    floating = layout.dtype.kind == "f"
    for j in range(count):
        block = first + j
        if layout.codec is None:
            stored = data[j * size:(j + 1) * size]
        else:
            offset, length = int(index[j, 0]), int(index[j, 1])
            try:
                stored = decompress(data[offset:offset + length])
            except (RuntimeError, ValueError):
                stored = b""
            if len(stored) != size:
                found["undecodable"].append(block)
                continue
        if crc32 is not None and block < len(crc32) and zlib.crc32(stored) != int(crc32[block]):
            found["checksum"].append(block)
        if floating:
            values = np.frombuffer(stored, layout.dtype)
            if not np.isfinite(values).all():
                found["non-finite"].append(block)
            if (values < 0).any():
                found["negative"].append(block)
    return count * size, found


def check_blocks(c: Cache, blocks: Blocks, shards: list[int], workers: int, progress: bool) -> int:
    """Checksums and values of every block of ``shards``, on ``workers`` threads; returns bytes checked."""
    from tqdm import tqdm

    layout = c.layout
    try:
        crc32 = fmt.read_array(c.root, fmt.BLOCK_CRC32)
    except fmt.CacheError:
        crc32 = None  # reported by check_metadata's crc of the lattice tables
    found: dict[str, list[int]] = {kind: [] for kind in DETAILS}
    total = sum(layout.origins_in_shard(s) for s in shards) * layout.item_nbytes
    checked = 0
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool, \
            tqdm(total=total, desc="checksums", unit="B", unit_scale=True, disable=not progress) as bar:
        for nbytes, shard_found in pool.map(lambda s: _scan_shard(c, s, crc32), shards):
            for kind, ids in shard_found.items():
                found[kind] += ids
            checked += nbytes
            bar.update(nbytes)
    per_shard = layout.items_per_shard
    for kind, ids in found.items():
        for a, b in _runs(sorted(ids), per_shard):
            blocks.report(kind, DETAILS[kind], a, b, c.rel(layout.shard_path(a // per_shard)))
    return checked
