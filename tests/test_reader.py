"""ShardReader: bounded maps and descriptors whatever the shard count, in real DataLoader workers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.read.reader import ShardReader


def tile_cache(src: Path, dst: Path, copies: int, per_shard: int = 1,
               compression: tuple[str, int] | None = None) -> Path:
    """A cache of ``copies`` copies of ``src``'s structures (ids suffixed ``_k``), ``per_shard`` origins a shard,
    compressed like ``src`` or as ``compression`` (codec, level) says.

    Building thousands of one-origin shards with the pipeline costs seconds per hundred
    shard tasks; this writes the same format (one file per shard, zarr's index, all
    metadata consistent, so `cache-tools check` passes) in well under a second.
    """
    shutil.copytree(src, dst, ignore=lambda d, names: ["c"] if Path(d).name == fmt.VOXELS else [])
    layout = fmt.VoxelLayout(src)
    n, m = layout.n_origins, len(fmt.read_array(src, fmt.STRUCTURE_ATOM_COUNT))
    reader = ShardReader(layout)
    images = [reader.view(o).tobytes() for o in range(n)]
    total = n * copies
    meta = fmt.array_meta(src, fmt.VOXELS)
    codec = layout.codec
    if compression is None:
        compression = (codec.name, codec.level) if codec else ("none", 0)
    vox = fmt.voxels_array_metadata(total, layout.image_shape, layout.dtype.name, per_shard,
                                    compression=compression[0], level=compression[1])
    vox["attributes"] = meta.get("attributes", {})
    fmt.write_json_atomic(dst / fmt.VOXELS / "zarr.json", vox)
    tiled = fmt.VoxelLayout(dst)
    encode = fmt.encoder(tiled.codec) or bytes
    frames = [encode(image) for image in images]  # copies of an origin store the same bytes
    for shard in range(tiled.n_shards):
        first = shard * per_shard
        stored = [frames[o % n] for o in range(first, first + tiled.origins_in_shard(shard))]
        path = tiled.shard_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(stored) + tiled.shard_index(shard, [len(b) for b in stored]).tobytes())
    ranges = fmt.read_array(src, fmt.STRUCTURE_ORIGIN_RANGE)
    blob, offsets = fmt.read_ragged_strings(src, fmt.STRUCTURE_ID)
    ids = [fmt.ragged_item(blob, offsets, k) for k in range(m)]
    blob, offsets = fmt.read_ragged_strings(src, fmt.STRUCTURE_SOURCE_PATH)
    paths = [fmt.ragged_item(blob, offsets, k) for k in range(m)]
    special = {fmt.STRUCTURE_INDEX, fmt.STRUCTURE_ORIGIN_RANGE, fmt.STRUCTURE_SPLIT, fmt.ROTATION}
    for name in fmt.METADATA_ARRAYS:  # per-origin and per-structure columns: repeated
        if name not in special and (src / name / "zarr.json").exists() and "offsets" not in name \
                and "utf8" not in name:
            fmt.write_array(dst, name, np.concatenate([fmt.read_array(src, name)] * copies))
    index = fmt.read_array(src, fmt.STRUCTURE_INDEX)
    fmt.write_array(dst, fmt.STRUCTURE_INDEX, np.concatenate([index + k * m for k in range(copies)]))
    fmt.write_array(dst, fmt.STRUCTURE_ORIGIN_RANGE, np.concatenate([ranges + k * n for k in range(copies)]))
    fmt.write_ragged_strings(dst, fmt.STRUCTURE_ID, [f"{i}_{k}" for k in range(copies) for i in ids])
    fmt.write_ragged_strings(dst, fmt.STRUCTURE_SOURCE_PATH, paths * copies)
    shutil.rmtree(dst / fmt.STRUCTURE_SPLIT, ignore_errors=True)
    fmt.update_attrs(dst, metadata_crc32=fmt.metadata_checksums(dst), splits=None)
    return dst


@pytest.fixture(scope="module")
def many_shards(cache_factory, tmp_path_factory) -> Path:
    return tile_cache(cache_factory("uint8"), tmp_path_factory.mktemp("many") / "many.zarr", copies=40)


LOADER = r"""
import json, os, resource, sys
import numpy as np, torch
from torch.utils.data import DataLoader
from cache_tools import VoxelCacheDataset, batch_collate
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
ds = VoxelCacheDataset(sys.argv[1])
loader = DataLoader(ds, batch_size=16, shuffle=True, num_workers=8, collate_fn=batch_collate,
                    generator=torch.Generator().manual_seed(0))
it = iter(loader)
pids = [w.pid for w in it._workers]
most = {pid: 0 for pid in pids}
sums = {}
for batch in it:
    for pid in pids:
        most[pid] = max(most[pid], len(os.listdir(f"/proc/{pid}/fd")))
    for origin, image in zip(batch["origin_id"].tolist(), batch["image"]):
        sums[origin] = float(image.double().sum())
print(json.dumps({"fds": list(most.values()), "sums": sums}))
"""


def test_random_pass_over_thousands_of_shards_under_rlimit_256(many_shards, cache_factory):
    """Before the reader, every touched shard kept a descriptor: a worker failed with EMFILE."""
    layout = fmt.VoxelLayout(many_shards)
    assert layout.n_shards == layout.n_origins > 2000 and layout.origins_per_shard == 1
    out = subprocess.run([sys.executable, "-c", LOADER, str(many_shards)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert len(result["sums"]) == layout.n_origins  # every origin read once
    small = VoxelCacheDataset(cache_factory("uint8"))
    expected = [float(small[o]["image"].double().sum()) for o in range(len(small))]
    assert all(abs(s - expected[int(o) % len(small)]) < 1e-6 for o, s in result["sums"].items())
    assert len(result["fds"]) == 8
    # 256 // 8 = 32 maps at most, plus what a bare worker holds (~20 pipes, sockets, libraries)
    assert max(result["fds"]) < 100, result["fds"]


def test_lru_bounds_maps_and_never_unmaps_a_live_view(many_shards):
    reader = ShardReader(fmt.VoxelLayout(many_shards), max_maps=4)
    held = reader.view(0)
    copy = held.copy()
    before = len(os.listdir("/proc/self/fd"))
    for origin in range(1, 200):
        reader.view(origin)
        assert reader.open_maps() <= 4
    assert len(os.listdir("/proc/self/fd")) <= before + 4  # 4 in the LRU; the held map keeps its own fd
    assert np.array_equal(held, copy)  # its map outlived the LRU eviction
    out = np.empty((50, *reader.layout.image_shape), np.float32)
    ids = np.random.default_rng(0).permutation(reader.layout.n_origins)[:50]
    reader.gather(ids, out)
    assert reader.open_maps() <= 4
    assert np.array_equal(out[7], reader.view(int(ids[7])).astype(np.float32))
