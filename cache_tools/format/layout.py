"""Where each origin's bytes live: the voxels array, its shard files and zarr's shard index.

Inside an uncompressed shard, origin ``j`` occupies bytes ``[j * B, (j + 1) * B)`` where B
is the bytes of one origin; the zarr shard index at the end of the file (16 bytes per
origin slot: uint64 offset, uint64 length; ``2**64 - 1`` twice = absent) says the same, so
zarr reads the store normally while a training worker turns an origin id into a file and
an offset with two integer operations. Compressed, each origin is one frame, written one
after another, and the index says where each frame is.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cache_tools.format.attrs import CacheParams
from cache_tools.format.codecs import SUPPORTED_CODECS, Codec, inner_codecs, zstd_frames_end
from cache_tools.format.names import DEFAULT_COMPRESSION_LEVEL, VOXELS, CacheError
from cache_tools.format.store import array_meta, numpy_dtype

EMPTY_INDEX_ENTRY = np.uint64(2**64 - 1)  # zarr's marker for "inner chunk absent"
INDEX_ENTRY_NBYTES = 16                   # one slot of zarr's shard index: offset, length


def shard_file(root: str | os.PathLike, shard: int, ndim: int, array: str = VOXELS) -> str:
    """File holding shard ``shard`` of a sharded array (default chunk key encoding), as a
    string: the reader opens one per shard it reads, where pathlib costs ~20 µs a call."""
    return os.path.join(root, array, "c", str(shard), *(["0"] * (ndim - 1)))


class VoxelLayout:
    """Where the bytes of each origin live; parsed once from the voxels array metadata.

    The same description serves any array of whole items sharded along axis 0: with
    ``array="blocks"`` the items are a lattice's blocks (``n_items``, ``item_nbytes``,
    ``items_per_shard``, ``item_shape`` name them for both).
    Small and picklable: a Dataset carries one of these into its workers.
    """

    def __init__(self, root: str | os.PathLike, array: str = VOXELS):
        meta = array_meta(root, array)
        self.root, self.array = str(root), array
        self.shape = tuple(int(n) for n in meta["shape"])
        self.dtype = numpy_dtype(meta)
        (codec,) = meta["codecs"]
        if codec["name"] != "sharding_indexed":
            raise CacheError(f"{root}: {array} are not stored in the sharded layout")
        config = codec["configuration"]
        inner = tuple(config["chunk_shape"])
        if inner != (1, *self.shape[1:]):
            raise CacheError(f"{root}: voxels inner chunks are {list(inner)}, not one origin each; cannot read")
        chain = config["codecs"]
        if not chain or chain[0]["name"] != "bytes" or len(chain) > 2:
            raise CacheError(f"{root}: voxels use the codec chain {[c['name'] for c in chain]}, "
                             "which this reader does not support (supported: bytes, then optionally "
                             f"{', '.join(SUPPORTED_CODECS)})")
        self.codec: Codec | None = Codec.from_json(chain[1]) if len(chain) == 2 else None
        if self.codec is not None and self.codec.name not in SUPPORTED_CODECS:
            raise CacheError(f"{root}: voxels are compressed with codec '{self.codec.name}', which this "
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

    @property
    def compressed(self) -> bool:
        return self.codec is not None

    # generic names: an item is an origin's image (voxels) or a block (blocks)
    n_items = property(lambda self: self.n_origins)
    items_per_shard = property(lambda self: self.origins_per_shard)
    item_nbytes = property(lambda self: self.origin_nbytes)
    item_shape = property(lambda self: self.image_shape)

    @property
    def index_nbytes(self) -> int:
        """Bytes of zarr's shard index at the end of every shard file."""
        return INDEX_ENTRY_NBYTES * self.origins_per_shard

    def locate(self, origin: int) -> tuple[int, int]:
        """(shard, byte offset) of an uncompressed origin's bytes."""
        shard, j = divmod(origin, self.origins_per_shard)
        return shard, j * self.origin_nbytes

    def origins_in_shard(self, shard: int) -> int:
        return min(self.origins_per_shard, self.n_origins - shard * self.origins_per_shard)

    def shard_file(self, shard: int) -> str:
        return shard_file(self.root, shard, len(self.shape), self.array)

    def shard_path(self, shard: int) -> Path:
        return Path(self.shard_file(shard))

    def shard_nbytes(self, shard: int) -> int:
        """Exact size of a complete uncompressed shard file: its origins, then the index."""
        return self.origins_in_shard(shard) * self.origin_nbytes + self.index_nbytes

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

    def shard_problem(self, shard: int) -> tuple[str, str] | None:
        """(kind, why) a shard file is not a complete, readable shard, or None: the one check
        of a shard's size and index, reading only the index at its end.

        kinds: ``missing-shard``, ``truncated-shard``, ``shard-index``.
        """
        path = self.shard_file(shard)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(max(0, size - self.index_nbytes))
                tail = fh.read()
        except FileNotFoundError:
            return "missing-shard", "shard file is missing"
        if len(tail) < self.index_nbytes:
            return "truncated-shard", (f"shard file has {size} bytes, too short for its "
                                       f"{self.index_nbytes}-byte shard index")
        index = np.frombuffer(tail, "<u8").reshape(-1, 2)
        if self.codec is None:
            if size != self.shard_nbytes(shard):
                return "truncated-shard", f"shard file has {size} bytes, expected {self.shard_nbytes(shard)}"
            if not np.array_equal(index, self.shard_index(shard)):
                return "shard-index", "zarr's shard index at the end of the file is damaged (zarr would read wrong bytes)"
            return None
        n = self.origins_in_shard(shard)
        data_end = size - self.index_nbytes
        for j in range(n):
            problem = entry_problem(int(index[j, 0]), int(index[j, 1]), data_end)
            if problem:
                return self.truncation(shard, size) or \
                    ("shard-index", f"shard index entry of origin {shard * self.origins_per_shard + j} {problem}")
        if np.any(index[n:] != EMPTY_INDEX_ENTRY):
            return self.truncation(shard, size) or \
                ("shard-index", "shard index has entries past the shard's last origin; damaged")
        return None

    def truncation(self, shard: int, size: int) -> tuple[str, str] | None:
        """("truncated-shard", why) when a compressed shard file whose index does not hold is cut
        short: its frames, walked from byte 0, and its index need more than ``size`` bytes (a cut
        file reads frame bytes where its index should be, so the index alone cannot tell).
        None when the frames and a whole index fit: then the index itself is damaged."""
        n, first = self.origins_in_shard(shard), shard * self.origins_per_shard
        with open(self.shard_file(shard), "rb") as fh:
            frames, end = zstd_frames_end(lambda offset, count: os.pread(fh.fileno(), count, offset), size, n)
        if frames == n and size < end + self.index_nbytes:
            return "truncated-shard", f"truncated shard: {size} bytes, expected {end + self.index_nbytes}"
        if frames < n and end > size:
            return "truncated-shard", (f"truncated shard: {size} bytes, cut inside the frame of origin "
                                       f"{first + frames}; expected at least {end + self.index_nbytes}")
        return None


def stored_problem(layout: VoxelLayout, params: CacheParams) -> str | None:
    """Why the array's own metadata (dtype, item shape) are not what the build parameters say,
    or None: the reader reads by the array's metadata, the images mean what the parameters say
    (a hand-edited ``data_type`` in voxels/zarr.json would reinterpret every byte)."""
    if params.lattice is not None:  # a block: (E, E, E, C)
        shape = (params.lattice.block_edge,) * 3 + (len(params.channels),)
    else:  # an origin's image: ((R,) C, L, L, L)
        shape = ((params.rotations,) if params.rotations > 1 else ()) + (len(params.channels),) + \
            (params.image.grid_voxels,) * 3
    if tuple(layout.item_shape) == shape and layout.dtype.name == params.storage.dtype:
        return None
    return (f"{layout.array} are {layout.dtype.name} {list(layout.item_shape)}, "
            f"attributes say {params.storage.dtype} {list(shape)}")


def entry_problem(offset: int, nbytes: int, data_end: int) -> str | None:
    """Why one present shard index entry does not describe a frame inside the data part of
    its file (which ends at ``data_end``), or None."""
    if offset == EMPTY_INDEX_ENTRY:
        return None
    if offset > data_end or nbytes > data_end or offset + nbytes > data_end:
        return (f"points past the data (offset {offset}, {nbytes} bytes, data ends at {data_end}); "
                "truncated or damaged")
    return None


def voxels_array_metadata(n_origins: int, image_shape: tuple[int, ...], dtype: str,
                          origins_per_shard: int, attributes: dict | None = None,
                          compression: str = "none", level: int = DEFAULT_COMPRESSION_LEVEL) -> dict:
    """zarr v3 metadata of the voxels array: shards of whole origins, each raw or zstd-compressed."""
    return sharded_array_metadata(n_origins, image_shape, dtype, origins_per_shard, attributes, compression, level)


def sharded_array_metadata(n_items: int, item_shape: tuple[int, ...], dtype: str, items_per_shard: int,
                           attributes: dict | None = None, compression: str = "none",
                           level: int = DEFAULT_COMPRESSION_LEVEL) -> dict:
    """zarr v3 metadata of an array of items (origins' images, or lattice blocks) along axis 0:
    shards of ``items_per_shard`` whole items, one inner chunk each, raw or zstd-compressed."""
    shape = [n_items, *item_shape]
    image_shape, origins_per_shard = item_shape, items_per_shard
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
