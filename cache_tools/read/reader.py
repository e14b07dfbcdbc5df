"""Reading origins out of a cache's shard files, with bounded open files and maps.

A :class:`ShardReader` is small and picklable; everything it opens lives in a
per-process :class:`_Local`, created on first use in each process (after a fork or
an unpickle), never in the constructor, so a DataLoader worker never inherits maps.

Bounded resources whatever the shard count: shards are opened on demand and kept in
an LRU of at most ``max_maps`` (one descriptor each: Python 3.11's mmap keeps a dup'd
one per map). An evicted shard is never closed by hand: dropping the reference
unmaps (or closes) it once the last view into it (or a batch's pending decode) is gone.

Uncompressed shards are memory-mapped: an image is a zero-copy view of the page cache.
Compressed origins (``--compression zstd``) are read with two ``pread`` calls (the
origin's 16-byte zarr shard index entry, then its frame) and decoded straight into
the caller's buffer, or through one scratch buffer per thread when a cast is needed;
the page cache is shared just the same, and a shard costs a descriptor, not a map
(7x cheaper to open and drop, which a random read at PDB scale does most times).
Batches decode on a few threads (pread and numcodecs' zstd release the GIL), created
lazily per process.
"""
from __future__ import annotations

import mmap
import os
import resource
import struct
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cache_tools import format as fmt


_INDEX_ENTRY = struct.Struct("<QQ")  # a zarr shard index slot: offset, length (little-endian uint64)


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


class _Descriptor:
    """An open shard file, closed when the last reference goes (an evicted shard may still
    be read by a batch's decode threads, as an evicted map stays valid under its views)."""

    fd = -1  # if the open fails, __del__ still runs

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


@dataclass
class _Shard:
    """One open shard. Uncompressed: its map and its origins as an array (views are the
    images). Compressed: its descriptor and where its index starts; origins are read
    with pread, not mapped: a map costs ~190 µs to make and drop, 7x a descriptor's, and
    at PDB scale a random read opens a shard most times (BENCHMARKS.md)."""
    data: np.ndarray | None             # (n, *image_shape) stored dtype, uncompressed
    mm: mmap.mmap | None = None         # uncompressed: the map under data
    file: _Descriptor | None = None     # compressed
    index_start: int = 0                # compressed: bytes before the (S, 2) uint64 index


@dataclass
class _Local:
    """What one process has opened: never pickled, never inherited across a fork."""
    pid: int
    max_maps: int
    maps: OrderedDict = field(default_factory=OrderedDict)   # shard -> _Shard, least recent first
    scratch: threading.local = field(default_factory=threading.local)
    crc: np.ndarray | None = None
    pool: ThreadPoolExecutor | None = None
    pool_threads: int = 0  # threads of ``pool``
    lock: threading.Lock = field(default_factory=threading.Lock)  # the LRU, for callers' threads


class ShardReader:
    """Origin bytes of one cache: view/copy one origin, gather many into a buffer, prefetch."""

    def __init__(self, layout: fmt.VoxelLayout, verify: bool = False, max_maps: int | None = None,
                 threads: int | None = None):
        self.layout = layout
        self.verify = verify
        self.max_maps = max_maps
        self.threads = threads
        self._decode = _decoder(layout.codec)
        self._state: _Local | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None, "_decode": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._decode = _decoder(self.layout.codec)

    def _local(self) -> _Local:
        state = self._state
        if state is None or state.pid != os.getpid():
            state = self._state = _Local(os.getpid(), self.max_maps or default_max_maps())
            if self.verify:
                state.crc = fmt.read_array(self.layout.root, fmt.CRC32)
        return state

    def open_maps(self) -> int:
        """Shards this process holds open now, mapped or (compressed) by a descriptor (at most ``max_maps``)."""
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
        path = layout.shard_file(shard)
        where = self._where(origin)
        try:
            if layout.codec is not None:
                file = _Descriptor(path)
                size = os.fstat(file.fd).st_size
            else:
                with open(path, "rb") as fh:  # the map keeps its own descriptor; this one closes
                    size = os.fstat(fh.fileno()).st_size
                    mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) if size else None
        except FileNotFoundError:
            raise fmt.CacheError(f"{where} is missing") from None
        if layout.codec is not None:
            index_start = size - layout.index_nbytes
            if index_start < 0:
                raise fmt.CacheError(f"{where}: {size} bytes, too short for its {layout.index_nbytes}-byte "
                                     "shard index (damaged cache; run cache-tools check)")
            # Entries are checked as they are read (_decode_into), not all here: at PDB scale
            # a random read opens a shard most times, and checking 7k entries cost 3x the read.
            return _Shard(None, file=file, index_start=index_start)
        if size != layout.shard_nbytes(shard):
            raise fmt.CacheError(f"{where} is truncated or damaged ({size} bytes, expected "
                                 f"{layout.shard_nbytes(shard)})")
        n = layout.origins_in_shard(shard)
        count = n * layout.origin_nbytes // layout.dtype.itemsize
        return _Shard(np.frombuffer(mm, dtype=layout.dtype, count=count).reshape(n, *layout.image_shape), mm)

    def _where(self, origin: int) -> str:
        """How errors name an origin: the cache, the origin, its shard file."""
        return (f"{self.layout.root}: origin {origin}: shard file "
                f"{self.layout.shard_file(origin // self.layout.origins_per_shard)}")

    # --- one origin ------------------------------------------------------------------------

    def view(self, origin: int) -> np.ndarray:
        """The stored image of ``origin`` (stored dtype, image shape), valid until this thread's next read.

        Uncompressed: a zero-copy view of the map. Compressed: decoded into this
        thread's scratch buffer, which the next read on the same thread overwrites.
        """
        local = self._local()
        shard, j = divmod(origin, self.layout.origins_per_shard)
        entry = self._shard(local, shard, origin)
        if entry.file is None:
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
        if entry.file is None:
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
        fd = entry.file.fd
        raw = os.pread(fd, fmt.INDEX_ENTRY_NBYTES, entry.index_start + fmt.INDEX_ENTRY_NBYTES * j)
        if len(raw) != fmt.INDEX_ENTRY_NBYTES:  # the file shrank after it was opened
            raise fmt.CacheError(f"{self._where(origin)} is truncated (damaged cache; run cache-tools check)")
        offset, nbytes = _INDEX_ENTRY.unpack(raw)
        if offset == fmt.EMPTY_INDEX_ENTRY:  # absent inner chunk: zarr's fill value
            out[...] = 0
            return
        problem = fmt.entry_problem(offset, nbytes, entry.index_start)
        if problem:
            raise fmt.CacheError(f"{self._where(origin)}: its index entry {problem} (run cache-tools check)")
        try:
            self._decode(os.pread(fd, nbytes, offset), out)
        except (RuntimeError, ValueError) as exc:
            raise fmt.CacheError(
                f"{self.layout.root}: origin {origin}: compressed bytes in "
                f"{self.layout.shard_file(origin // self.layout.origins_per_shard)} do not decode "
                f"({exc}; damaged cache, run cache-tools check)") from None

    def _check_crc(self, local: _Local, origin: int, stored: np.ndarray) -> None:
        if zlib.crc32(stored) != int(local.crc[origin]):
            raise fmt.CacheError(f"{self.layout.root}: origin {origin}: checksum mismatch in "
                                 f"{self.layout.shard_path(origin // self.layout.origins_per_shard)} "
                                 "(damaged cache; run cache-tools check)")

    # --- many origins ------------------------------------------------------------------------

    def gather(self, origins: np.ndarray, out: np.ndarray, scale: float = 1.0) -> None:
        """``out[k] = image of origins[k] * scale`` (cast to out's dtype), one pass per origin.

        Uncompressed: the origins' views in their shards' maps, concatenated into ``out``
        by one C loop (a random batch touches a shard per origin, so grouping by shard only
        adds Python work), then one scaling pass. Compressed: each origin decodes into
        its row (of ``out``, or of a stored-dtype batch cast into ``out`` by the same
        thread) on ``threads`` threads. At most ``max_maps`` shards are held at once, so
        descriptors stay bounded.
        """
        if self.verify:
            for k, origin in enumerate(origins.tolist()):
                self.read_into(origin, out[k], scale)
            return
        local = self._local()
        shards, rows = np.divmod(origins, self.layout.origins_per_shard)
        # Compressed: decode each origin into a batch of the stored dtype (``out`` itself when
        # no cast is needed); each decode thread then casts and scales its own rows (per-origin
        # casts hold the GIL and kept a second thread idle).
        direct = out.dtype == self.layout.dtype and scale == 1.0
        stage = out if direct or self.layout.codec is None else np.empty(
            (len(origins), *self.layout.image_shape), self.layout.dtype)
        for a in range(0, len(origins), local.max_maps):  # a chunk holds at most max_maps shards open
            b = min(a + local.max_maps, len(origins))
            with local.lock:
                entries = [self._shard_locked(local, shard, origin)
                           for shard, origin in zip(shards[a:b].tolist(), origins[a:b].tolist())]
            if self.layout.codec is None:  # (1, *image) views: concatenate needs no per-view reshaping
                np.concatenate([e.data[row:row + 1] for e, row in zip(entries, rows[a:b].tolist())],
                               out=out[a:b], casting="safe")
            else:
                self._decode_jobs(local, list(zip(entries, rows[a:b].tolist(), origins[a:b].tolist(), range(a, b))),
                                  stage, out, scale)
        if self.layout.codec is None and scale != 1.0:
            out *= out.dtype.type(scale)

    def _decode_jobs(self, local: _Local, jobs: list, stage: np.ndarray, out: np.ndarray, scale: float) -> None:
        """Decode consecutive-target jobs into ``stage`` on threads; each thread then casts its rows into ``out``."""
        def run(part: list) -> None:
            for entry, row, origin, target in part:
                self._decode_into(entry, row, origin, stage[target])
            if stage is not out and part:
                rows = slice(part[0][3], part[-1][3] + 1)
                scaled_copy(stage[rows], out[rows], scale)

        threads = min(self.threads or default_threads(), len(jobs))
        if threads <= 1:
            run(jobs)
            return
        if local.pool is None or local.pool_threads < threads:
            local.pool = ThreadPoolExecutor(threads, thread_name_prefix="voxel-decode")
            local.pool_threads = threads
        step = -(-len(jobs) // threads)
        futures = [local.pool.submit(run, jobs[i:i + step]) for i in range(step, len(jobs), step)]
        run(jobs[:step])
        for f in futures:
            f.result()

    def prefetch(self, sorted_origins: np.ndarray) -> None:
        """Ask the kernel to read these origins' bytes now, in parallel (MADV_WILLNEED, or
        POSIX_FADV_WILLNEED on a compressed shard's descriptor).

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
                if entry.file is None:
                    start, stop = lo * nbytes, hi * nbytes
                else:
                    step = fmt.INDEX_ENTRY_NBYTES
                    index = np.frombuffer(os.pread(entry.file.fd, step * (hi - lo), entry.index_start + step * lo),
                                          "<u8").reshape(-1, 2)
                    present = index[index[:, 0] != fmt.EMPTY_INDEX_ENTRY]
                    if not len(present):
                        continue
                    start, stop = int(present[:, 0].min()), min(int((present[:, 0] + present[:, 1]).max()),
                                                                 entry.index_start)
                start -= start % mmap.PAGESIZE
                if stop <= start:
                    continue
                if entry.file is None:
                    entry.mm.madvise(mmap.MADV_WILLNEED, start, stop - start)
                else:
                    os.posix_fadvise(entry.file.fd, start, stop - start, os.POSIX_FADV_WILLNEED)


def _decoder(codec: fmt.Codec | None):
    """(stored bytes, out array) -> None: decode one origin into ``out``, or None when uncompressed.

    numcodecs' zstd decompresses into ``out`` directly (no intermediate copy) and
    raises RuntimeError on damaged input, ValueError on a size mismatch.
    """
    if codec is None:
        return None
    from numcodecs.zstd import decompress

    return decompress


def scaled_copy(src: np.ndarray, out: np.ndarray, scale: float) -> None:
    """``out = src * scale`` in out's dtype (a cast copy, then an in-place multiply: 1.3x
    faster than one mixed-type multiply, whose casts are buffered)."""
    np.copyto(out, src, casting="safe")
    if scale != 1.0:
        out *= out.dtype.type(scale)
