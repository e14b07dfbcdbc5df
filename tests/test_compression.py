"""Compressed caches (--compression zstd): the same images as uncompressed, read by zarr too; damage is named."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

from cache_tools import VoxelCacheDataset, batch_collate
from cache_tools import format as fmt
from cache_tools.commands.check import check_cache
from pipeline.repair import full_check, repair
from cache_tools.commands.info import cache_info
from cache_tools.commands.split import assign_splits

from test_reader import tile_cache


@pytest.fixture(scope="module")
def zstd_uint8(cache_factory) -> Path:
    return cache_factory("uint8", compression="zstd")


def test_pipeline_writes_zstd_origins_zarr_reads_them(zstd_uint8, cache_factory):
    plain = cache_factory("uint8")
    layout = fmt.VoxelLayout(zstd_uint8)
    assert layout.codec == fmt.Codec("zstd", fmt.DEFAULT_COMPRESSION_LEVEL, checksum=True)
    stored = zarr.open_group(str(zstd_uint8), mode="r")["voxels"][:]
    assert np.array_equal(stored, zarr.open_group(str(plain), mode="r")["voxels"][:])
    # the crc32 covers the bytes before compression: the same as the uncompressed build's
    assert np.array_equal(fmt.read_array(zstd_uint8, fmt.CRC32), fmt.read_array(plain, fmt.CRC32))
    info = cache_info(zstd_uint8)["voxels"]
    assert info["codec"] == "zstd" and info["stored_bytes"] == fmt.voxels_nbytes(layout)
    assert info["compression_ratio"] == round(layout.n_origins * layout.origin_nbytes / info["stored_bytes"], 2) > 3
    ds, ref = VoxelCacheDataset(zstd_uint8, threads=2), VoxelCacheDataset(plain)
    for i in range(len(ds)):
        assert np.array_equal(ds[i]["image"].numpy(), ref[i]["image"].numpy())
    ids = np.random.default_rng(0).permutation(len(ds))[:40]
    assert np.array_equal(ds[ids]["image"], ref[ids]["image"])
    one = VoxelCacheDataset(zstd_uint8, threads=1, prefetch=True, verify=True)
    assert np.array_equal(one[ids]["image"], ref[ids]["image"])
    rotated, ref_rotated = VoxelCacheDataset(zstd_uint8, rotate=True), VoxelCacheDataset(plain, rotate=True)
    assert np.array_equal(rotated[ids]["image"], ref_rotated[ids]["image"])
    report = full_check(zstd_uint8, spot=3, progress=False)
    assert report["ok"] and report["spot_checked"] == 3, report["problems"]


def test_float32_decodes_straight_into_the_batch(cache_factory, tmp_path):
    """float32 origins decode into the batch rows themselves (no scratch); zarr reads them too."""
    plain = cache_factory("float32")
    packed = tile_cache(plain, tmp_path / "f32z.zarr", copies=1,
                        per_shard=fmt.VoxelLayout(plain).origins_per_shard, compression=("zstd", 3))
    assert fmt.VoxelLayout(packed).codec.name == "zstd"
    ds, ref = VoxelCacheDataset(packed, threads=2), VoxelCacheDataset(plain)
    ids = np.random.default_rng(1).permutation(len(ds))[:32]
    assert np.array_equal(ds[ids]["image"], ref[ids]["image"])
    assert np.array_equal(ds[5]["image"], ref[5]["image"])
    assert np.array_equal(zarr.open_group(str(packed), mode="r")["voxels"][:],
                          zarr.open_group(str(plain), mode="r")["voxels"][:])
    assign_splits(packed, val=0.4, seed=0)
    val = VoxelCacheDataset(packed, split="val")
    assert np.array_equal(val[0]["image"], ref[val.origin_id(0)]["image"])


def _flip_inside_origin(root: Path, origin: int) -> Path:
    layout = fmt.VoxelLayout(root)
    shard, j = divmod(origin, layout.origins_per_shard)
    path = layout.shard_path(shard)
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-layout.index_nbytes:]), "<u8").reshape(-1, 2)
    offset, nbytes = int(index[j, 0]), int(index[j, 1])
    data[offset + nbytes // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def _read_in_worker(root: Path, ids: list[int]) -> None:
    loader = DataLoader(VoxelCacheDataset(root), batch_size=None, num_workers=1, collate_fn=batch_collate,
                        sampler=[ids])
    for _ in loader:
        pass


def test_flipped_byte_in_a_compressed_origin_is_named_then_repaired(zstd_uint8, tmp_path):
    root = tmp_path / "damaged.zarr"
    shutil.copytree(zstd_uint8, root)
    victim = 13
    shard_file = _flip_inside_origin(root, victim)
    rel = str(shard_file.relative_to(root))
    message = f"origin {victim}: compressed bytes in .*{rel} do not decode"
    with pytest.raises(fmt.CacheError, match=message):
        VoxelCacheDataset(root)[victim]
    with pytest.raises(fmt.CacheError, match=message):
        VoxelCacheDataset(root, threads=2)[[0, victim, 40]]
    with pytest.raises(fmt.CacheError, match=message):
        _read_in_worker(root, [1, victim])
    assert VoxelCacheDataset(root)[victim + 1]["origin_id"] == victim + 1  # its neighbours still read
    report = check_cache(root, progress=False)
    assert [(p["kind"], p["origins"], p["file"]) for p in report["problems"]] == [
        ("undecodable", [victim, victim], rel)]
    repaired = repair(root, report, progress=False)
    assert [r["file"] for r in repaired] == [rel]
    assert check_cache(root, progress=False)["ok"]
    assert np.array_equal(VoxelCacheDataset(root)[victim]["image"], VoxelCacheDataset(zstd_uint8)[victim]["image"])


def test_truncated_compressed_shard_and_foreign_codec(zstd_uint8, tmp_path):
    root = tmp_path / "cut.zarr"
    shutil.copytree(zstd_uint8, root)
    layout = fmt.VoxelLayout(root)
    last = layout.n_origins - 1
    path = layout.shard_path(last // layout.origins_per_shard)
    size = path.stat().st_size - 40
    path.write_bytes(path.read_bytes()[:size])  # its tail, read as the index, is frame bytes: named as a cut
    with pytest.raises(fmt.CacheError, match=f"origin {last}: shard file .*{path.name}: truncated shard: {size} bytes"):
        VoxelCacheDataset(root)[last]
    kinds = {p["kind"] for p in check_cache(root, progress=False)["problems"]}
    assert kinds == {"truncated-shard"}
    meta = json.loads((root / fmt.VOXELS / "zarr.json").read_text())
    meta["codecs"][0]["configuration"]["codecs"][1] = {"name": "gzip", "configuration": {"level": 5}}
    (root / fmt.VOXELS / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(fmt.CacheError, match="compressed with codec 'gzip', which this reader does not support"):
        VoxelCacheDataset(root)
    out = subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "check", str(root)], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "codec 'gzip'" in out.stderr and "Traceback" not in out.stderr


def test_compression_level_out_of_range_is_a_usage_error(tmp_path, data_dir):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", str(data_dir / "1aa5.cif.gz"),
                          "--out", str(tmp_path / "x.zarr"), "--compression-level", "30"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--compression-level must be between 1 and 22, got 30" in out.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_missing_compressed_shard_is_one_clean_error(zstd_uint8, tmp_path):
    """A deleted shard: CacheError naming it, in a fresh process, with nothing else on stderr."""
    root = tmp_path / "gone.zarr"
    shutil.copytree(zstd_uint8, root)
    layout = fmt.VoxelLayout(root)
    layout.shard_path(1).unlink()
    code = ("import sys\nfrom cache_tools import VoxelCacheDataset, format as fmt\n"
            f"ds = VoxelCacheDataset({str(root)!r})\n"
            "try:\n"
            f"    ds[{layout.origins_per_shard}]\n"
            "except fmt.CacheError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.strip() == (f"{root}: origin {layout.origins_per_shard}: shard file "
                                  f"{layout.shard_path(1)} is missing")
