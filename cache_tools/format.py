"""The on-disk format of a voxel cache: names, layout, versions.

This module is the single owner of the format. The writer (`pipeline`) and every
reader (`cache_tools`) import it; nothing else spells a path inside a store.
It needs only the standard library and numpy, so a training process can read a
cache without zarr.

A cache is a zarr v3 group (a directory)::

    CACHE/
      zarr.json                      group; attributes["voxel_cache"] = build attrs
      voxels/                        (N, C, L, L, L), or (N, R, C, L, L, L) with R rotations
        zarr.json                    sharding_indexed codec; inner chunk = one origin, raw or zstd
        c/<s>/0/0/0/0                shard s: origins [s*S, s*S + S), then the shard index
      origins/center_A               (N, 3) float32   voxel grid centre, in Å
      origins/structure_index        (N,)   int32     row of the structures table
      origins/crc32                  (N,)   uint32    zlib.crc32 of the origin's stored bytes
                                                      (before compression: the image as stored dtype)
      origins/rotation               (N, R, 3, 3) float32, only when R > 1
      structures/id_utf8, id_offsets               ragged UTF-8 ids (unique, from file names)
      structures/source_path_utf8, source_path_offsets
      structures/source_sha256       (M, 32) uint8
      structures/atom_count          (M,)   int32     heavy atoms voxelized
      structures/origin_range        (M, 2) int64     [start, stop); contiguous, tiling 0..N-1
      structures/split               (M,)   uint8     optional; codes name attrs["splits"]
      structures/method              (M,)   uint16    bit i set = METHODS[i] in _exptl.method
      structures/resolution_A        (M,)   float32   best of refinement/reconstruction; NaN absent
      structures/deposited           (M,)   int32     days since 1970-01-01; DATE_MISSING absent
      structures/released            (M,)   int32     (first release) days; DATE_MISSING absent
      structures/n_models            (M,)   int32     models in the file
      structures/polymer             (M,)   uint8     bit i set = POLYMERS[i] present (_entity_poly)
      structures/n_chains            (M,)   int32     chains (auth_asym_id) of the first model
      structures/subset/<NAME>       (K,)   int32     optional; sorted structure rows of a subset;
                                                      attrs["subsets"][NAME] holds its expression
      structures/entry_id_utf8, entry_id_offsets   ragged PDB entry ids (mmCIF _entry.id,
                                     upper-cased); caches built before it: see entry_ids()
    (attrs["metadata_crc32"] holds the crc32 of each metadata array's data file)
      .build/                        resumable build state; removed when the build completes

Inside an uncompressed shard, origin ``j`` occupies bytes ``[j * B, (j + 1) * B)`` where
B is the bytes of one origin; the zarr shard index at the end of the file says the same,
so zarr reads the store normally while a training worker turns an origin id into
a file and an offset with two integer operations and memory-maps it.
With ``compression`` (``--compression zstd``) each origin is one zstd frame (zarr's
``zstd`` codec, numcodecs' implementation, with its content checksum on, so a damaged
frame fails to decode instead of decoding into garbage), written one after another; the
shard index (16 bytes per origin slot: offset, length) says where each frame is. The
format version stays 1: the codec is zarr's own metadata, and a reader that predates
compression refuses compressed voxels with a clear error.
Every metadata array is a single uncompressed chunk, so it is one raw file too.
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

FORMAT_NAME = "voxel-cache"
FORMAT_VERSION = 1
ATTRS_KEY = "voxel_cache"

VOXELS = "voxels"
CENTER = "origins/center_A"
STRUCTURE_INDEX = "origins/structure_index"
CRC32 = "origins/crc32"
ROTATION = "origins/rotation"
STRUCTURE_ID = "structures/id"                    # ragged: _utf8 + _offsets
STRUCTURE_SOURCE_PATH = "structures/source_path"  # ragged: _utf8 + _offsets
STRUCTURE_SHA256 = "structures/source_sha256"
STRUCTURE_ATOM_COUNT = "structures/atom_count"
STRUCTURE_ORIGIN_RANGE = "structures/origin_range"
STRUCTURE_SPLIT = "structures/split"
# Structure metadata read from each mmCIF at build time (pipeline/metadata.py); a cache built
# before these existed lacks them, and readers report them as absent.
STRUCTURE_METHOD = "structures/method"
STRUCTURE_RESOLUTION = "structures/resolution_A"
STRUCTURE_DEPOSITED = "structures/deposited"
STRUCTURE_RELEASED = "structures/released"
STRUCTURE_N_MODELS = "structures/n_models"
STRUCTURE_POLYMER = "structures/polymer"
STRUCTURE_N_CHAINS = "structures/n_chains"
STRUCTURE_META_ARRAYS = (STRUCTURE_METHOD, STRUCTURE_RESOLUTION, STRUCTURE_DEPOSITED, STRUCTURE_RELEASED,
                         STRUCTURE_N_MODELS, STRUCTURE_POLYMER, STRUCTURE_N_CHAINS)
SUBSET_DIR = "structures/subset"  # + "/<NAME>"
# Bit i of structures/method: the PDBx _exptl.method vocabulary, append-only; OTHER takes the rest.
METHODS = ("X-RAY DIFFRACTION", "ELECTRON MICROSCOPY", "SOLUTION NMR", "SOLID-STATE NMR",
           "NEUTRON DIFFRACTION", "ELECTRON CRYSTALLOGRAPHY", "FIBER DIFFRACTION", "POWDER DIFFRACTION",
           "SOLUTION SCATTERING", "INFRARED SPECTROSCOPY", "EPR", "FLUORESCENCE TRANSFER",
           "THEORETICAL MODEL", "OTHER")
POLYMERS = ("protein", "DNA", "RNA")  # bit i of structures/polymer
SUBSET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
DATE_MISSING = np.iinfo(np.int32).min
STRUCTURE_ENTRY_ID = "structures/entry_id"        # ragged: _utf8 + _offsets
BUILD_DIR = ".build"
# Single-chunk metadata arrays (ragged columns as their two parts); attrs["metadata_crc32"]
# records the crc32 of each one's chunk file when the build completes.
METADATA_ARRAYS = (CENTER, STRUCTURE_INDEX, CRC32, ROTATION,
                   STRUCTURE_ID + "_utf8", STRUCTURE_ID + "_offsets",
                   STRUCTURE_SOURCE_PATH + "_utf8", STRUCTURE_SOURCE_PATH + "_offsets",
                   STRUCTURE_SHA256, STRUCTURE_ATOM_COUNT, STRUCTURE_ORIGIN_RANGE, STRUCTURE_SPLIT,
                   *STRUCTURE_META_ARRAYS, STRUCTURE_ENTRY_ID + "_utf8", STRUCTURE_ENTRY_ID + "_offsets")

STORAGE_DTYPES = ("float32", "float16", "uint8")
UINT8_DEFAULT_MAX = 2.0  # FractionAtom values of non-overlapping atoms stay below this; see docs
EMPTY_INDEX_ENTRY = np.uint64(2**64 - 1)  # zarr's marker for "inner chunk absent"
COMPRESSIONS = ("none", "zstd")   # --compression choices; "none" = raw bytes, memory-mapped as is
DEFAULT_COMPRESSION = "zstd"
DEFAULT_COMPRESSION_LEVEL = 1     # BENCHMARKS.md "Compression": level 1 is within 3% of level 3's size, decodes as fast
SUPPORTED_CODECS = ("zstd",)      # inner codecs after "bytes" that this reader decodes


class CacheError(Exception):
    """A cache cannot be used; the message names the cache and the reason."""


# --- paths ----------------------------------------------------------------------------

def array_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / name


def shard_file(root: str | os.PathLike, shard: int, ndim: int) -> str:
    """File holding shard ``shard`` of the voxels array (default chunk key encoding), as a
    string: the reader opens one per shard it maps, where pathlib costs ~20 µs a call."""
    return os.path.join(root, VOXELS, "c", str(shard), *(["0"] * (ndim - 1)))


def shard_path(root: str | os.PathLike, shard: int, ndim: int) -> Path:
    return Path(shard_file(root, shard, ndim))


def subset_array(name: str) -> str:
    """Array name of subset ``name``; the name must be a plain word (it becomes a directory)."""
    if not SUBSET_NAME.fullmatch(name or ""):
        raise ValueError(f"subset name {name!r}: use letters, digits, '_', '-' or '.' "
                         "(not starting with '.' or '-', at most 64 characters)")
    return f"{SUBSET_DIR}/{name}"


def single_chunk_path(root: str | os.PathLike, name: str, ndim: int) -> Path:
    return Path(root, name, "c", *(["0"] * ndim))


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a directory
            raise
    finally:
        os.close(fd)


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
    publish(path, [json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")])


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CacheError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable {what}: {exc}") from None


# --- reading (numpy only) --------------------------------------------------------------

def read_attrs(root: str | os.PathLike) -> dict:
    """Return the cache attributes after checking that ``root`` is a cache we can read."""
    root = Path(root)
    if not root.exists():
        raise CacheError(f"{root}: no such cache (path does not exist)")
    if not root.is_dir():
        raise CacheError(f"{root}: not a cache (expected a zarr v3 directory store)")
    meta = read_json(root / "zarr.json", "zarr group metadata")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise CacheError(f"{root}: not a zarr v3 group")
    attrs = meta.get("attributes", {}).get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise CacheError(f"{root}: zarr group is not a voxel cache (no '{ATTRS_KEY}' attributes)")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{root}: format version {version} is not supported (this code reads version {FORMAT_VERSION})")
    return attrs


def require_complete(root: str | os.PathLike, attrs: dict) -> None:
    if not attrs.get("complete"):
        raise CacheError(f"{root}: build incomplete (still building or interrupted; rerun the same "
                         "`pipeline build-cache` command to finish it)")


def array_meta(root: str | os.PathLike, name: str) -> dict:
    return read_json(Path(root, name, "zarr.json"), f"metadata of array '{name}'")


def _numpy_dtype(meta: dict) -> np.dtype:
    return np.dtype(meta["data_type"]).newbyteorder("<")


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
    dtype = _numpy_dtype(meta)
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


def chunk_crc32(root: str | os.PathLike, name: str) -> int:
    """crc32 of a single-chunk array's data file (raises OSError if it is missing)."""
    path = single_chunk_path(root, name, len(array_meta(root, name)["shape"]))
    crc = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def metadata_checksums(root: str | os.PathLike) -> dict[str, int]:
    """{array name: crc32} of every metadata array present, for attrs["metadata_crc32"]."""
    return {name: chunk_crc32(root, name) for name in METADATA_ARRAYS
            if Path(root, name, "zarr.json").exists()}


def read_ragged_strings(root: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (utf8 bytes, offsets) of a ragged string column; string k is bytes[off[k]:off[k+1]]."""
    return read_array(root, name + "_utf8"), read_array(root, name + "_offsets")


def ragged_item(blob: np.ndarray, offsets: np.ndarray, k: int) -> str:
    return bytes(blob[int(offsets[k]):int(offsets[k + 1])]).decode("utf-8")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: ``structures/source_sha256`` of a source as read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_id_from_name(structure_id: str) -> str:
    """The entry id a structure id (a file name) implies: '1qjg_clean' -> '1QJG'.

    Used for files without ``_entry.id`` and for caches built before the
    ``structures/entry_id`` column existed.
    """
    return structure_id.split("_", 1)[0].upper()


def entry_ids(root: str | os.PathLike) -> list[str]:
    """Entry id of every structure: the recorded column, else derived from the structure ids."""
    if Path(root, STRUCTURE_ENTRY_ID + "_offsets", "zarr.json").exists():
        blob, offsets = read_ragged_strings(root, STRUCTURE_ENTRY_ID)
        return [ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]
    blob, offsets = read_ragged_strings(root, STRUCTURE_ID)
    return [entry_id_from_name(ragged_item(blob, offsets, k)) for k in range(len(offsets) - 1)]


def encode_ragged(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return blob, offsets


class VoxelLayout:
    """Where the bytes of each origin live; built from the voxels array metadata.

    Small and picklable: a Dataset carries one of these into its workers.
    """

    def __init__(self, root: str | os.PathLike):
        meta = array_meta(root, VOXELS)
        self.root = str(root)
        self.shape = tuple(int(n) for n in meta["shape"])
        self.dtype = _numpy_dtype(meta)
        (codec,) = meta["codecs"]
        if codec["name"] != "sharding_indexed":
            raise CacheError(f"{root}: voxels are not stored in the sharded layout")
        config = codec["configuration"]
        inner = tuple(config["chunk_shape"])
        if inner != (1, *self.shape[1:]):
            raise CacheError(f"{root}: voxels inner chunks are {list(inner)}, not one origin each; cannot read")
        inner_codecs = config["codecs"]
        if not inner_codecs or inner_codecs[0]["name"] != "bytes" or len(inner_codecs) > 2:
            raise CacheError(f"{root}: voxels use the codec chain {[c['name'] for c in inner_codecs]}, "
                             "which this reader does not support (supported: bytes, then optionally "
                             f"{', '.join(SUPPORTED_CODECS)})")
        self.codec: dict | None = inner_codecs[1] if len(inner_codecs) == 2 else None
        if self.codec is not None and self.codec["name"] not in SUPPORTED_CODECS:
            raise CacheError(f"{root}: voxels are compressed with codec '{self.codec['name']}', which this "
                             f"reader does not support (supported: {', '.join(SUPPORTED_CODECS)})")
        index_codecs = [c["name"] for c in config.get("index_codecs", [{"name": "bytes"}])]
        if index_codecs != ["bytes"] or config.get("index_location", "end") != "end":
            raise CacheError(f"{root}: voxels shard index uses codecs {index_codecs} at the "
                             f"{config.get('index_location')}; this reader supports only a raw index at the end")
        self.origins_per_shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.n_origins = self.shape[0]
        self.image_shape = self.shape[1:]  # (C, L, L, L) or (R, C, L, L, L)
        self.origin_nbytes = int(np.prod(self.image_shape)) * self.dtype.itemsize
        self.n_shards = -(-self.n_origins // self.origins_per_shard)

    def locate(self, origin: int) -> tuple[int, int]:
        """(shard, byte offset) of an origin's bytes."""
        shard, j = divmod(origin, self.origins_per_shard)
        return shard, j * self.origin_nbytes

    def origins_in_shard(self, shard: int) -> int:
        return min(self.origins_per_shard, self.n_origins - shard * self.origins_per_shard)

    def shard_path(self, shard: int) -> Path:
        return shard_path(self.root, shard, len(self.shape))

    def shard_file(self, shard: int) -> str:
        return shard_file(self.root, shard, len(self.shape))

    @property
    def compressed(self) -> bool:
        return self.codec is not None

    def shard_nbytes(self, shard: int) -> int:
        """Exact size of a complete uncompressed shard file: its origins, then a 16-byte index entry per slot."""
        return self.origins_in_shard(shard) * self.origin_nbytes + 16 * self.origins_per_shard

    def shard_index(self, shard: int, sizes: list[int] | None = None) -> np.ndarray:
        """The (offset, nbytes) index zarr expects at the end of the shard file.

        ``sizes``: each origin's stored (compressed) length, written back to back;
        by default every origin takes ``origin_nbytes``.
        """
        index = np.full((self.origins_per_shard, 2), EMPTY_INDEX_ENTRY, dtype="<u8")
        n = self.origins_in_shard(shard)
        lengths = np.full(n, self.origin_nbytes, np.uint64) if sizes is None else np.asarray(sizes, np.uint64)
        index[:n, 1] = lengths
        index[:n, 0] = np.cumsum(lengths) - lengths
        return index


def shard_index_of(layout: VoxelLayout, tail: np.ndarray) -> np.ndarray | None:
    """The (S, 2) uint64 index at the end of a shard's bytes (uint8 array: the file or its tail), or None if short."""
    index_bytes = 16 * layout.origins_per_shard
    if len(tail) < index_bytes:
        return None
    return tail[len(tail) - index_bytes:].view("<u8").reshape(-1, 2)


def index_problem(layout: VoxelLayout, shard: int, index: np.ndarray | None, size: int) -> str | None:
    """Why a compressed shard of ``size`` bytes with this ``index`` is not a valid shard, or None.

    Every origin slot must point inside the data part of the file (or be absent);
    the slots past the shard's last origin must be absent.
    """
    index_bytes = 16 * layout.origins_per_shard
    if index is None:
        return f"{size} bytes, too short for its {index_bytes}-byte shard index"
    n = layout.origins_in_shard(shard)
    present = index[:n, 0] != EMPTY_INDEX_ENTRY
    offsets, lengths = index[:n, 0][present], index[:n, 1][present]
    limit = np.uint64(size - index_bytes)
    bad = (offsets > limit) | (lengths > limit) | (offsets + lengths > limit)
    if np.any(bad):
        j = int(np.flatnonzero(present)[np.flatnonzero(bad)[0]])
        return (f"shard index entry of origin {shard * layout.origins_per_shard + j} points past the data "
                f"(offset {index[j, 0]}, {index[j, 1]} bytes, data ends at {size - index_bytes}); "
                "truncated or damaged")
    if np.any(index[n:] != EMPTY_INDEX_ENTRY):
        return "shard index has entries past the shard's last origin; damaged"
    return None


def inner_codecs(compression: str, level: int) -> list[dict]:
    """zarr v3 codec chain of one origin (an inner chunk of the shard)."""
    chain = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        chain.append({"name": "zstd", "configuration": {"level": int(level), "checksum": True}})
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r} (choices: {', '.join(COMPRESSIONS)})")
    return chain


def encoder(codec: dict | None):
    """bytes -> stored bytes of one origin, with the codec implementation zarr itself uses (numcodecs)."""
    if codec is None:
        return None
    from numcodecs.zstd import Zstd

    return Zstd(level=codec["configuration"].get("level", 0),
                checksum=codec["configuration"].get("checksum", False)).encode


def decoder(codec: dict | None):
    """(stored bytes, out array) -> None: decode one origin into ``out``, or None when uncompressed.

    numcodecs' zstd decompresses into ``out`` directly (no intermediate copy) and
    raises RuntimeError on damaged input, ValueError on a size mismatch.
    """
    if codec is None:
        return None
    from numcodecs.zstd import decompress

    return decompress


def voxels_nbytes(layout: VoxelLayout, estimate: bool = False) -> int:
    """Bytes of the images on disk: exact when uncompressed, the shard files' sizes when compressed.

    ``estimate``: one stat instead of one per shard (the Dataset's prefetch decision must
    not cost more with more shards): the first shard's size scaled to all origins.
    """
    if layout.codec is None:
        return layout.n_origins * layout.origin_nbytes
    shards = range(min(1, layout.n_shards)) if estimate else range(layout.n_shards)
    total = 0
    for shard in shards:
        try:
            total += layout.shard_path(shard).stat().st_size
        except FileNotFoundError:
            pass
    if estimate and layout.n_shards:
        total = total * layout.n_origins // layout.origins_in_shard(0)
    return total


def dequantize_scale(attrs: dict) -> float:
    """Multiply stored values by this to get float32 voxel values (1.0 unless uint8)."""
    return float(attrs["params"]["storage"]["scale"])


def voxels_array_metadata(n_origins: int, image_shape: tuple[int, ...], dtype: str,
                          origins_per_shard: int, attributes: dict | None = None,
                          compression: str = "none", level: int = DEFAULT_COMPRESSION_LEVEL) -> dict:
    """zarr v3 metadata of the voxels array: shards of whole origins, each raw or zstd-compressed."""
    shape = [n_origins, *image_shape]
    return {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [origins_per_shard, *image_shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [1, *image_shape],
                "codecs": inner_codecs(compression, level),
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "index_location": "end",
            },
        }],
        "attributes": attributes or {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


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


def group_metadata(attrs: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group",
            "attributes": {ATTRS_KEY: attrs} if attrs is not None else {}}


def write_array(root: str | os.PathLike, name: str, data: np.ndarray) -> None:
    """Write a metadata array as one raw chunk plus its zarr.json (data first, then metadata)."""
    data = np.ascontiguousarray(data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    adir = Path(root, name)
    adir.mkdir(parents=True, exist_ok=True)
    for parent in list(Path(name).parents)[:-1]:  # intermediate groups ("origins", "structures")
        gpath = Path(root, parent, "zarr.json")
        if not gpath.exists():
            write_json_atomic(gpath, group_metadata())
    publish(single_chunk_path(root, name, data.ndim), [data.tobytes()])
    write_json_atomic(adir / "zarr.json", array_metadata(data.shape, data.dtype.name))


def write_ragged_strings(root: str | os.PathLike, name: str, strings: list[str]) -> None:
    blob, offsets = encode_ragged(strings)
    write_array(root, name + "_utf8", blob)
    write_array(root, name + "_offsets", offsets)


def update_attrs(root: str | os.PathLike, **changes: Any) -> dict:
    """Atomically rewrite the group's cache attributes with ``changes`` applied."""
    path = Path(root, "zarr.json")
    meta = read_json(path, "zarr group metadata")
    attrs = meta.setdefault("attributes", {}).setdefault(ATTRS_KEY, {})
    attrs.update(changes)
    write_json_atomic(path, meta)
    return attrs
