"""Issue 12, items 1-4: structure positions, split-local indices, index types, rotations reported."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from cache_tools import VoxelCacheDataset
from cache_tools.read.rotations import CUBE_ROTATION_MATRICES, rotate_view
from cache_tools.commands.split import assign_splits

from test_build import reference_image, structure_of


@pytest.fixture()
def split_cache(cache_factory, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(cache_factory(), root)
    assign_splits(root, val=0.4, seed=0)
    return root


def test_structure_positions_negative_and_out_of_range(cache_factory):
    ds = VoxelCacheDataset(cache_factory())
    n = ds.n_structures
    assert n == 5
    assert ds.structure_id(-1) == ds.structure_id(n - 1) != ""
    assert ds.origins_of_structure(-1) == ds.origins_of_structure(n - 1)
    assert ds.origins_of_structure(n - 1).stop == len(ds)
    for bad in (n, -n - 1):
        with pytest.raises(IndexError, match=f"structure {bad} out of range for {n} structures"):
            ds.structure_id(bad)
        with pytest.raises(IndexError, match=f"structure {bad} out of range for {n} structures"):
            ds.origins_of_structure(bad)


def test_split_positions_are_local_ids_are_global(split_cache):
    full, val = VoxelCacheDataset(split_cache), VoxelCacheDataset(split_cache, split="val")
    codes = zarr.open_group(str(split_cache), mode="r")["structures/split"][:]
    rows = np.flatnonzero(codes == 1)  # 'val'
    assert val.n_structures == len(rows) == 2 and full.n_structures == 5
    seen = []
    for k in range(val.n_structures):
        row = val.structure_row(k)
        assert row == rows[k] and val.local_structure(row) == k
        assert val.structure_id(k) == full.structure_id(row)
        local = val.origins_of_structure(k)
        assert len(local) == len(full.origins_of_structure(row))
        for i in local:
            sample = val[i]  # a local index from origins_of_structure is valid in this split
            assert sample["structure_index"] == row  # ids in samples are global
            assert sample["origin_id"] in full.origins_of_structure(row)
            assert val.index_of(sample["origin_id"]) == i == val.index_of(val.origin_id(i))
            seen.append(i)
    assert seen == list(range(len(val)))
    train_origin = full.origins_of_structure(int(np.flatnonzero(codes == 0)[0])).start
    with pytest.raises(ValueError, match=f"origin id {train_origin} .* is not in split 'val'"):
        val.index_of(train_origin)
    with pytest.raises(ValueError, match="structure row .* is not in split 'val'"):
        val.local_structure(int(np.flatnonzero(codes == 0)[0]))
    with pytest.raises(IndexError, match=f"origin id {len(full)} out of range"):
        val.index_of(len(full))
    with pytest.raises(IndexError, match="structure 2 out of range for 2 structures in split 'val'"):
        val.origins_of_structure(2)
    assert full.index_of(17) == 17


def test_index_types(cache_factory):
    ds = VoxelCacheDataset(cache_factory())
    for index in (3, np.int64(3), np.uint16(3), np.array(3), torch.tensor(3), torch.tensor(3, dtype=torch.uint8)):
        sample = ds[index]
        assert sample["image"].shape == (4, 11, 11, 11) and sample["origin_id"] == 3, type(index)
    for index, name in ((3.0, "float"), (3.7, "float"), (True, "bool"), (np.float32(3), "float32"),
                        (torch.tensor(3.0), "float32"), (torch.tensor(True), "bool"), ("3", "str"),
                        (None, "NoneType")):
        with pytest.raises(TypeError, match=name):
            ds[index]
    with pytest.raises(TypeError, match="indices must be integers, got float64"):
        ds[[1.5, 2.0]]
    for index, expected in ((slice(0, 3), [0, 1, 2]), (slice(None, None, -7), list(range(len(ds) - 1, -1, -7))),
                            (slice(-2, None), [len(ds) - 2, len(ds) - 1])):
        batch = ds[index]
        assert batch["origin_id"].tolist() == expected
        assert torch.equal(batch["image"], ds[expected]["image"])
    assert ds[5:5]["image"].shape == (0, 4, 11, 11, 11)


def test_cube_rotation_reported_and_matrix_maps_atoms(cache_factory):
    root = cache_factory("float32", rotations=3)
    group = zarr.open_group(str(root), mode="r")
    ds = VoxelCacheDataset(root, rotate=True, seed=5)
    plain = VoxelCacheDataset(root)
    indices = list(range(0, len(ds), 7))
    batch = ds[indices]
    cubes = set()
    for k, i in enumerate(indices):
        sample = ds[i]
        r, cube = sample["rotation"], sample["cube_rotation"]
        assert (int(batch["rotation"][k]), int(batch["cube_rotation"][k])) == (r, cube)
        cubes.add(cube)
        stored = group["voxels"][sample["origin_id"], r]
        assert np.array_equal(sample["image"].numpy(), rotate_view(stored, cube))
        q = ds.rotation_matrix(sample)
        assert torch.equal(ds.rotation_matrix(batch)[k], q)
        expected = CUBE_ROTATION_MATRICES[cube] @ group["origins/rotation"][sample["origin_id"], r]
        assert np.allclose(q.numpy(), expected, atol=1e-6)
        assert plain[i]["cube_rotation"] == 0
    assert len(cubes) > 3
    # The matrix is the one the image shows: voxelizing the atoms turned by Q about the centre
    # (macromol_voxelize, public API) gives the sample's image.
    for i in indices[:3]:
        sample = ds[i]
        source, _ = structure_of(group, sample["origin_id"])
        expected = reference_image(source, sample["center_A"].numpy(), 11,
                                   rotation=ds.rotation_matrix(sample).numpy().astype(np.float64))
        assert expected.sum() > 10
        assert np.allclose(sample["image"].numpy(), expected, atol=1e-4)


def test_in_memory_structure_selection(split_cache):
    full = VoxelCacheDataset(split_cache)
    picked = VoxelCacheDataset(split_cache, structures=np.array([3, 1, 3]))
    assert picked.n_structures == 2 and [picked.structure_row(k) for k in range(2)] == [1, 3]
    assert len(picked) == len(full.origins_of_structure(1)) + len(full.origins_of_structure(3))
    assert picked[0]["origin_id"] == full.origins_of_structure(1).start
    codes = zarr.open_group(str(split_cache), mode="r")["structures/split"][:]
    both = VoxelCacheDataset(split_cache, split="val", structures=range(5))
    assert [both.structure_row(k) for k in range(both.n_structures)] == np.flatnonzero(codes == 1).tolist()
    with pytest.raises(IndexError, match="structures: row 9 out of range for 5 structures"):
        VoxelCacheDataset(split_cache, structures=[0, 9])
