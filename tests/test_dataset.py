"""VoxelCacheDataset against zarr's reading of the same store, in real DataLoader workers."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, DistributedSampler

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.read.rotations import CUBE_ROTATION_MATRICES, compose, inverse, rotate_tensor, rotate_view
from cache_tools.commands.split import assign_splits

from conftest import DATA
from test_build import reference_image, structure_of


def zarr_image(root, origin: int) -> np.ndarray:
    group = zarr.open_group(str(root), mode="r")
    scale = group.attrs[fmt.ATTRS_KEY]["params"]["storage"]["scale"]
    return group["voxels"][origin].astype(np.float32) * np.float32(scale)


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_images_equal_zarr(cache_factory, dtype):
    root = cache_factory(dtype)
    ds = VoxelCacheDataset(root)
    assert len(ds) == fmt.VoxelLayout(root).n_origins
    centers = zarr.open_group(str(root), mode="r")["origins/center_A"][:]
    for i in np.random.default_rng(0).choice(len(ds), 15, replace=False):
        sample = ds[int(i)]
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (4, 11, 11, 11)
        assert np.array_equal(sample["image"].numpy(), zarr_image(root, int(i)))
        assert sample["origin_id"] == i
        assert np.array_equal(sample["center_A"].numpy(), centers[i])
    sample = ds[len(ds) - 1]
    sample["image"].fill_(-1)  # the caller's to modify: the cache is untouched
    assert np.array_equal(ds[len(ds) - 1]["image"].numpy(), zarr_image(root, len(ds) - 1))


def loader_samples(ds, method: str, **kw) -> dict[int, float]:
    loader = DataLoader(ds, batch_size=7, num_workers=2, multiprocessing_context=method, **kw)
    out = {}
    for batch in loader:
        for origin, image in zip(batch["origin_id"].tolist(), batch["image"]):
            out[origin] = float(image.double().sum())
    return out


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(cache_factory, method):
    root = cache_factory("uint8")
    ds = VoxelCacheDataset(root)
    ds[0]  # maps opened in the parent must not leak into workers
    got = loader_samples(ds, method, persistent_workers=True)
    assert sorted(got) == list(range(len(ds)))
    for origin in (0, 17, len(ds) - 1):
        assert got[origin] == pytest.approx(float(zarr_image(root, origin).astype(np.float64).sum()), rel=1e-6)


def test_pickle_small_for_large_cache(tmp_path_factory):
    """Pickled size does not grow with N: checked on a cache of >= 50k origins."""
    src = tmp_path_factory.mktemp("big-src")
    for k in range(3):
        shutil.copy(DATA / "3v4i.cif.gz", src / f"3v4i_copy{k}.cif.gz")
    root = tmp_path_factory.mktemp("big") / "big.zarr"
    from pipeline.build import build_cache
    from conftest import small_params
    params = small_params(dtype="uint8", grid=2, max_origins=0, keep_duplicates=True)  # 3 copies, 3 structures
    params = type(params)(**{**params.__dict__, "rule": type(params.rule)(min_neighbors=0, min_spacing_A=0.0,
                                                                           max_per_structure=0)})
    build_cache([str(src)], root, params, workers=2, progress=False)
    # The three copies are one entry, so `split` would keep them together: assign by hand.
    fmt.write_array(root, fmt.STRUCTURE_SPLIT, np.array([0, 1, 0], dtype=np.uint8))
    fmt.update_attrs(root, splits=("train", "val", "test"),
                     metadata_crc32={**fmt.read_attrs(root).metadata_crc32,
                                     fmt.STRUCTURE_SPLIT: fmt.chunk_crc32(root, fmt.STRUCTURE_SPLIT)})
    ds = VoxelCacheDataset(root)
    assert len(ds) >= 50_000
    for i in range(0, len(ds), 997):
        ds[i]
    size = len(pickle.dumps(ds))
    assert size < 10_000, size
    val = VoxelCacheDataset(root, split="val")
    assert len(val) == 17696 and len(pickle.dumps(val)) < 10_000
    clone = pickle.loads(pickle.dumps(val))
    assert clone[123]["origin_id"] == val[123]["origin_id"]
    assert np.array_equal(clone[5000]["image"], val[5000]["image"])


def test_splits_by_structure(cache_factory, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(cache_factory(), root)
    ids_file = tmp_path / "val.txt"
    ids_file.write_text("1AA5\n3fy3\n")
    with pytest.raises(fmt.CacheError, match="no split named 'val'.*cache-tools split"):
        VoxelCacheDataset(root, split="val")
    proc = subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "split", str(root), "--from-file",
                           f"val={ids_file}", "--test", "0.2", "--seed", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "val: 2 structures" in proc.stdout and "test: 1 structures" in proc.stdout
    full = VoxelCacheDataset(root)
    splits = {name: VoxelCacheDataset(root, split=name) for name in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == len(full)
    val = splits["val"]
    assert {full.structure_id(val[i]["structure_index"]) for i in range(len(val))} == {"1aa5", "3fy3"}
    assert {val.structure_id(k) for k in range(val.n_structures)} == {"1aa5", "3fy3"}
    seen = [d[i]["origin_id"] for d in splits.values() for i in range(len(d))]
    assert sorted(seen) == list(range(len(full)))  # disjoint and complete
    k = val[0]["structure_index"]
    assert val[0]["origin_id"] == full.origins_of_structure(k).start
    with pytest.raises(IndexError, match=f"index {len(val)} out of range .* split 'val'"):
        val[len(val)]
    bad = subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "split", str(root), "--from-file",
                          f"val={tmp_path / 'missing.txt'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.txt: cannot read id list" in bad.stderr


def test_train_and_val_loaders_alive_together_with_distributed_sampler(cache_factory, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(cache_factory(), root)
    assign_splits(root, val=0.4, seed=0)
    train, val = VoxelCacheDataset(root, split="train"), VoxelCacheDataset(root, split="val")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(train, num_replicas=2, rank=rank, shuffle=True, seed=0)
        train_loader = DataLoader(train, batch_size=4, sampler=sampler, num_workers=2, persistent_workers=True)
        val_loader = DataLoader(val, batch_size=4, num_workers=2, persistent_workers=True)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            ids = [o for b in train_loader for o in b["origin_id"].tolist()]
            val_ids = [o for b in val_loader for o in b["origin_id"].tolist()]
            assert len(val_ids) == len(val)
            if epoch == 0:
                seen += ids
    expected = sorted(train[i]["origin_id"] for i in range(len(train)))
    assert sorted(set(seen)) == expected  # the two ranks together cover the train split


def test_cube_rotations_exact():
    rng = np.random.default_rng(0)
    image = rng.random((2, 5, 5, 5)).astype(np.float32)  # asymmetric
    rotated = [rotate_view(image, k) for k in range(24)]
    assert len({r.tobytes() for r in rotated}) == 24
    for k, r in enumerate(rotated):
        assert r.sum(dtype=np.float64) == pytest.approx(image.sum(dtype=np.float64), rel=1e-12)
        assert np.array_equal(rotate_view(r, inverse(k)), image)
        assert np.array_equal(rotate_tensor(torch.from_numpy(image), k).numpy(), r)
        assert round(np.linalg.det(CUBE_ROTATION_MATRICES[k])) == 1
    assert compose(5, inverse(5)) == 0 and len({compose(3, k) for k in range(24)}) == 24
    # Rotation k moves a voxel at centred coordinate u to M_k @ u.
    probe = np.zeros((5, 5, 5), np.float32)
    probe[4, 2, 2] = 1  # u = (2, 0, 0)
    for k in range(24):
        target = CUBE_ROTATION_MATRICES[k] @ np.array([2, 0, 0]) + 2
        assert rotate_view(probe, k)[tuple(target)] == 1


def test_rotate_augmentation_reproducible_and_epoch_dependent(cache_factory):
    root = cache_factory()
    plain = VoxelCacheDataset(root)
    aug = VoxelCacheDataset(root, rotate=True, seed=7)
    base = plain[3]["image"].numpy()
    first = aug[3]["image"].numpy()
    assert np.array_equal(first, VoxelCacheDataset(root, rotate=True, seed=7)[3]["image"].numpy())
    assert any(np.array_equal(first, rotate_view(base, k)) for k in range(24))
    per_epoch = []
    for epoch in range(6):
        aug.set_epoch(epoch)
        per_epoch.append(aug[3]["image"].numpy().tobytes())
    assert len(set(per_epoch)) > 1


def test_stored_rotations(cache_factory):
    root = cache_factory("float32", rotations=3)
    group = zarr.open_group(str(root), mode="r")
    assert group["voxels"].shape[1:] == (3, 4, 11, 11, 11)
    mats = group["origins/rotation"][:]
    assert np.allclose(mats[:, 0], np.eye(3))
    for origin in (0, 9, 30):  # every stored rotation is macromol_voxelize of the rotated atoms
        source, _ = structure_of(group, origin)
        for r in range(3):
            expected = reference_image(source, group["origins/center_A"][origin], 11, rotation=mats[origin, r])
            assert np.array_equal(group["voxels"][origin, r], expected)
        assert not np.array_equal(group["voxels"][origin, 1], group["voxels"][origin, 0])
    ds = VoxelCacheDataset(root, seed=1)
    chosen = set()
    loader = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    for epoch in range(4):
        ds.set_epoch(epoch)  # reaches the persistent workers through shared memory
        for batch in loader:
            for o, r, img in zip(batch["origin_id"].tolist(), batch["rotation"].tolist(), batch["image"]):
                if o == 9:
                    chosen.add(r)
                    assert np.array_equal(img.numpy(), group["voxels"][9, r])
    assert len(chosen) > 1


def test_clear_errors(cache_factory, tmp_path):
    with pytest.raises(fmt.CacheError, match="nope.zarr: no such cache"):
        VoxelCacheDataset(tmp_path / "nope.zarr")
    root = tmp_path / "c.zarr"
    shutil.copytree(cache_factory(), root)
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"][fmt.ATTRS_KEY]["format_version"] = 99
    (root / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(fmt.CacheError, match="format version 99 is not supported"):
        VoxelCacheDataset(root)
    meta["attributes"][fmt.ATTRS_KEY].update(format_version=fmt.FORMAT_VERSION, complete=False)
    (root / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(fmt.CacheError, match="build incomplete"):
        VoxelCacheDataset(root)
    meta["attributes"][fmt.ATTRS_KEY]["complete"] = True
    (root / "zarr.json").write_text(json.dumps(meta))
    ds = VoxelCacheDataset(root)
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    # Damage: a truncated shard names the origin; never silent zeros.
    layout = fmt.VoxelLayout(root)
    last = layout.n_origins - 1
    path = layout.shard_path(layout.locate(last)[0])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(fmt.CacheError, match=f"origin {last}: shard file .* is truncated"):
        ds[last]
    path.unlink()
    with pytest.raises(fmt.CacheError, match=f"origin {last}: shard file .* is missing"):
        VoxelCacheDataset(root)[last]


def test_verify_detects_byte_flip(cache_factory, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(cache_factory(), root)
    layout = fmt.VoxelLayout(root)
    shard, offset = layout.locate(20)
    data = bytearray(layout.shard_path(shard).read_bytes())
    data[offset + 1000] ^= 0x40
    layout.shard_path(shard).write_bytes(bytes(data))
    VoxelCacheDataset(root)[20]  # unverified reads do not look
    with pytest.raises(fmt.CacheError, match="origin 20: checksum mismatch"):
        VoxelCacheDataset(root, verify=True)[20]
    assert VoxelCacheDataset(root, verify=True)[21]["origin_id"] == 21


def test_training_side_imports_only_numpy_and_torch(cache_factory):
    code = ("import sys; from cache_tools import VoxelCacheDataset; ds = VoxelCacheDataset(sys.argv[1]); ds[0];"
            "heavy = [m for m in ('zarr', 'gemmi', 'dask', 'distributed', 'polars', 'macromol_voxelize', "
            "'matplotlib', 'pandas', 'pipeline') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(cache_factory())], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
