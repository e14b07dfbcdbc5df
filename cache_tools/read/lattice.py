"""Reading views out of a lattice cache (``pipeline build-cache --layout lattice``).

A :class:`LatticeReader` is small and picklable; what it opens lives in a per-process
``_Local``, made on first use in each process. The block shards are few (about 1 GiB of raw
blocks each), so every one is memory-mapped once per process with libc's ``mmap`` and its
descriptor closed at once: a reader holds no descriptor at all, and one map per shard.
Views are cut by one compiled call per thread (:func:`cache_tools.read.kernel.cut_views`):
raw blocks are copied from the maps; zstd blocks are decoded, checksum verified, through a
per-thread cache of decoded blocks of ``BLOCK_CACHE_BYTES`` (so at most that times the
threads cutting views, per process; one thread in a DataLoader worker).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cache_tools import format as fmt
from cache_tools.read import kernel
from cache_tools.read.reader_state import default_threads
from cache_tools.read.rotations import FLIPS, PERMS

BLOCK_CACHE_BYTES = 4 << 20  # decoded blocks kept per thread (compressed lattices); BENCHMARKS.md "Lattice"
WAYS = 4                     # set-associative: a block may sit in any of 4 slots of its set

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Map:
    """A whole file mapped read-only, its descriptor already closed; unmapped with this object."""

    address = 0

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(fd).st_size
            if self.size:
                address = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if address in (None, _MAP_FAILED):
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)
                self.address = address
        finally:
            os.close(fd)

    def bytes(self, offset: int, count: int) -> bytes:
        return ctypes.string_at(self.address + offset, count)

    def __del__(self) -> None:
        if self.address:
            _libc.munmap(self.address, self.size)


@dataclass
class _Thread:
    """A thread's decompression context and cache of decoded blocks."""
    dctx: object = None
    slots: np.ndarray | None = None
    key: np.ndarray | None = None
    age: np.ndarray | None = None
    pin: np.ndarray | None = None
    clock: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    scratch: np.ndarray | None = None
    stage: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    one: tuple = ()  # the per-item path's reused arrays: lattice, corner, status, detail, cube


@dataclass
class _Local:
    pid: int
    maps: list
    base: np.ndarray
    data_end: np.ndarray
    grid: np.ndarray
    map_start: np.ndarray
    block_map: np.ndarray
    zero: np.ndarray
    threads: threading.local = field(default_factory=threading.local)
    pool: ThreadPoolExecutor | None = None
    pool_threads: int = 0


class LatticeReader:
    """Views (channel-last) of a lattice cache's lattices: one cut, a batch, with cast and rotation."""

    def __init__(self, root: str, threads: int | None = None, cache_bytes: int = BLOCK_CACHE_BYTES):
        self.root = str(root)
        self.layout = fmt.VoxelLayout(self.root, fmt.BLOCKS)
        self.edge = int(self.layout.item_shape[0])
        self.n_channels = int(self.layout.item_shape[-1])
        self.dtype = self.layout.dtype
        self.threads = threads
        self.cache_bytes = cache_bytes
        self._state: _Local | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None}

    def _local(self) -> _Local:
        state = self._state
        if state is None or state.pid != os.getpid():
            layout = self.layout
            maps, data_end = [], []
            for shard in range(layout.n_shards):
                path = layout.shard_file(shard)
                try:
                    m = _Map(path)
                except FileNotFoundError:
                    raise fmt.CacheError(f"{self.root}: blocks shard file {path} is missing (damaged cache; "
                                         "run cache-tools check)") from None
                end = m.size - layout.index_nbytes
                if end < 0 or (layout.codec is None and m.size != layout.shard_nbytes(shard)):
                    raise fmt.CacheError(f"{self.root}: blocks shard file {path} is truncated ({m.size} bytes; "
                                         "damaged cache, run cache-tools check)")
                maps.append(m)
                data_end.append(end)
            state = self._state = _Local(
                os.getpid(), maps, np.array([m.address for m in maps], np.uintp), np.array(data_end, np.int64),
                fmt.read_array(self.root, fmt.LATTICE_GRID).astype(np.int64),
                fmt.read_array(self.root, fmt.LATTICE_MAP_START), fmt.read_array(self.root, fmt.LATTICE_MAP),
                np.zeros(self.edge ** 3 * self.n_channels * self.dtype.itemsize, np.uint8))
        return state

    def _thread(self, local: _Local, n: int) -> _Thread:
        scratch = getattr(local.threads, "scratch", None)
        if scratch is None:
            scratch = local.threads.scratch = _Thread()
            block_nbytes = local.zero.size
            if self.layout.codec is not None:
                from cache_tools.read.native import DecompressionContext

                n_slots = max(WAYS, self.cache_bytes // block_nbytes // WAYS * WAYS)
                scratch.dctx = DecompressionContext()
                scratch.slots = np.empty((n_slots, block_nbytes), np.uint8)
                scratch.key = np.full(n_slots, -1, np.int64)
                scratch.age = np.zeros(n_slots, np.int64)
                scratch.pin = np.zeros(n_slots, np.int64)
            else:
                scratch.slots = np.empty((0, block_nbytes), np.uint8)
                scratch.key = scratch.age = scratch.pin = np.zeros(WAYS, np.int64)
        span = (n + 2 * self.edge - 2) // self.edge
        if scratch.scratch is None or scratch.scratch.shape[0] < span ** 3:
            scratch.scratch = np.empty((span ** 3, local.zero.size), np.uint8)
        return scratch

    def warm(self, out_dtype: np.dtype) -> None:
        """Compile or load the kernels this reader runs, in this process (see kernel.warm_origins)."""
        lattice = np.zeros(1, np.int64)
        corner = np.zeros((1, 3), np.int64)
        if len(self._local().grid):
            out = np.empty((1, 2, 2, 2, self.n_channels), out_dtype)
            self.read(lattice, corner, 2, out, np.zeros(1, np.int64),
                      np.ones(self.n_channels, np.float32) if out_dtype != self.dtype else None)
            self.read(lattice, corner, 2, np.empty((1, 2, 2, 2, self.n_channels), self.dtype))

    def cut(self, lattices: np.ndarray, corners: np.ndarray, n: int, dst: np.ndarray) -> None:
        """``dst[k]`` (channel-last (n, n, n, C) of the stored dtype, any C-contiguous bytes) =
        the view of lattice ``lattices[k]`` with low corner ``corners[k]``. One compiled call."""
        local = self._local()
        scratch = self._thread(local, n)
        status = np.empty(len(lattices), np.int64)
        detail = np.zeros(len(lattices), np.int64)
        failed = kernel.cut_views(lattices, corners, n, local.grid, local.map_start, local.block_map, local.base,
                                  local.data_end, self.layout.items_per_shard, self.edge, self.n_channels,
                                  self.dtype.itemsize, self.layout.codec is not None,
                                  scratch.dctx.address if scratch.dctx is not None else 0, local.zero,
                                  local.zero, scratch.slots, scratch.key, scratch.age, scratch.pin, WAYS,
                                  scratch.clock, scratch.scratch, dst.reshape(len(lattices), -1).view(np.uint8),
                                  status, detail)
        if failed:
            k = int(np.flatnonzero(status)[0])
            self._raise(int(lattices[k]), int(detail[k]), int(status[k]))

    def _raise(self, lattice: int, block: int, status: int):
        copies = (len(self._local().grid)) // len(fmt.read_array(self.root, fmt.STRUCTURE_ORIGIN_RANGE))
        sid = fmt.ragged_item(*fmt.read_ragged_strings(self.root, fmt.STRUCTURE_ID), lattice // copies)
        shard = block // self.layout.items_per_shard
        raise fmt.CacheError(f"{self.root}: structure {sid}: block {block} in {self.layout.shard_file(shard)}: "
                             f"{kernel.STATUS[status]} (damaged cache; run cache-tools check)")

    def read(self, lattices: np.ndarray, corners: np.ndarray, n: int, out: np.ndarray,
             cube: np.ndarray | None = None, a: np.ndarray | None = None, b: np.ndarray | None = None) -> None:
        """``out[k]`` (channel-last (n, n, n, C), out's dtype) = a[c] * rotate(view k) + b[c]; the
        batch split over ``threads`` threads. None: no rotation, a = 1, b = 0."""
        count = len(lattices)
        plain = (cube is None or not cube.any()) and a is None and b is None and out.dtype == self.dtype
        lattices, corners = np.ascontiguousarray(lattices, np.int64), np.ascontiguousarray(corners, np.int64)

        def run(lo: int, hi: int) -> None:
            if plain:
                self.cut(lattices[lo:hi], corners[lo:hi], n, out[lo:hi])
                return
            local = self._local()
            scratch = self._thread(local, n)
            need = (hi - lo) * n ** 3 * self.n_channels * self.dtype.itemsize
            if scratch.stage.size < need:
                scratch.stage = np.empty(need, np.uint8)
            stage = scratch.stage[:need].view(self.dtype).reshape(hi - lo, n, n, n, self.n_channels)
            self.cut(lattices[lo:hi], corners[lo:hi], n, stage)
            k = np.zeros(hi - lo, np.int64) if cube is None else np.ascontiguousarray(cube[lo:hi], np.int64)
            aa = np.ones(self.n_channels, np.float32) if a is None else np.asarray(a, np.float32)
            bb = np.zeros(self.n_channels, np.float32) if b is None else np.asarray(b, np.float32)
            if self.dtype == np.float16 or out.dtype == np.float16:  # numba has no float16 on the CPU
                from cache_tools.read.rotations import rotate_view

                for j in range(hi - lo):
                    image = rotate_view(stage[j].transpose(3, 0, 1, 2), int(k[j])).astype(np.float32)
                    image = image * aa[:, None, None, None] + bb[:, None, None, None]
                    np.copyto(out[lo + j], image.transpose(1, 2, 3, 0), casting="unsafe")
                return
            kernel.finish_cl(stage, k, PERMS, FLIPS, aa, bb, out[lo:hi])

        threads = min(self.threads or default_threads(), max(1, count // 8))
        if threads <= 1:
            run(0, count)
            return
        local = self._local()
        if local.pool is None or local.pool_threads < threads:
            local.pool = ThreadPoolExecutor(threads, thread_name_prefix="voxel-cut")
            local.pool_threads = threads
        step = -(-count // threads)
        futures = [local.pool.submit(run, lo, min(lo + step, count)) for lo in range(step, count, step)]
        run(0, min(step, count))
        for f in futures:
            f.result()

    def read_one(self, lattice: int, corner: tuple[int, int, int], n: int, out: np.ndarray, cube: int = 0,
                 a: np.ndarray | None = None, b: np.ndarray | None = None) -> None:
        """One view into ``out`` (channel-last (n, n, n, C)): :meth:`read` of one view without its
        per-batch set-up (the per-item path: arrays reused, no threads)."""
        local = self._local()
        scratch = self._thread(local, n)
        if not scratch.one:
            scratch.one = (np.zeros(1, np.int64), np.zeros((1, 3), np.int64), np.zeros(1, np.int64),
                           np.zeros(1, np.int64), np.zeros(1, np.int64))
        lattices, corners, status, detail, cubes = scratch.one
        lattices[0] = lattice
        corners[0] = corner
        plain = not cube and a is None and b is None and out.dtype == self.dtype
        if not plain and (self.dtype == np.float16 or out.dtype == np.float16):
            self.read(lattices, corners, n, out[None], np.array([cube], np.int64), a, b)
            return
        if plain:
            dst = out
        else:
            need = n ** 3 * self.n_channels * self.dtype.itemsize
            if scratch.stage.size < need:
                scratch.stage = np.empty(need, np.uint8)
            dst = scratch.stage[:need].view(self.dtype).reshape(n, n, n, self.n_channels)
        failed = kernel.cut_views(lattices, corners, n, local.grid, local.map_start, local.block_map, local.base,
                                  local.data_end, self.layout.items_per_shard, self.edge, self.n_channels,
                                  self.dtype.itemsize, self.layout.codec is not None,
                                  scratch.dctx.address if scratch.dctx is not None else 0, local.zero,
                                  local.zero, scratch.slots, scratch.key, scratch.age, scratch.pin, WAYS,
                                  scratch.clock, scratch.scratch, dst.reshape(1, -1).view(np.uint8), status, detail)
        if failed:
            self._raise(lattice, int(detail[0]), int(status[0]))
        if not plain:
            cubes[0] = cube
            kernel.finish_cl(dst[None], cubes, PERMS, FLIPS,
                             np.ones(self.n_channels, np.float32) if a is None else a,
                             np.zeros(self.n_channels, np.float32) if b is None else b, out[None])

    def block_bytes(self, block: int) -> bytes:
        """A block's stored bytes before compression (what lattice/block_crc32 covers)."""
        local = self._local()
        layout = self.layout
        shard, j = divmod(block, layout.items_per_shard)
        m = local.maps[shard]
        if layout.codec is None:
            return m.bytes(j * layout.item_nbytes, layout.item_nbytes)
        offset, length = np.frombuffer(m.bytes(int(local.data_end[shard]) + 16 * j, 16), "<u8").tolist()
        if offset == int(fmt.EMPTY_INDEX_ENTRY) or offset + length > int(local.data_end[shard]):
            raise fmt.CacheError(f"{self.root}: block {block} in {layout.shard_file(shard)}: its shard index "
                                 "entry is absent or points past the data (damaged cache; run cache-tools check)")
        from numcodecs.zstd import decompress

        try:
            out = decompress(m.bytes(offset, length))
        except (RuntimeError, ValueError) as exc:
            raise fmt.CacheError(f"{self.root}: block {block} in {layout.shard_file(shard)}: does not decode "
                                 f"({exc}; damaged cache, run cache-tools check)") from None
        if len(out) != layout.item_nbytes:
            raise fmt.CacheError(f"{self.root}: block {block} in {layout.shard_file(shard)}: decodes to "
                                 f"{len(out)} bytes, not {layout.item_nbytes} (damaged cache)")
        return out

    def verify_blocks(self, blocks: np.ndarray) -> None:
        """CacheError unless each block's bytes have the crc32 the build recorded."""
        crc = fmt.read_array(self.root, fmt.BLOCK_CRC32)
        for block in np.unique(blocks).tolist():
            if zlib.crc32(self.block_bytes(block)) != int(crc[block]):
                shard = block // self.layout.items_per_shard
                raise fmt.CacheError(f"{self.root}: block {block}: checksum mismatch in "
                                     f"{self.layout.shard_file(shard)} (damaged cache; run cache-tools check)")

    def touched_blocks(self, lattice: int, corner: np.ndarray, n: int) -> np.ndarray:
        """Stored blocks a view reads (for verify=True)."""
        local = self._local()
        g = local.grid[lattice]
        lo = (np.asarray(corner) - g[:3]) // self.edge
        hi = (np.asarray(corner) + n - 1 - g[:3]) // self.edge
        lo, hi = np.maximum(lo, 0), np.minimum(hi, g[3:] - 1)
        if np.any(hi < lo):
            return np.zeros(0, np.int64)
        x, y, z = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij")
        cells = (x * g[4] + y) * g[5] + z
        ids = local.block_map[local.map_start[lattice] + cells.ravel()]
        return ids[ids >= 0].astype(np.int64)
