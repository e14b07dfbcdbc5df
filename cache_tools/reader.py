"""Reading origins out of a cache's shard files, with bounded open files and maps.

A :class:`ShardReader` is small and picklable; everything it opens lives in a
per-process :class:`_Local`, created on first use in each process (after a fork or
an unpickle), never in the constructor, so a DataLoader worker never inherits maps.

Bounded resources whatever the shard count: shards are memory-mapped on demand and
kept in an LRU of at most ``max_maps`` maps (Python 3.11's mmap keeps a dup'd file
descriptor per map, so this also bounds descriptors). An evicted map is never closed
by hand: dropping the reference unmaps it once the last numpy view into it is gone.

Compressed origins (``--compression zstd``) are decoded from the mapped shard, at the
offset and length the (mapped) zarr shard index gives, straight into the caller's
buffer, or through one scratch buffer per thread when a cast is needed. Batches decode
on a few threads (numcodecs' zstd releases the GIL), created lazily per process.
"""
from __future__ import annotations

import mmap
import os
import resource
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cache_tools import format as fmt


def default_max_maps() -> int:
    """Maps (and so descriptors) per process: an eighth of RLIMIT_NOFILE, between 8 and 256."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 256 if soft == resource.RLIM_INFINITY else max(8, min(256, soft // 8))


def default_threads() -> int:
    """Decode threads for a batch: up to 4 cores, 1 inside a DataLoader worker (workers are the parallelism)."""
    import torch.utils.data

    if torch.utils.data.get_worker_info() is not None:
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0))))


@dataclass
class _Shard:
    """One mapped shard: the map, its origins (uncompressed) or raw bytes and index (compressed)."""
    mm: mmap.mmap
    data: np.ndarray            # (n, *image_shape) stored dtype, or (size,) uint8 when compressed
    index: np.ndarray | None    # (S, 2) uint64 (offset, nbytes) when compressed


@dataclass
class _Local:
    """What one process has opened: never pickled, never inherited across a fork."""
    pid: int
    max_maps: int
    maps: OrderedDict = field(default_factory=OrderedDict)   # shard -> _Shard, least recent first
    scratch: threading.local = field(default_factory=threading.local)
    crc: np.ndarray | None = None
    pool: ThreadPoolExecutor | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # the LRU, for callers' threads


class ShardReader:
    """Origin bytes of one cache: view/copy one origin, gather many into a buffer, prefetch."""

    def __init__(self, layout: fmt.VoxelLayout, verify: bool = False, max_maps: int | None = None,
                 threads: int | None = None):
        self.layout = layout
        self.verify = verify
        self.max_maps = max_maps
        self.threads = threads
        self._decode = fmt.decoder(layout.codec)
        self._state: _Local | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None, "_decode": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._decode = fmt.decoder(self.layout.codec)

    def _local(self) -> _Local:
        state = self._state
        if state is None or state.pid != os.getpid():
            state = self._state = _Local(os.getpid(), self.max_maps or default_max_maps())
            if self.verify:
                state.crc = fmt.read_array(self.layout.root, fmt.CRC32)
        return state

    def open_maps(self) -> int:
        """Shards mapped by this process now (at most ``max_maps``)."""
        return len(self._local().maps)

    # --- maps ----------------------------------------------------------------------------

    def _shard(self, local: _Local, shard: int, origin: int) -> _Shard:
        with local.lock:
            return self._shard_locked(local, shard, origin)

    def _shard_locked(self, local: _Local, shard: int, origin: int) -> _Shard:
        """The shard's map from the LRU (``local.lock`` held by the caller)."""
        entry = local.maps.get(shard)
        if entry is not None:
            local.maps.move_to_end(shard)
            return entry
        while len(local.maps) >= local.max_maps:
            local.maps.popitem(last=False)  # unmapped when its last view dies, never under one
        entry = local.maps[shard] = self._map(shard, origin)
        return entry

    def _map(self, shard: int, origin: int) -> _Shard:
        layout = self.layout
        path = layout.shard_path(shard)
        where = f"{layout.root}: origin {origin}: shard file {path}"
        try:
            with open(path, "rb") as fh:  # the map keeps its own descriptor; this one closes
                size = os.fstat(fh.fileno()).st_size
                mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) if size else None
        except FileNotFoundError:
            raise fmt.CacheError(f"{where} is missing") from None
        n = layout.origins_in_shard(shard)
        if layout.codec is None:
            if size != layout.shard_nbytes(shard):
                raise fmt.CacheError(f"{where} is truncated or damaged ({size} bytes, expected "
                                     f"{layout.shard_nbytes(shard)})")
            count = n * layout.origin_nbytes // layout.dtype.itemsize
            data = np.frombuffer(mm, dtype=layout.dtype, count=count).reshape(n, *layout.image_shape)
            return _Shard(mm, data, None)
        data = np.frombuffer(mm, dtype=np.uint8) if mm is not None else np.zeros(0, np.uint8)
        index = fmt.shard_index_of(layout, data)
        problem = fmt.index_problem(layout, shard, index, size)
        if problem:
            raise fmt.CacheError(f"{where}: {problem} (damaged cache; run cache-tools check)")
        return _Shard(mm, data, index)

    # --- one origin ------------------------------------------------------------------------

    def view(self, origin: int) -> np.ndarray:
        """The stored image of ``origin`` (stored dtype, image shape), valid until this thread's next read.

        Uncompressed: a zero-copy view of the map. Compressed: decoded into this
        thread's scratch buffer, which the next read on the same thread overwrites.
        """
        local = self._local()
        shard, j = divmod(origin, self.layout.origins_per_shard)
        entry = self._shard(local, shard, origin)
        if entry.index is None:
            stored = entry.data[j]
        else:
            stored = self._scratch(local)
            self._decode_into(entry, j, origin, stored)
        if self.verify:
            self._check_crc(local, origin, stored)
        return stored

    def read_into(self, origin: int, out: np.ndarray, scale: float = 1.0) -> None:
        """``out = image of origin * scale`` (cast to out's dtype); compressed bytes of out's
        dtype decode straight into it."""
        local = self._local()
        if self.verify:
            scaled_copy(self.view(origin), out, scale)
            return
        shard, j = divmod(origin, self.layout.origins_per_shard)
        entry = self._shard(local, shard, origin)
        if entry.index is None:
            scaled_copy(entry.data[j], out, scale)
        elif out.dtype == self.layout.dtype and out.flags.c_contiguous and scale == 1.0:
            self._decode_into(entry, j, origin, out)
        else:
            scratch = self._scratch(local)
            self._decode_into(entry, j, origin, scratch)
            scaled_copy(scratch, out, scale)

    def stored_bytes(self, origin: int) -> bytes:
        """The origin's bytes as the build encoded them before compression (what its crc32 covers)."""
        return self.view(origin).tobytes()

    def _scratch(self, local: _Local) -> np.ndarray:
        buf = getattr(local.scratch, "image", None)
        if buf is None:
            buf = local.scratch.image = np.empty(self.layout.image_shape, self.layout.dtype)
        return buf

    def _decode_into(self, entry: _Shard, j: int, origin: int, out: np.ndarray) -> None:
        offset, nbytes = entry.index[j]
        if offset == fmt.EMPTY_INDEX_ENTRY:  # absent inner chunk: zarr's fill value
            out[...] = 0
            return
        try:
            self._decode(entry.data[int(offset):int(offset + nbytes)], out)
        except (RuntimeError, ValueError) as exc:
            raise fmt.CacheError(
                f"{self.layout.root}: origin {origin}: compressed bytes in "
                f"{self.layout.shard_path(origin // self.layout.origins_per_shard)} do not decode "
                f"({exc}; damaged cache, run cache-tools check)") from None

    def _check_crc(self, local: _Local, origin: int, stored: np.ndarray) -> None:
        if zlib.crc32(stored) != int(local.crc[origin]):
            raise fmt.CacheError(f"{self.layout.root}: origin {origin}: checksum mismatch in "
                                 f"{self.layout.shard_path(origin // self.layout.origins_per_shard)} "
                                 "(damaged cache; run cache-tools check)")

    # --- many origins ------------------------------------------------------------------------

    def gather(self, origins: np.ndarray, out: np.ndarray, scale: float = 1.0) -> None:
        """``out[k] = image of origins[k] * scale`` (cast to out's dtype), one pass per origin.

        Uncompressed: the origins' views in their shards' maps, stacked into ``out`` by
        one C loop (a random batch touches a shard per origin, so grouping by shard only
        adds Python work), then one scaling pass. Compressed: each origin decodes into
        its row of ``out`` on ``threads`` threads. At most ``max_maps`` shards are held at
        once, so descriptors stay bounded.
        """
        if self.verify:
            for k, origin in enumerate(origins.tolist()):
                self.read_into(origin, out[k], scale)
            return
        local = self._local()
        per_shard = self.layout.origins_per_shard
        if self.layout.codec is None:
            shards, rows = np.divmod(origins, per_shard)
            for a in range(0, len(origins), local.max_maps):  # views hold maps: max_maps at a time
                b = min(a + local.max_maps, len(origins))
                with local.lock:
                    views = [self._shard_locked(local, shard, origin).data[row] for shard, row, origin in
                             zip(shards[a:b].tolist(), rows[a:b].tolist(), origins[a:b].tolist())]
                np.stack(views, out=out[a:b], casting="safe")
            if scale != 1.0:
                out *= out.dtype.type(scale)
            return
        jobs: list[tuple[_Shard, int, int, int]] = []   # (shard, row, origin, target)
        held: set[int] = set()  # shards the pending jobs point into
        for k, origin in enumerate(origins.tolist()):
            shard, row = divmod(origin, per_shard)
            if shard not in held and len(held) >= local.max_maps:
                self._decode_jobs(local, jobs, out, scale)  # keep no more than max_maps shards in hand
                jobs, held = [], set()
            held.add(shard)
            jobs.append((self._shard(local, shard, origin), row, origin, k))
        self._decode_jobs(local, jobs, out, scale)

    def _decode_jobs(self, local: _Local, jobs: list, out: np.ndarray, scale: float) -> None:
        direct = out.dtype == self.layout.dtype and scale == 1.0

        def run(part: list) -> None:
            scratch = None if direct else self._scratch(local)
            for entry, row, origin, target in part:
                if direct:
                    self._decode_into(entry, row, origin, out[target])
                else:
                    self._decode_into(entry, row, origin, scratch)
                    scaled_copy(scratch, out[target], scale)

        threads = min(self.threads or default_threads(), len(jobs))
        if threads <= 1:
            run(jobs)
            return
        if local.pool is None or local.pool._max_workers < threads:
            local.pool = ThreadPoolExecutor(threads, thread_name_prefix="voxel-decode")
        step = -(-len(jobs) // threads)
        futures = [local.pool.submit(run, jobs[i:i + step]) for i in range(step, len(jobs), step)]
        run(jobs[:step])
        for f in futures:
            f.result()

    def prefetch(self, sorted_origins: np.ndarray) -> None:
        """Ask the kernel to read these origins' bytes now, in parallel (MADV_WILLNEED).

        The kernel reads exactly these ranges, at once, instead of faulting page by page
        with 128 KiB of read-around each time, which floods a memory-capped page cache
        with neighbours nobody asked for (benchmarks/cold_reads.py, loader_memory.py
        --memory-cap). On a warm cache the kernel still walks every page of the range,
        hence only for caches that do not fit.
        """
        local = self._local()
        per_shard, nbytes = self.layout.origins_per_shard, self.layout.origin_nbytes
        breaks = np.flatnonzero(np.diff(sorted_origins) != 1) + 1
        for run in np.split(sorted_origins, breaks):
            first, last = int(run[0]), int(run[-1])
            for shard in range(first // per_shard, last // per_shard + 1):
                lo = max(first, shard * per_shard) - shard * per_shard
                hi = min(last, shard * per_shard + per_shard - 1) - shard * per_shard + 1
                entry = self._shard(local, shard, shard * per_shard + lo)
                if entry.index is None:
                    start, stop = lo * nbytes, hi * nbytes
                else:
                    present = entry.index[lo:hi][entry.index[lo:hi, 0] != fmt.EMPTY_INDEX_ENTRY]
                    if not len(present):
                        continue
                    start, stop = int(present[:, 0].min()), int((present[:, 0] + present[:, 1]).max())
                start -= start % mmap.PAGESIZE
                if stop > start:
                    entry.mm.madvise(mmap.MADV_WILLNEED, start, stop - start)


def scaled_copy(src: np.ndarray, out: np.ndarray, scale: float) -> None:
    """``out = src * scale`` in out's dtype (a cast copy, then an in-place multiply: 1.3x
    faster than one mixed-type multiply, whose casts are buffered)."""
    np.copyto(out, src, casting="safe")
    if scale != 1.0:
        out *= out.dtype.type(scale)
