"""Crash-safe writes into a cache under construction.

Everything a task writes is published with ``fmt.publish`` (a temporary, fsync,
rename), data before the marker that says it is done, so a build killed at any
instant leaves only finished files or temporaries the rerun removes, and the rerun
redoes exactly the unfinished work.

Build state lives in ``CACHE/.build/``:
  scan/<i>.npz     per input file i: structure result (centres, atom count, hash) or failure
  atoms/<i>.npz    per input file i: the parsed atoms, so the write phase never re-parses
  done/<s>.npz     per shard s: the origins' crc32s and saturated-voxel count; present only
                   once the shard file is published
"""
from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np

from cache_tools import format as fmt


def build_dir(root: str | os.PathLike, *parts: str) -> Path:
    return Path(root, fmt.BUILD_DIR, *parts)


def publish_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to ``path``, crash-safely (fmt.publish)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fmt.publish(path, [buf.getbuffer()])


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_atoms(root, file_index: int, atoms) -> None:
    """A parsed structure's atoms where the write tasks read them (``atoms_path``): xyz, channel
    and, at ``--occupancy weight``, occupancy (the one layout of that file)."""
    publish_npz(atoms_path(root, file_index), xyz=atoms.xyz, channel=atoms.channel.astype(np.int8),
                **({} if atoms.occupancy is None else {"occupancy": atoms.occupancy}))


def scan_path(root, file_index: int) -> Path:
    return build_dir(root, "scan", f"{file_index}.npz")


def atoms_path(root, file_index: int) -> Path:
    return build_dir(root, "atoms", f"{file_index}.npz")


def done_path(root, shard: int) -> Path:
    return build_dir(root, "done", f"{shard}.npz")


def shard_is_done(root, layout: fmt.VoxelLayout, shard: int) -> bool:
    """A shard is done when its marker exists and its file passes the format's shard check
    (its size, and an index that accounts for it)."""
    return done_path(root, shard).exists() and layout.shard_problem(shard) is None


class ChecksumMismatch(ValueError):
    """A rewritten origin does not reproduce the checksum the build recorded for it."""


def write_shard(layout: fmt.VoxelLayout, shard: int, origin_bytes, saturated=lambda: 0,
                expected_crc32: np.ndarray | None = None, extra=lambda: {}) -> np.ndarray:
    """Write shard ``shard`` from an iterable of each origin's stored bytes; return their crc32s.

    ``saturated()`` is asked after the last origin for the count of clipped voxels, ``extra()``
    for more arrays to record with the shard (a lattice's block fills).
    With ``expected_crc32`` (a repair), an origin whose bytes differ from the recorded
    checksum aborts the write before anything is published. The crc32 covers the bytes
    as given; a compressed layout then encodes each origin with its codec (zarr's own
    implementation) and writes the index of the resulting lengths.

    The shard file is published before its done-marker, so a marker never points at
    a half-written shard.
    """
    crcs = np.zeros(layout.origins_in_shard(shard), dtype=np.uint32)
    encode = fmt.encoder(layout.codec)
    sizes: list[int] = []

    def chunks():
        count = 0
        for j, buf in enumerate(origin_bytes):
            if len(buf) != layout.origin_nbytes:
                raise ValueError(f"origin {shard * layout.origins_per_shard + j}: "
                                 f"{len(buf)} bytes, expected {layout.origin_nbytes}")
            crcs[j] = zlib.crc32(buf)
            if expected_crc32 is not None and crcs[j] != expected_crc32[j]:
                raise ChecksumMismatch(f"origin {shard * layout.origins_per_shard + j}: rebuilt bytes do "
                                       "not match the checksum recorded by the build")
            count += 1
            if encode is not None:
                buf = encode(buf)
            sizes.append(len(buf))
            yield buf
        if count != len(crcs):
            raise ValueError(f"shard {shard}: {count} origins written, expected {len(crcs)}")
        yield layout.shard_index(shard, sizes).tobytes()

    fmt.publish(layout.shard_path(shard), chunks())
    publish_npz(done_path(layout.root, shard), crc32=crcs, saturated=np.int64(saturated()), **extra())
    return crcs


def read_done(root, shard: int) -> dict[str, np.ndarray]:
    """What was recorded when the shard was published: ``crc32`` (per item), ``saturated``
    (clipped voxels), and for lattice blocks ``fill``."""
    return load_npz(done_path(root, shard))
