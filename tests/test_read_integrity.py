"""Plain reads never hand back bytes that are not an image (issue 24): a frame that decodes to
another size, an index entry marked absent, a cut shard, a missing checksum array each raise
one CacheError naming the origin, on every path (ds[i], its direct decode, ds[ids], workers)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from cache_tools import VoxelCacheDataset, batch_collate
from cache_tools import format as fmt
from cache_tools.commands.check import check_cache

from conftest import build_small
from test_reader import tile_cache


@pytest.fixture(scope="module")
def zstd_uint8(cache_factory) -> Path:
    return cache_factory("uint8", compression="zstd")


@pytest.fixture(scope="module")
def zstd_float32(cache_factory, tmp_path_factory) -> Path:
    """float32 zstd: ds[i] decodes straight into the returned image (no stage, no scale)."""
    plain = cache_factory("float32")
    return tile_cache(plain, tmp_path_factory.mktemp("f32z") / "c.zarr", copies=1,
                      per_shard=fmt.VoxelLayout(plain).origins_per_shard, compression=("zstd", 3))


def _rewrite(root: Path, origin: int, frame: bytes | None = None, absent: bool = False) -> Path:
    """The shard of ``origin`` written again with ``frame`` as its stored bytes, or its index
    entry marked absent (16 x 0xff), its index otherwise consistent; returns the file."""
    layout = fmt.VoxelLayout(root)
    shard, j = divmod(origin, layout.origins_per_shard)
    path = layout.shard_path(shard)
    data = path.read_bytes()
    index = np.frombuffer(data[-layout.index_nbytes:], "<u8").reshape(-1, 2)
    frames = [data[o:o + n] for o, n in index[:layout.origins_in_shard(shard)].tolist()]
    if frame is not None:
        frames[j] = frame
    new = layout.shard_index(shard, [len(f) for f in frames])
    if absent:
        new[j] = fmt.EMPTY_INDEX_ENTRY
    path.write_bytes(b"".join(frames) + new.tobytes())
    return path


def _in_worker(root: Path, ids: list[int]) -> None:
    loader = DataLoader(VoxelCacheDataset(root), batch_size=None, num_workers=1, collate_fn=batch_collate,
                        sampler=[ids])
    for _ in loader:
        pass


def _every_path_raises(root: Path, victim: int, message: str, in_worker: bool = True) -> None:
    for kw in ({}, {"dequantize": False}):  # dequantize=False: the frame decodes straight into the image
        with pytest.raises(fmt.CacheError, match=message):
            VoxelCacheDataset(root, **kw)[victim]
    with pytest.raises(fmt.CacheError, match=message):
        VoxelCacheDataset(root, threads=2)[[0, victim, 1]]
    with pytest.raises(fmt.CacheError, match=message):
        VoxelCacheDataset(root, rotate=True)[[victim]]
    if in_worker:  # a worker's error costs 5 s of DataLoader shutdown: once per kind of damage
        with pytest.raises(fmt.CacheError, match=message):
            _in_worker(root, [1, victim])


@pytest.mark.parametrize("case", ["short", "long", "absent"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_a_frame_of_the_wrong_size_or_an_absent_entry_is_named_on_every_read(
        zstd_uint8, zstd_float32, tmp_path, case, dtype):
    root = Path(shutil.copytree(zstd_uint8 if dtype == "uint8" else zstd_float32, tmp_path / "c.zarr"))
    layout = fmt.VoxelLayout(root)
    victim, nbytes = 5, layout.origin_nbytes
    encode = fmt.encoder(layout.codec)
    if case == "short":  # a frame of another cache's smaller image: NaN/garbage in the tail before
        path = _rewrite(root, victim, encode(b"\x01" * (nbytes - 64)))
        why = f"decode to {nbytes - 64} bytes, not the {nbytes} of an image"
    elif case == "long":
        path = _rewrite(root, victim, encode(b"\x01" * (nbytes + 64)))
        why = "do not decode"
    else:  # zarr's "absent" marker: zeros before, though the build writes every origin
        path = _rewrite(root, victim, absent=True)
        why = "marked absent in the shard index"
    rel = str(path.relative_to(root))
    _every_path_raises(root, victim, f"origin {victim}: .*{rel}.*{why}", in_worker=dtype == "uint8")
    assert VoxelCacheDataset(root)[victim + 1]["origin_id"] == victim + 1  # its neighbours still read
    problems = check_cache(root, progress=False)["problems"]
    assert [(p["kind"], p["origins"], p["file"]) for p in problems] == [("undecodable", [victim, victim], rel)]


def test_a_shard_of_a_smaller_grid_copied_over_is_named_not_read(zstd_uint8, tmp_path):
    """The issue's reproduction: a shard of a 7-voxel build copied over a cache of 11-voxel images."""
    root = Path(shutil.copytree(zstd_uint8, tmp_path / "c.zarr"))
    layout = fmt.VoxelLayout(root)
    small = tmp_path / "g7.zarr"
    build_small(small, files=["171l.cif.gz"], grid=7, dtype="uint8", compression="zstd",
                origins_per_shard=layout.origins_per_shard)
    other = fmt.VoxelLayout(small)
    shutil.copy(other.shard_path(0), layout.shard_path(0))
    rel = str(layout.shard_path(0).relative_to(root))
    message = (f"origin 0: compressed bytes in .*{rel} decode to {other.origin_nbytes} bytes, "
               f"not the {layout.origin_nbytes} of an image")
    _every_path_raises(root, 0, message)


def test_verify_without_the_checksum_array_raises_the_same_error_every_read(cache_factory, tmp_path):
    root = Path(shutil.copytree(cache_factory(), tmp_path / "c.zarr"))
    shutil.rmtree(root / fmt.CRC32)
    ds = VoxelCacheDataset(root, verify=True)
    messages = []
    for read in (lambda: ds[0], lambda: ds[0], lambda: ds[[1, 2]], lambda: ds[3]):
        with pytest.raises(fmt.CacheError) as caught:  # the second read raised TypeError before
            read()
        messages.append(str(caught.value))
    assert len(set(messages)) == 1 and fmt.CRC32 in messages[0], messages


@pytest.mark.parametrize("cut", ["index", "frames"])
def test_a_cut_compressed_shard_is_named_truncated(zstd_uint8, tmp_path, cut):
    root = tile_cache(zstd_uint8, tmp_path / "c.zarr", copies=1, per_shard=8)  # 8 frames a shard
    layout = fmt.VoxelLayout(root)
    shard = 1
    path = layout.shard_path(shard)
    data = path.read_bytes()
    first, n = shard * layout.origins_per_shard, layout.origins_in_shard(shard)
    index = np.frombuffer(data[-layout.index_nbytes:], "<u8").reshape(-1, 2)
    if cut == "index":  # part of the index gone: its tail read as an index points anywhere
        size = len(data) - 40
        detail = f"truncated shard: {size} bytes, expected {len(data)}"
    else:  # half the file gone: frame bytes where the index should be
        size = len(data) // 2
        inside = int(np.searchsorted(index[:n, 0] + index[:n, 1], size, side="right"))
        detail = f"truncated shard: {size} bytes, cut inside the frame of origin {first + inside}; expected at least"
    path.write_bytes(data[:size])
    rel = str(path.relative_to(root))
    problems = check_cache(root, progress=False)["problems"]
    assert {(p["kind"], p["file"]) for p in problems} == {("truncated-shard", rel)}
    assert all(p["detail"].startswith(detail) for p in problems), problems
    last = first + n - 1
    for read in (lambda: VoxelCacheDataset(root)[last], lambda: VoxelCacheDataset(root)[[0, last]]):
        with pytest.raises(fmt.CacheError, match=f"origin {last}: shard file .*{rel}: {detail}"):
            read()
