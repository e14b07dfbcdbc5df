"""Reading origins out of a per-origin cache's shard files, with bounded open files.

A :class:`ShardReader` is small and picklable; everything it opens lives in a per-process
:class:`ReaderState`, created on first use in each process (after a fork or an unpickle), never in
the constructor, so a DataLoader worker never inherits descriptors or maps.

Bounded resources whatever the shard count: at most ``max_maps`` shards are open at once, in
numpy tables of *slots* (a shard's map address or descriptor, where its index starts), found
for a whole batch with a few vectorized lookups; only a shard not open yet costs Python (its
open). Uncompressed shards are memory-mapped (an image is a copy from the page cache, or a
zero-copy view); compressed ones are read with ``pread`` (a shard costs a descriptor, not a map:
7x cheaper to open and drop, which a random read at PDB scale does most times). A shard pushed
out of its slot is closed when nothing uses it any more: not while a kernel call or a view
still reads it.

Batches go through one compiled call (:mod:`cache_tools.read.kernel`): origins located,
copied or decoded (zstd, checksum verified, one decompression context per thread), cast,
dequantized and rotated without Python per origin and with the GIL released, on ``threads``
threads.
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cache_tools import format as fmt
from cache_tools.read.native import native_decompress, native_is_error
from cache_tools.read.reader_state import (Descriptor, ReaderState, ThreadScratch, default_max_maps,
                                           default_threads, runs_of_shards)

_INDEX_ENTRY = struct.Struct("<QQ")  # a zarr shard index slot: offset, length (little-endian uint64)


class ShardReader:
    """Origin bytes of one cache: read one origin, read a batch into a buffer, prefetch."""

    def __init__(self, layout: fmt.VoxelLayout, verify: bool = False, max_maps: int | None = None,
                 threads: int | None = None):
        self.layout = layout
        self.verify = verify
        self.max_maps = max_maps
        self.threads = threads
        self._state: ReaderState | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None}

    def _local(self) -> ReaderState:
        state = self._state
        if state is None or state.pid != os.getpid():
            # the checksums first: a missing crc32 array raises here on every read, never
            # after a half-made state that later reads would take for a whole one
            crc = fmt.read_array(self.layout.root, fmt.CRC32) if self.verify else None
            state = self._state = ReaderState(os.getpid(), self.max_maps or default_max_maps(), self.layout.n_shards)
            state.crc = crc
        return state

    def warm(self, out_dtype: np.dtype) -> None:
        """Compile or load the kernels this reader will run, in this process (see kernel.warm_origins)."""
        from cache_tools.read import kernel

        kernel.warm_origins(self.layout.dtype, out_dtype, self.layout.codec is not None)

    def open_maps(self) -> int:
        """Shards this process holds open now, mapped or (compressed) by a descriptor (at most ``max_maps``)."""
        return int((self._local().shard_of_slot >= 0).sum())

    # --- slots -------------------------------------------------------------------------------

    def _slots(self, local: ReaderState, shards: np.ndarray, first_origin: np.ndarray,
               keep: np.ndarray | None = None) -> np.ndarray:
        """Slots of ``shards`` (unique, at most max_maps), opening those not open; ``local.lock`` held.
        ``first_origin``: an origin of each shard, to name it in errors; ``keep``: slots the
        caller also uses (never given to another shard now)."""
        slots = local.slot_of_shard[shards]
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            keep_mask = np.zeros(local.max_maps, bool)
            keep_mask[slots[slots >= 0]] = True
            if keep is not None:
                keep_mask[keep] = True
            keep = keep_mask
            free = np.flatnonzero(local.shard_of_slot < 0)
            evictable = np.flatnonzero((local.shard_of_slot >= 0) & ~keep)
            victims = np.concatenate([free, evictable[np.argsort(local.last_used[evictable], kind="stable")]])
            for k, i in enumerate(missing.tolist()):
                slot = int(victims[k])
                self._install(local, slot, int(shards[i]), int(first_origin[i]))
                slots[i] = slot
        local.tick += 1
        local.last_used[slots] = local.tick
        return slots

    def _install(self, local: ReaderState, slot: int, shard: int, origin: int) -> None:
        """Open ``shard`` into ``slot`` (closing what the slot held once nothing reads it)."""
        old = int(local.shard_of_slot[slot])
        if old >= 0:
            local.slot_of_shard[old] = -1
            if local.calls:
                local.retired.append(local.holders[slot])
        layout, path = self.layout, self.layout.shard_file(shard)
        try:
            if layout.codec is not None:
                holder = Descriptor(path)
                size = os.fstat(holder.fd).st_size
            else:
                with open(path, "rb") as fh:  # the map keeps its own descriptor; this one closes
                    size = os.fstat(fh.fileno()).st_size
                    holder = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) if size else None
        except FileNotFoundError:
            local.shard_of_slot[slot], local.holders[slot], local.images[slot] = -1, None, None
            raise fmt.CacheError(f"{self._where(origin)} is missing") from None
        data_end = size - layout.index_nbytes
        if layout.codec is not None and data_end < 0:
            local.shard_of_slot[slot], local.holders[slot], local.images[slot] = -1, None, None
            raise fmt.CacheError(f"{self._where(origin)}: {size} bytes, too short for its {layout.index_nbytes}-byte "
                                 "shard index (damaged cache; run cache-tools check)")
        if layout.codec is None and size != layout.shard_nbytes(shard):
            local.shard_of_slot[slot], local.holders[slot], local.images[slot] = -1, None, None
            raise fmt.CacheError(f"{self._where(origin)} is truncated or damaged ({size} bytes, expected "
                                 f"{layout.shard_nbytes(shard)})")
        local.holders[slot] = holder
        if layout.codec is None:
            count = layout.origins_in_shard(shard)
            local.images[slot] = np.frombuffer(holder, layout.dtype, count=count * layout.origin_nbytes //
                                               layout.dtype.itemsize).reshape(count, *layout.image_shape)
        local.shard_of_slot[slot], local.slot_of_shard[shard] = shard, slot
        local.data_end[slot] = data_end
        if layout.codec is not None:
            local.fd[slot], local.base[slot] = holder.fd, 0
        else:
            local.fd[slot] = -1
            local.base[slot] = np.frombuffer(holder, np.uint8).ctypes.data if holder is not None else 0

    def _where(self, origin: int) -> str:
        """How errors name an origin: the cache, the origin, its shard file."""
        return (f"{self.layout.root}: origin {origin}: shard file "
                f"{self.layout.shard_file(origin // self.layout.origins_per_shard)}")

    # --- one origin --------------------------------------------------------------------------

    def _slot(self, local: ReaderState, origin: int) -> int:
        """The slot of the origin's shard, opened if need be: the per-item path (an array
        lookup when the shard is open). The caller takes what it needs from the slot at once."""
        shard = origin // self.layout.origins_per_shard
        slot = int(local.slot_of_shard[shard])
        if slot < 0:
            with local.lock:
                return int(self._slots(local, np.array([shard]), np.array([origin]))[0])
        local.tick += 1
        local.last_used[slot] = local.tick
        return slot

    def _holder(self, local: ReaderState, origin: int):
        """(holder, where its index starts) of the origin's shard."""
        while True:
            slot = self._slot(local, origin)
            holder, end = local.holders[slot], int(local.data_end[slot])
            if local.shard_of_slot[slot] == origin // self.layout.origins_per_shard:  # not replaced meanwhile
                return holder, end

    def _decode_one(self, local: ReaderState, origin: int, out: np.ndarray, address: int | None = None) -> None:
        """A compressed origin decoded into ``out`` (C-contiguous, its stored bytes' size):
        two preads and one call of libzstd with this thread's reused context."""
        layout = self.layout
        holder, data_end = self._holder(local, origin)
        j = origin % layout.origins_per_shard
        raw = os.pread(holder.fd, fmt.INDEX_ENTRY_NBYTES, data_end + fmt.INDEX_ENTRY_NBYTES * j)
        if len(raw) != fmt.INDEX_ENTRY_NBYTES:
            self._raise(origin, _kernel().SHORT_READ, 0)
        offset, length = _INDEX_ENTRY.unpack(raw)
        if offset == fmt.EMPTY_INDEX_ENTRY:
            self._raise(origin, _kernel().ABSENT, 0)
        if offset > data_end or length > data_end or offset + length > data_end:
            self._raise(origin, _kernel().PAST_DATA, offset)
        frame = os.pread(holder.fd, length, offset)
        scratch = local.thread()
        if scratch.dctx is None:
            from cache_tools.read.native import DecompressionContext

            scratch.dctx = DecompressionContext()
        result = native_decompress()(scratch.dctx.address, out.ctypes.data if address is None else address,
                                     layout.origin_nbytes, frame, len(frame))
        if native_is_error()(result):
            self._raise(origin, _kernel().UNDECODABLE, result)
        if result != layout.origin_nbytes:
            self._raise(origin, _kernel().WRONG_SIZE, result)

    def view(self, origin: int) -> np.ndarray:
        """The stored image of ``origin`` (stored dtype, image shape), valid until this thread's next read.

        Uncompressed: a zero-copy view of the map (it keeps the map alive). Compressed:
        decoded into this thread's scratch, which the next read on the same thread overwrites.
        """
        layout, local = self.layout, self._local()
        if layout.codec is None:
            while True:
                slot = self._slot(local, origin)
                images = local.images[slot]
                if local.shard_of_slot[slot] == origin // layout.origins_per_shard:  # not replaced meanwhile
                    break
            stored = images[origin % layout.origins_per_shard]
        else:
            stored = self._stage(local.thread(), 1)[0].view(layout.dtype).reshape(layout.image_shape)
            self._decode_one(local, origin, stored)
        if self.verify:
            self._check_crc(local, origin, stored)
        return stored

    def stored_bytes(self, origin: int) -> bytes:
        """The origin's bytes as the build encoded them before compression (what its crc32 covers)."""
        return self.view(origin).tobytes()

    def _check_crc(self, local: ReaderState, origin: int, stored: np.ndarray) -> None:
        if zlib.crc32(stored) != int(local.crc[origin]):
            raise fmt.CacheError(f"{self.layout.root}: origin {origin}: checksum mismatch in "
                                 f"{self.layout.shard_file(origin // self.layout.origins_per_shard)} "
                                 "(damaged cache; run cache-tools check)")

    # --- many origins ------------------------------------------------------------------------

    def _stage(self, scratch: ThreadScratch, n: int) -> np.ndarray:
        """This thread's stage of ``n`` stored images, as (n, origin bytes) uint8."""
        need = n * self.layout.origin_nbytes
        if scratch.stage.size < need:
            scratch.stage = np.empty(need, np.uint8)
        return scratch.stage[:need].reshape(n, -1)

    def read_stored(self, origins: np.ndarray, dst: np.ndarray) -> None:
        """``dst[k]`` (uint8 rows of an origin's bytes) = stored bytes of ``origins[k]``, one compiled
        call per run of at most ``max_maps`` shards. Raises CacheError naming the first bad origin."""
        from cache_tools.read import kernel

        layout, local = self.layout, self._local()
        scratch = local.thread()
        if layout.codec is not None:
            if scratch.dctx is None:
                from cache_tools.read.native import DecompressionContext

                scratch.dctx = DecompressionContext()
            if scratch.frame.size == 0:  # a frame is at most ZSTD_compressBound(an image)
                scratch.frame = np.empty(layout.origin_nbytes + (layout.origin_nbytes >> 7) + 1024, np.uint8)
        shards, rows = np.divmod(origins, layout.origins_per_shard)
        parts = [slice(0, len(origins))] if len(origins) <= local.max_maps else runs_of_shards(shards, local.max_maps)
        for part in parts:
            with local.lock:  # slots found with array lookups; only a shard not open yet costs Python
                slots = local.slot_of_shard[shards[part]]
                missing = slots < 0
                if missing.any():
                    unique, first = np.unique(shards[part][missing], return_index=True)
                    self._slots(local, unique, origins[part][missing][first], keep=slots[~missing])
                    slots = local.slot_of_shard[shards[part]]
                local.tick += 1
                local.last_used[slots] = local.tick
                # the tables as they are now: another thread may give a slot to another shard meanwhile
                base, fd, end = local.base.copy(), local.fd.copy(), local.data_end.copy()
                local.calls += 1
            n = len(slots)
            status = np.empty(n, np.int64)
            detail = np.zeros(n, np.uint64)
            try:
                failed = kernel.read_origins(slots.astype(np.int64), rows[part], base, fd, end, layout.origin_nbytes,
                                             layout.codec is not None,
                                             scratch.dctx.address if scratch.dctx is not None else 0,
                                             scratch.frame, scratch.entry, dst[part], status, detail)
            finally:
                with local.lock:
                    local.calls -= 1
                    if not local.calls:
                        local.retired.clear()
            if failed:
                k = int(np.flatnonzero(status)[0])
                self._raise(int(origins[part][k]), int(status[k]), int(detail[k]))

    def _raise(self, origin: int, status: int, detail: int):
        """The CacheError for a kernel status of ``origin`` (one line: cache, origin, file, why)."""
        from cache_tools.read import kernel
        from cache_tools.read.native import zstd_error

        file = self.layout.shard_file(origin // self.layout.origins_per_shard)
        # a cut file reads frame bytes as its index: anything may follow; name the cause (error path only)
        problem = self.layout.shard_problem(origin // self.layout.origins_per_shard)
        if problem is not None and problem[0] == "truncated-shard":
            raise fmt.CacheError(f"{self._where(origin)}: {problem[1]} (damaged cache; run cache-tools check)")
        if status == kernel.UNDECODABLE:
            raise fmt.CacheError(f"{self.layout.root}: origin {origin}: compressed bytes in {file} do not decode "
                                 f"({zstd_error(detail)}; damaged cache, run cache-tools check)")
        if status == kernel.WRONG_SIZE:
            raise fmt.CacheError(f"{self.layout.root}: origin {origin}: compressed bytes in {file} decode to "
                                 f"{detail} bytes, not the {self.layout.origin_nbytes} of an image "
                                 "(damaged cache; run cache-tools check)")
        raise fmt.CacheError(f"{self._where(origin)}: {kernel.STATUS[status]} (damaged cache; run cache-tools check)")

    def read(self, origins: np.ndarray, out: np.ndarray, which: np.ndarray | None = None,
             cube: np.ndarray | None = None, a: np.ndarray | None = None, b: np.ndarray | None = None) -> None:
        """``out[k] = a[c] * rotate(image of origins[k], stored rotation which[k], cube rotation
        cube[k]) + b[c]``, cast to out's dtype; None: no rotation, a = 1, b = 0.

        One pass: bytes land in ``out`` directly when nothing else is to be done (same dtype,
        no rotation, no scaling), else in a per-thread stage that one compiled pass casts,
        scales and rotates into ``out``. Split over ``threads`` threads (kernels release the GIL).
        """
        n = len(origins)
        if n == 0:
            return
        plain = (which is None or not which.any()) and (cube is None or not cube.any()) and \
            a is None and b is None and out.dtype == self.layout.dtype and len(self.layout.image_shape) == 4
        if self.verify:
            self._read_verified(origins, out, which, cube, a, b)
            return

        def run(lo: int, hi: int) -> None:
            if plain:
                self.read_stored(origins[lo:hi], out[lo:hi].reshape(hi - lo, -1).view(np.uint8))
                return
            local = self._local()
            stage = self._stage(local.thread(), hi - lo)
            self.read_stored(origins[lo:hi], stage)
            self._finish(stage, out[lo:hi], None if which is None else which[lo:hi],
                         None if cube is None else cube[lo:hi], a, b)

        # A plain raw batch is one memory copy: a second thread only adds its hand-over.
        threads = 1 if plain and self.layout.codec is None else min(self.threads or default_threads(), max(1, n // 8))
        if threads <= 1:
            run(0, n)
            return
        local = self._local()
        if local.pool is None or local.pool_threads < threads:
            local.pool = ThreadPoolExecutor(threads, thread_name_prefix="voxel-read")
            local.pool_threads = threads
        step = -(-n // threads)
        futures = [local.pool.submit(run, lo, min(lo + step, n)) for lo in range(step, n, step)]
        run(0, min(step, n))
        for f in futures:
            f.result()

    def _finish(self, stage: np.ndarray, out: np.ndarray, which, cube, a, b) -> None:
        """Stored bytes ``stage`` (n, origin bytes) -> ``out``: cast, a * v + b, rotations."""
        from cache_tools.read import kernel
        from cache_tools.read.rotations import FLIPS, PERMS, rotate_view

        layout, n = self.layout, len(out)
        shape = layout.image_shape if len(layout.image_shape) == 5 else (1, *layout.image_shape)
        images = stage.view(layout.dtype).reshape(n, *shape)
        n_channels = out.shape[1]
        which = np.zeros(n, np.int64) if which is None else np.asarray(which, np.int64)
        cube = np.zeros(n, np.int64) if cube is None else np.asarray(cube, np.int64)
        a = np.ones(n_channels, np.float32) if a is None else np.asarray(a, np.float32)
        b = np.zeros(n_channels, np.float32) if b is None else np.asarray(b, np.float32)
        if layout.dtype == np.float16 or out.dtype == np.float16:  # numba has no float16 on the CPU
            for k in range(n):
                image = rotate_view(images[k, which[k]], int(cube[k])).astype(np.float32)
                np.copyto(out[k], image * a[:, None, None, None] + b[:, None, None, None], casting="unsafe")
            return
        kernel.finish_cf(images, which, cube, PERMS, FLIPS, a, b, out)

    def _read_verified(self, origins, out, which, cube, a, b) -> None:
        """verify=True: each origin's stored bytes checked against its crc32 before use."""
        local = self._local()
        for k, origin in enumerate(origins.tolist()):
            stored = self.view(origin)
            self._check_crc(local, origin, stored)
            stage = np.ascontiguousarray(stored).reshape(1, -1).view(np.uint8)
            self._finish(stage, out[k:k + 1], None if which is None else which[k:k + 1],
                         None if cube is None else cube[k:k + 1], a, b)

    def read_into(self, origin: int, out: np.ndarray, scale: float = 1.0, address: int | None = None) -> None:
        """``out = image of origin * scale`` (cast to out's dtype): the per-item path, no compiled
        call (a call's set-up costs more than Python here); compressed bytes of out's dtype
        decode straight into it (at ``address``, out's data pointer, if the caller has it:
        numpy's ``out.ctypes.data`` costs 0.8 µs, a tensor's ``data_ptr()`` 0.05)."""
        layout = self.layout
        if layout.codec is not None and not self.verify and out.dtype == layout.dtype and scale == 1.0 \
                and out.flags.c_contiguous:
            self._decode_one(self._local(), origin, out, address)
            return
        scaled_copy(self.view(origin), out, scale)

    def gather(self, origins: np.ndarray, out: np.ndarray, scale: float = 1.0) -> None:
        """``out[k] = image of origins[k] * scale`` (cast to out's dtype)."""
        a = None if scale == 1.0 else np.full(out.shape[1], scale, np.float32)
        self.read(np.asarray(origins, np.int64), out, a=a)

    def prefetch(self, sorted_origins: np.ndarray) -> None:
        """Ask the kernel to read these origins' bytes now, in parallel (MADV_WILLNEED, or
        POSIX_FADV_WILLNEED on a compressed shard's descriptor).

        The kernel reads exactly these ranges, at once, instead of faulting page by page
        with 128 KiB of read-around each time, which floods a memory-capped page cache
        with neighbours nobody asked for (benchmarks/cold_reads.py, loader_memory.py
        --memory-cap). On a warm cache the kernel still walks every page of the range,
        hence only for caches that do not fit.
        """
        layout, local = self.layout, self._local()
        per_shard, nbytes = layout.origins_per_shard, layout.origin_nbytes
        breaks = np.flatnonzero(np.diff(sorted_origins) != 1) + 1
        for run in np.split(sorted_origins, breaks):
            first, last = int(run[0]), int(run[-1])
            for shard in range(first // per_shard, last // per_shard + 1):
                lo = max(first, shard * per_shard) - shard * per_shard
                hi = min(last, shard * per_shard + per_shard - 1) - shard * per_shard + 1
                with local.lock:
                    slot = int(self._slots(local, np.array([shard]), np.array([shard * per_shard + lo]))[0])
                    holder = local.holders[slot]
                    data_end = int(local.data_end[slot])
                if layout.codec is None:
                    start, stop = lo * nbytes, hi * nbytes
                else:
                    step = fmt.INDEX_ENTRY_NBYTES
                    index = np.frombuffer(os.pread(holder.fd, step * (hi - lo), data_end + step * lo),
                                          "<u8").reshape(-1, 2)
                    present = index[index[:, 0] != fmt.EMPTY_INDEX_ENTRY]
                    if not len(present):
                        continue
                    start, stop = int(present[:, 0].min()), min(int((present[:, 0] + present[:, 1]).max()), data_end)
                start -= start % mmap.PAGESIZE
                if stop <= start:
                    continue
                if layout.codec is None:
                    holder.madvise(mmap.MADV_WILLNEED, start, stop - start)
                else:
                    os.posix_fadvise(holder.fd, start, stop - start, os.POSIX_FADV_WILLNEED)


def _kernel():
    from cache_tools.read import kernel

    return kernel


def scaled_copy(src: np.ndarray, out: np.ndarray, scale: float) -> None:
    """``out = src * scale`` in out's dtype (a cast copy, then an in-place multiply)."""
    np.copyto(out, src, casting="safe")
    if scale != 1.0:
        out *= out.dtype.type(scale)
