"""The compiled read kernels: every byte a Dataset returns goes through here.

One job: turn stored bytes into the images of a batch, in compiled code with the GIL released
(``@njit(nogil=True)``), so that a batch costs no Python per image and the caller's threads
run in parallel. Both layouts are served:

``read_origins``  per-origin layout: each origin's bytes (a zstd frame read with ``pread``, or
                  raw bytes of a memory-mapped shard) decoded or copied into a stored-dtype stage
                  (or straight into the batch when nothing is left to do);
``cut_views``     lattice layout: views of any size at any lattice point, each a gather of
                  contiguous runs from the blocks it touches (raw blocks in memory-mapped shards,
                  or zstd blocks decoded through a small per-thread cache of decoded blocks),
                  channel-last;
``finish_cf``     stored values -> the batch: cast, ``a[c] * v + b[c]`` (dequantization and
``finish_cl``     normalization in one pass) and a cube rotation, channel-first or channel-last.

Errors are returned, never hidden: a status per item (``STATUS``), the caller raises.
Everything jitted lives in this one file: numba's cache checks only the defining file.
BENCHMARKS.md "Read kernels" has the measurements behind each choice.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from cache_tools.read import native

native.register()

OK, SHORT_READ, ABSENT, PAST_DATA, WRONG_SIZE, UNDECODABLE = range(6)
STATUS = {SHORT_READ: "truncated (the shard file is shorter than its index says)",
          ABSENT: "marked absent in the shard index (the build writes every item)",
          PAST_DATA: "its shard index entry points past the data",
          WRONG_SIZE: "decodes to the wrong number of bytes",
          UNDECODABLE: "does not decode"}
EMPTY = np.uint64(2**64 - 1)

_u = types.uintp
_zstd_decompress = types.ExternalFunction("ZSTD_decompressDCtx", _u(_u, _u, _u, _u, _u))
_zstd_is_error = types.ExternalFunction("ZSTD_isError", types.uint32(_u))
_pread = types.ExternalFunction("pread", types.intp(types.int32, _u, _u, types.int64))


def _jit(function):
    """@njit(nogil=True, cache=True), or without the cache where numba has nowhere to write one
    (a read-only install with no writable NUMBA_CACHE_DIR or home: numba raises at decoration)."""
    try:
        return nb.njit(nogil=True, cache=True)(function)
    except RuntimeError:
        return nb.njit(nogil=True)(function)


@intrinsic
def _memcpy(typingctx, dst, src, n):
    """memcpy(dst address, src address, bytes), addresses as integers."""
    def codegen(context, builder, signature, args):
        byte_pointer = ir.IntType(8).as_pointer()
        count = args[2] if args[2].type.width == 64 else builder.zext(args[2], ir.IntType(64))
        cgutils.raw_memcpy(builder, builder.inttoptr(args[0], byte_pointer),
                           builder.inttoptr(args[1], byte_pointer), count, 1)
        return context.get_dummy_value()
    return types.void(dst, src, n), codegen


@intrinsic
def _load_u64(typingctx, address):
    """The little-endian uint64 at an address (a shard index entry in a mapped file)."""
    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(pointer, align=1)
    return types.uint64(address), codegen


# --- per-origin layout -------------------------------------------------------------------------

@_jit
def read_origins(slot, row, base, fd, data_end, nbytes, compressed, dctx, frame, entry, dst, status, detail):
    """Bytes of origin i (row ``row[i]`` of the shard held in slot ``slot[i]``) -> ``dst[i]``.

    Raw: copied from the shard's map (``base[slot]``). Compressed: its shard index entry and
    frame read with pread from ``fd[slot]`` (the index starts at ``data_end[slot]``), decoded
    into ``dst[i]`` by ``ZSTD_decompressDCtx`` (checksum verified). ``frame``: scratch of at
    least the largest frame; ``entry``: 2 uint64 of scratch. Returns the number of failures.
    """
    failed = 0
    for i in range(slot.shape[0]):
        s, j = slot[i], row[i]
        out = dst[i].ctypes.data
        status[i] = OK
        if not compressed:
            _memcpy(out, base[s] + j * nbytes, nbytes)
            continue
        got = _pread(np.int32(fd[s]), entry.ctypes.data, 16, data_end[s] + 16 * j)
        if got != 16:
            status[i], failed = SHORT_READ, failed + 1
            continue
        offset, length = entry[0], entry[1]
        if offset == EMPTY:
            status[i], failed = ABSENT, failed + 1
            continue
        end = data_end[s]
        if offset > end or length > end or offset + length > end or length > frame.shape[0]:
            status[i], detail[i], failed = PAST_DATA, offset, failed + 1
            continue
        got = _pread(np.int32(fd[s]), frame.ctypes.data, length, offset)
        if got != length:
            status[i], failed = SHORT_READ, failed + 1
            continue
        result = _zstd_decompress(dctx, out, nbytes, frame.ctypes.data, length)
        if _zstd_is_error(result):
            status[i], detail[i], failed = UNDECODABLE, result, failed + 1
        elif result != nbytes:
            status[i], detail[i], failed = WRONG_SIZE, result, failed + 1
    return failed


@nb.njit(inline="always")
def _walk(k, perm, flip, length, strides):
    """Start offset and per-output-axis steps in a source whose spatial strides (in elements)
    are ``strides``, so that output voxel (x, y, z) of cube rotation ``k`` reads source element
    start + x * step[0] + y * step[1] + z * step[2] (as ``rotate_view`` defines the rotation)."""
    start = 0
    step = np.empty(3, np.intp)
    for d in range(3):
        stride = strides[perm[k, d]]
        if flip[k, d]:
            start += (length - 1) * stride
            step[d] = -stride
        else:
            step[d] = stride
    return start, step


@_jit
def finish_cf(stage, which, cube, perm, flip, a, b, out):
    """out[i] = a[c] * rotate(stage[i, which[i]]) + b[c] in out's dtype, channel-first images
    (C, L, L, L); ``stage`` (n, R, C, L, L, L) stored values, ``which[i]`` the stored rotation,
    ``cube[i]`` the cube rotation (``perm``/``flip``: cache_tools.read.rotations; 0 = identity)."""
    n_channels, length = out.shape[1], out.shape[2]
    strides = np.array([length * length, length, 1], np.intp)
    cell = length * length * length
    for i in range(out.shape[0]):
        start, step = _walk(cube[i], perm, flip, length, strides)
        for c in range(n_channels):
            src, dst = stage[i, which[i], c].reshape(-1), out[i, c].reshape(-1)
            ac, bc = a[c], b[c]
            if cube[i] == 0:
                for t in range(cell):
                    dst[np.uintp(t)] = ac * np.float32(src[np.uintp(t)]) + bc
                continue
            t = 0
            for x in range(length):
                for y in range(length):
                    offset = start + x * step[0] + y * step[1]
                    for z in range(length):
                        dst[np.uintp(t)] = ac * np.float32(src[np.uintp(offset + z * step[2])]) + bc
                        t += 1
    return 0


# --- lattice layout ----------------------------------------------------------------------------

@_jit
def cut_views(lattice, corner, n, grid, map_start, block_map, base, data_end, per_shard, edge, n_channels,
              itemsize, compressed, dctx, zero, frame, slots, key, age, pin, ways, clock, scratch, dst,
              status, detail):
    """Channel-last views (n, n, n, C) of stored values -> ``dst[i]`` (bytes): the view of
    lattice ``lattice[i]`` whose low corner is lattice voxel ``corner[i]``.

    Blocks live in mapped shard files (``base``; ``per_shard`` blocks each). Raw blocks are
    copied from the maps. zstd blocks are decoded through this thread's cache of decoded
    blocks (``slots`` rows, ``ways``-way set-associative, least recently used out, rows a view
    uses pinned by ``clock``), or into ``scratch`` rows when every way of a set is pinned.
    A block outside the lattice's map, or not stored, reads as ``zero``.
    """
    block_nbytes = edge * edge * edge * n_channels * itemsize
    row_nbytes = edge * n_channels * itemsize
    span = (n + 2 * edge - 2) // edge
    table = np.empty((span, span, span), np.uintp)
    n_slots = key.shape[0]
    n_sets = n_slots // ways
    failed = 0
    for i in range(lattice.shape[0]):
        lat = lattice[i]
        status[i] = OK
        clock[0] += 1
        used_scratch = 0
        nx, ny, nz = grid[lat, 3], grid[lat, 4], grid[lat, 5]
        rx, ry, rz = corner[i, 0] - grid[lat, 0], corner[i, 1] - grid[lat, 1], corner[i, 2] - grid[lat, 2]
        bx0, by0, bz0 = rx // edge, ry // edge, rz // edge
        ox, oy, oz = rx - bx0 * edge, ry - by0 * edge, rz - bz0 * edge
        tx, ty, tz = (ox + n + edge - 1) // edge, (oy + n + edge - 1) // edge, (oz + n + edge - 1) // edge
        for p in range(tx):
            for q in range(ty):
                for r in range(tz):
                    gx, gy, gz = bx0 + p, by0 + q, bz0 + r
                    address = zero.ctypes.data
                    if 0 <= gx < nx and 0 <= gy < ny and 0 <= gz < nz:
                        block = block_map[map_start[lat] + (gx * ny + gy) * nz + gz]
                        if block >= 0:
                            shard, j = block // per_shard, block % per_shard
                            if not compressed:
                                address = base[shard] + j * block_nbytes
                            else:
                                first = (block % n_sets) * ways
                                hit, victim, oldest = -1, -1, 1 << 62
                                for w in range(ways):
                                    s = first + w
                                    if key[s] == block:
                                        hit = s
                                        break
                                    if pin[s] != clock[0] and age[s] < oldest:
                                        oldest, victim = age[s], s
                                if hit >= 0:
                                    age[hit], pin[hit] = clock[0], clock[0]
                                    address = slots[hit].ctypes.data
                                else:
                                    if victim >= 0:
                                        target = slots[victim].ctypes.data
                                    else:
                                        target = scratch[used_scratch].ctypes.data
                                        used_scratch += 1
                                    entry = base[shard] + data_end[shard] + 16 * j
                                    offset, length = _load_u64(entry), _load_u64(entry + 8)
                                    end = data_end[shard]
                                    if offset == EMPTY:
                                        code = ABSENT
                                    elif offset > end or length > end or offset + length > end:
                                        code = PAST_DATA
                                    else:
                                        result = _zstd_decompress(dctx, target, block_nbytes,
                                                                  base[shard] + offset, length)
                                        code = OK
                                        if _zstd_is_error(result):
                                            code = UNDECODABLE
                                        elif result != block_nbytes:
                                            code = WRONG_SIZE
                                    if code != OK:
                                        if status[i] == OK:
                                            status[i], detail[i] = code, block
                                            failed += 1
                                        target = zero.ctypes.data
                                    elif victim >= 0:
                                        key[victim], age[victim], pin[victim] = block, clock[0], clock[0]
                                    address = target
                    table[p, q, r] = address
        out = dst[i].ctypes.data
        for x in range(n):
            bx, ix = (ox + x) // edge, (ox + x) % edge
            for y in range(n):
                by, iy = (oy + y) // edge, (oy + y) % edge
                z, iz, k = 0, oz, 0
                out_row = out + (x * n + y) * n * n_channels * itemsize
                src_row = (ix * edge + iy) * row_nbytes
                while z < n:
                    run = min(edge - iz, n - z)
                    _memcpy(out_row + z * n_channels * itemsize,
                            table[bx, by, k] + src_row + iz * n_channels * itemsize, run * n_channels * itemsize)
                    z += run
                    iz = 0
                    k += 1
    return failed


@_jit
def finish_cl(stage, cube, perm, flip, a, b, out):
    """out[i] = a[c] * rotate(stage[i]) + b[c] in out's dtype, channel-last views (N, N, N, C)."""
    length, n_channels = out.shape[1], out.shape[4]
    strides = np.array([length * length * n_channels, length * n_channels, n_channels], np.intp)
    for i in range(out.shape[0]):
        src, dst = stage[i].reshape(-1), out[i].reshape(-1)
        if cube[i] == 0:
            for t in range(dst.shape[0]):
                c = t % n_channels
                dst[np.uintp(t)] = a[c] * np.float32(src[np.uintp(t)]) + b[c]
            continue
        start, step = _walk(cube[i], perm, flip, length, strides)
        t = 0
        for x in range(length):
            for y in range(length):
                offset = start + x * step[0] + y * step[1]
                for z in range(length):
                    voxel = offset + z * step[2]
                    for c in range(n_channels):
                        dst[np.uintp(t)] = a[c] * np.float32(src[np.uintp(voxel + c)]) + b[c]
                        t += 1
    return 0


@_jit
def view_fill(lattice, corner, n, grid, map_start, block_map, block_fill, edge):
    """Estimated fraction of non-empty voxels in each view: the fills of the blocks it overlaps,
    each weighted by the fraction of the block inside the view (a view's own count would need
    its voxels; this needs only the build's per-block counts)."""
    out = np.zeros(lattice.shape[0], np.float64)
    volume = float(edge) ** 3
    for i in range(lattice.shape[0]):
        lat = lattice[i]
        nx, ny, nz = grid[lat, 3], grid[lat, 4], grid[lat, 5]
        lo = corner[i] - grid[lat, :3]
        total = 0.0
        for gx in range(max(0, lo[0] // edge), min(nx, (lo[0] + n - 1) // edge + 1)):
            wx = min(lo[0] + n, (gx + 1) * edge) - max(lo[0], gx * edge)
            for gy in range(max(0, lo[1] // edge), min(ny, (lo[1] + n - 1) // edge + 1)):
                wy = min(lo[1] + n, (gy + 1) * edge) - max(lo[1], gy * edge)
                for gz in range(max(0, lo[2] // edge), min(nz, (lo[2] + n - 1) // edge + 1)):
                    block = block_map[map_start[lat] + (gx * ny + gy) * nz + gz]
                    if block >= 0:
                        wz = min(lo[2] + n, (gz + 1) * edge) - max(lo[2], gz * edge)
                        total += block_fill[block] * (wx * wy * wz / volume)
        out[i] = total / (float(n) ** 3)
    return out


def warm_origins(stored: np.dtype, out: np.dtype, compressed: bool) -> None:
    """Compile (or load from numba's cache) the per-origin kernels for these dtypes, now: in the
    process that makes the Dataset, so forked DataLoader workers inherit them (a worker that
    compiled for itself would hold ~80 MiB more, each)."""
    from cache_tools.read.rotations import FLIPS, PERMS

    one = np.zeros(1, np.int64)
    dst = np.zeros((1, 8), np.uint8)
    read_origins(one, one, np.zeros(1, np.uintp) + np.uintp(dst.ctypes.data), np.full(1, -1, np.int64), one, 0,
                 False, 0, np.zeros(1, np.uint8), np.zeros(2, np.uint64), dst, np.zeros(1, np.int64),
                 np.zeros(1, np.uint64))
    if np.dtype(stored) != np.float16 and np.dtype(out) != np.float16:
        finish_cf(np.zeros((1, 1, 1, 2, 2, 2), stored), one, one, PERMS, FLIPS, np.ones(1, np.float32),
                  np.zeros(1, np.float32), np.zeros((1, 1, 2, 2, 2), out))
