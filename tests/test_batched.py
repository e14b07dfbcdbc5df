"""Batched reads (__getitems__), the block sampler and batch rotations."""
from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import BatchSampler, DataLoader

from cache_tools import BlockShuffleSampler, RandomCubeRotation, VoxelCacheDataset, batch_collate
from cache_tools.read.batch import SampleBatch
from cache_tools.read.rotations import CUBE_ROTATION_MATRICES, rotate_batch, rotate_tensor
from cache_tools.commands.split import assign_splits


def zarr_reference(ds, data) -> np.ndarray:
    """What a batch's images must be, computed without the reader or rotate_view: zarr reads
    each origin's stored image (its stored rotation when R > 1), dequantized in float32, then
    turned voxel by voxel by the cube rotation's matrix M (an input voxel at centred
    coordinates u lands at M @ u)."""
    voxels = zarr.open_group(ds.root, mode="r")["voxels"]
    out = []
    for origin, stored, cube in zip(data["origin_id"].tolist(), data["rotation"].tolist(),
                                    data["cube_rotation"].tolist()):
        image = voxels[origin][stored] if ds.n_rotations > 1 else voxels[origin]
        image = image.astype(np.float32) * np.float32(ds.scale)
        n = image.shape[-1]
        u = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij")).reshape(3, -1) - (n - 1) / 2
        v = np.rint(CUBE_ROTATION_MATRICES[cube] @ u + (n - 1) / 2).astype(int)
        turned = np.empty_like(image)
        turned[:, v[0], v[1], v[2]] = image.reshape(image.shape[0], -1)
        out.append(turned)
    return np.stack(out)


def assert_batch_matches_items(ds, indices):
    batch = ds.__getitems__(indices)
    assert isinstance(batch, SampleBatch) and len(batch) == len(indices)
    data = batch.data
    assert data["image"].shape[0] == len(indices) and data["image"].dtype == torch.float32
    for k, i in enumerate(indices):
        item = ds[i]
        assert torch.equal(data["image"][k], item["image"]), (k, i)
        assert int(data["origin_id"][k]) == item["origin_id"]
        assert int(data["structure_index"][k]) == item["structure_index"]
        assert torch.equal(data["center_A"][k], item["center_A"])
        assert int(data["rotation"][k]) == item["rotation"]
    assert np.array_equal(data["image"].numpy(), zarr_reference(ds, data))


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_batched_equals_per_item(cache_factory, dtype):
    ds = VoxelCacheDataset(cache_factory(dtype))
    rng = np.random.default_rng(2)
    # random ids, repeated ids, runs of consecutive ids, shard boundaries, negative ids
    indices = [*rng.integers(0, len(ds), 40).tolist(), 3, 3, 10, 11, 12, 13, len(ds) - 1, -2, 0]
    assert_batch_matches_items(ds, indices)
    assert_batch_matches_items(VoxelCacheDataset(cache_factory(dtype), rotate=True, seed=4), indices)


@pytest.mark.parametrize("dtype,compression", [("uint8", "none"), ("uint8", "zstd"), ("float16", "none")])
def test_stored_dtype_batches_times_scale_equal_the_default(cache_factory, dtype, compression):
    """dequantize=False hands over the stored values; * ds.scale gives the default images."""
    cache = cache_factory(dtype, compression=compression)
    default, stored = VoxelCacheDataset(cache), VoxelCacheDataset(cache, dequantize=False)
    ids = [5, 0, len(default) - 1, 5, 17, 16]
    batch = stored[ids]["image"]
    assert batch.dtype == {"uint8": torch.uint8, "float16": torch.float16}[dtype]
    assert batch.float().sum() > 0 and stored[3]["image"].dtype == batch.dtype
    want = default[ids]["image"]
    assert torch.equal(batch.float() * np.float32(stored.scale), want)
    assert torch.equal(stored[17]["image"], batch[4]) and torch.equal(default[17]["image"], want[4])
    assert (stored.scale == 1.0) == (dtype == "float16")  # only uint8 is quantized


def test_batched_equals_per_item_stored_rotations_verify_and_split(cache_factory, tmp_path):
    rotated = VoxelCacheDataset(cache_factory("float32", rotations=3), seed=2)
    assert_batch_matches_items(rotated, list(range(0, len(rotated), 3)))
    root = tmp_path / "c.zarr"
    shutil.copytree(cache_factory("uint8"), root)
    assign_splits(root, val=0.4, seed=0)
    val = VoxelCacheDataset(root, split="val", verify=True)
    assert_batch_matches_items(val, list(range(len(val)))[::-1])
    with pytest.raises(IndexError, match="out of range"):
        val.__getitems__([0, len(val)])


def test_dataloader_paths_agree(cache_factory):
    ds = VoxelCacheDataset(cache_factory("float16"), pin_memory=True)  # pinning is a no-op without CUDA
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    default = list(DataLoader(ds, batch_size=16, sampler=order))                    # default collate
    fast = list(DataLoader(ds, batch_size=16, sampler=order, collate_fn=batch_collate))
    by_list = list(DataLoader(ds, batch_size=None, sampler=BatchSampler(order, 16, drop_last=False)))
    workers = list(DataLoader(ds, batch_size=16, sampler=order, collate_fn=batch_collate,
                              num_workers=2, pin_memory=True))
    assert len(default) == len(fast) == len(by_list) == len(workers) == -(-len(ds) // 16)
    for a, b, c, d in zip(default, fast, by_list, workers):
        for key in ("image", "origin_id", "center_A", "structure_index", "rotation"):
            assert torch.equal(a[key], b[key]) and torch.equal(b[key], c[key]) and torch.equal(c[key], d[key])
    assert torch.cat([b["origin_id"] for b in fast]).tolist() == order


def test_batch_rotations_equal_per_sample():
    images = torch.rand(30, 2, 5, 5, 5)
    ks = torch.arange(30) % 24
    rotated = rotate_batch(images, ks)
    for b in range(30):
        assert torch.equal(rotated[b], rotate_tensor(images[b], int(ks[b])))
    aug = RandomCubeRotation(seed=1)(images)
    assert aug.shape == images.shape
    assert torch.allclose(aug.sum(dim=(1, 2, 3, 4)), images.sum(dim=(1, 2, 3, 4)))
    assert not torch.equal(aug, images)
    assert torch.equal(RandomCubeRotation(seed=1)(images), aug)


def test_block_shuffle_sampler():
    sampler = BlockShuffleSampler(103, block_size=8, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(103)) and len(sampler) == 103
    runs = [block for block, _ in itertools.groupby(first, key=lambda x: x // 8)]
    assert sorted(runs) == list(range(13))  # each block comes whole, once
    assert runs != sorted(runs) and first[:8] != sorted(first[:8])  # block order and insides shuffled
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(103))
    ranks = [list(BlockShuffleSampler(103, 8, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(103)) and not set(ranks[0]) & set(ranks[1])
    assert [len(BlockShuffleSampler(103, 8, seed=5, num_replicas=2, rank=r)) for r in range(2)] == \
        [len(r) for r in ranks]


def test_prefetch_reads_the_same(cache_factory):
    plain = VoxelCacheDataset(cache_factory("uint8"))
    hinted = VoxelCacheDataset(cache_factory("uint8"), prefetch=True)
    ids = [0, 1, 2, 40, 41, len(plain) - 1, 7]
    assert torch.equal(plain.__getitems__(ids).data["image"], hinted.__getitems__(ids).data["image"])
    assert all(torch.equal(plain[i]["image"], hinted[i]["image"]) for i in ids)
    assert plain.prefetch is False, "auto: a cache far smaller than RAM needs no prefetch"
