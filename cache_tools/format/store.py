"""Store primitives: crash-safe files, JSON, and the single-chunk metadata arrays.

Every file of a cache is written by :func:`publish`; every metadata array is one
uncompressed zarr v3 chunk, so numpy memory-maps it without zarr.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cache_tools.format.names import (ASSEMBLY_ASYM, ATTRS_KEY, METADATA_ARRAYS, STRUCTURE_ASSEMBLY,
                                      STRUCTURE_ENTRY_ID, STRUCTURE_ID, CacheError, entry_id_from_name)

# --- crash-safe writes ------------------------------------------------------------------

# Every file of a cache is written by `publish`, through a temporary ".NAME.tmp-PID-XXXXXXXX"
# beside NAME (the same directory, so the rename is atomic); `remove_temporaries` knows
# exactly this name, and nothing else writes into a cache.
_TEMPORARY = re.compile(r"\..+\.tmp-\d+-[0-9a-f]{8}")


def publish(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` so that readers, and a crash at any instant, see the old
    file or the new one, never part of one: a temporary, fsync, rename, fsync of the directory.

    A write that fails removes its temporary; a killed one leaves it for ``remove_temporaries``.
    """
    commit([stage(path, chunks)])


def stage(path: str | os.PathLike, chunks: Iterable[bytes]) -> tuple[Path, Path]:
    """The first half of :func:`publish`: ``chunks`` written and fsynced to a temporary beside
    ``path``; returns (temporary, path) for :func:`commit` (or :func:`discard`). Nobody sees it yet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, path


def commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename staged temporaries onto their names, in order, then fsync their directories (the
    renames survive a power loss). A rename that fails removes the temporaries not yet renamed."""
    done = 0
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
            done += 1
    except BaseException:
        discard(staged[done:])
        raise
    for directory in dict.fromkeys(path.parent for _, path in staged):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a directory
                raise
        finally:
            os.close(fd)


def discard(staged: list[tuple[Path, Path]], root: str | os.PathLike | None = None) -> None:
    """Remove staged temporaries that will not be committed; with ``root``, also the directories
    below it that this leaves empty (those made for the files)."""
    for tmp, _ in staged:
        tmp.unlink(missing_ok=True)
    if root is not None:
        root = Path(root)
        for path in sorted({d for _, path in staged for d in path.parents if root in d.parents},
                           key=lambda d: len(d.parts), reverse=True):
            try:
                path.rmdir()
            except OSError:
                pass  # not empty: it holds files of its own


def remove_temporaries(root: str | os.PathLike) -> int:
    """Delete what killed ``publish`` calls left under ``root``; returns how many.

    Only while nobody else writes the cache (a build holds its lock).
    """
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if _TEMPORARY.fullmatch(name):
                Path(dirpath, name).unlink(missing_ok=True)
                removed += 1
    return removed


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    publish(path, [_json_bytes(obj)])


def _json_bytes(obj: Any) -> bytes:
    """How the format writes JSON: indented, keys in the order given."""
    return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CacheError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable {what}: {exc}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: ``structures/source_sha256`` of a source as read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- zarr v3 metadata documents ------------------------------------------------------------

def group_metadata(attrs: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group",
            "attributes": {ATTRS_KEY: attrs} if attrs is not None else {}}


def array_metadata(shape: tuple[int, ...], dtype: str) -> dict:
    """zarr v3 metadata of a single-chunk, uncompressed array."""
    return {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def array_meta(root: str | os.PathLike, name: str) -> dict:
    return read_json(Path(root, name, "zarr.json"), f"metadata of array '{name}'")


def numpy_dtype(meta: dict) -> np.dtype:
    return np.dtype(meta["data_type"]).newbyteorder("<")


# --- single-chunk metadata arrays ---------------------------------------------------------

def single_chunk_path(root: str | os.PathLike, name: str, ndim: int) -> Path:
    return Path(root, name, "c", *(["0"] * ndim))


def read_array(root: str | os.PathLike, name: str, mmap: bool = True) -> np.ndarray:
    """Read a single-chunk uncompressed metadata array as numpy, memory-mapped read-only.

    Returned as a plain ndarray view of the map (indexing an np.memmap subclass costs
    microseconds per item in a hot loop).
    """
    meta = array_meta(root, name)
    shape = tuple(meta["shape"])
    chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = [c["name"] for c in meta["codecs"]]
    if chunk != shape or codecs != ["bytes"]:
        raise CacheError(f"{root}: array '{name}' is not a single uncompressed chunk")
    dtype = numpy_dtype(meta)
    path = single_chunk_path(root, name, len(shape))
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CacheError(f"{root}: array '{name}' has no data file ({path})") from None
    if size != expected:
        raise CacheError(f"{root}: array '{name}' is truncated ({size} of {expected} bytes in {path})")
    if expected == 0:
        return np.zeros(shape, dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape).view(np.ndarray)
    return np.fromfile(path, dtype=dtype).reshape(shape)


def write_array(root: str | os.PathLike, name: str, data: np.ndarray) -> None:
    """Write a metadata array as one raw chunk plus its zarr.json (data first, then metadata, then
    the zarr.json of a group not there yet): :func:`stage_arrays` of one array, committed."""
    commit(stage_arrays(root, {name: data}))


def stage_arrays(root: str | os.PathLike, arrays: dict[str, np.ndarray]) -> list[tuple[Path, Path]]:
    """:func:`stage` every file of metadata arrays ``arrays`` (each chunk, then its zarr.json, and
    the zarr.json of a group not there yet), for one :func:`commit`: nothing changes until then.
    A failure (a full disk) removes what was staged and the directories made for it."""
    root = Path(root)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in arrays.items():
            data = np.ascontiguousarray(data)
            if data.dtype.byteorder == ">":
                data = data.astype(data.dtype.newbyteorder("<"))
            chunk = single_chunk_path(root, name, data.ndim)
            groups = [root / parent / "zarr.json" for parent in list(Path(name).parents)[:-1]]
            staged.append(stage(chunk, [data.tobytes()]))
            staged.append(stage(root / name / "zarr.json", [_json_bytes(array_metadata(data.shape, data.dtype.name))]))
            for group in groups:  # intermediate groups ("origins", "structures")
                if not group.exists() and group not in [path for _, path in staged]:
                    staged.append(stage(group, [_json_bytes(group_metadata())]))
    except BaseException:
        discard(staged, root)
        raise
    return staged


def chunk_crc32(root: str | os.PathLike, name: str) -> int:
    """crc32 of a single-chunk array's data file (raises OSError if it is missing)."""
    path = single_chunk_path(root, name, len(array_meta(root, name)["shape"]))
    crc = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def metadata_checksums(root: str | os.PathLike) -> dict[str, int]:
    """{array name: crc32} of every metadata array present, for ``CacheAttrs.metadata_crc32``."""
    return {name: chunk_crc32(root, name) for name in METADATA_ARRAYS
            if Path(root, name, "zarr.json").exists()}


# --- ragged string columns ----------------------------------------------------------------

def read_ragged_strings(root: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (utf8 bytes, offsets) of a ragged string column; string k is bytes[off[k]:off[k+1]]."""
    return read_array(root, name + "_utf8"), read_array(root, name + "_offsets")


def ragged_item(blob: np.ndarray, offsets: np.ndarray, k: int) -> str:
    return bytes(blob[int(offsets[k]):int(offsets[k + 1])]).decode("utf-8")


def encode_ragged(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return blob, offsets


def write_ragged_strings(root: str | os.PathLike, name: str, strings: list[str]) -> None:
    blob, offsets = encode_ragged(strings)
    write_array(root, name + "_utf8", blob)
    write_array(root, name + "_offsets", offsets)


def entry_ids(root: str | os.PathLike) -> list[str]:
    """Entry id of every structure: the recorded column, else derived from the structure ids."""
    if Path(root, STRUCTURE_ENTRY_ID + "_offsets", "zarr.json").exists():
        blob, offsets = read_ragged_strings(root, STRUCTURE_ENTRY_ID)
        return [ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]
    blob, offsets = read_ragged_strings(root, STRUCTURE_ID)
    return [entry_id_from_name(ragged_item(blob, offsets, k)) for k in range(len(offsets) - 1)]


def assemblies(root: str | os.PathLike) -> list[str]:
    """Which atoms each structure's images hold: an assembly id (``_pdbx_struct_assembly.id``)
    or ``ASSEMBLY_ASYM`` (the asymmetric unit). Caches built with the default ``--assembly asym``,
    and before the column existed, have no column: every structure is ``ASSEMBLY_ASYM``."""
    if Path(root, STRUCTURE_ASSEMBLY + "_offsets", "zarr.json").exists():
        blob, offsets = read_ragged_strings(root, STRUCTURE_ASSEMBLY)
        return [ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]
    blob, offsets = read_ragged_strings(root, STRUCTURE_ID)
    return [ASSEMBLY_ASYM] * (len(offsets) - 1)
