"""The lattice layout: every view cut from the stored blocks equals macromol_voxelize at its centre."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.read.lattice import LatticeReader
from pipeline.parse import parse_atoms, parse_channels
from pipeline.voxelize import ImageSpec, Storage, voxelize

from conftest import DATA

CHANNELS = parse_channels("C,N,O,*")
ALL_FILES = sorted(p.name for p in DATA.iterdir())
from conftest import THREE


def expected_view(atoms, center: np.ndarray, n: int, dtype: str) -> np.ndarray:
    """macromol_voxelize's image of every atom at ``center``, stored as the cache stores it."""
    image = voxelize(atoms.xyz, atoms.channel, center, ImageSpec(n, 1.0, len(CHANNELS), 0.5))
    return Storage(dtype).encode(image)[0]


def test_views_of_any_size_anywhere_equal_the_voxelizer_on_every_sample_file(lattice_factory):
    """Odd and even sizes, smaller and larger than the build's grid, at block edges, across the
    lattice's edge and wholly outside it: uint8 through the same quantization, every file."""
    root = lattice_factory(tuple(ALL_FILES))
    reader = LatticeReader(str(root))
    ids = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
    grid = fmt.read_array(root, fmt.LATTICE_GRID)
    centers = fmt.read_array(root, fmt.CENTER)
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    rng = np.random.default_rng(0)
    compared = 0
    assert len(grid) == 12  # 13 files, one without origins
    for row in range(len(grid)):
        name = fmt.ragged_item(*ids, row)
        atoms = parse_atoms(next(DATA.glob(name + ".cif*")), CHANNELS)
        origin = int(rng.integers(ranges[row, 0], ranges[row, 1]))
        corner, dims = grid[row, :3].astype(np.int64), grid[row, 3:].astype(np.int64)
        cases = [(n, fmt.view_corner(centers[origin][None], 1.0, n)[0]) for n in (21, 20, 9, 33)]
        cases += [(16, corner + 8 * rng.integers(0, dims)),              # a block's corner
                  (21, corner - 7),                                       # across the lattice's low edge
                  (12, corner + 8 * dims - 6),                            # across its high edge
                  (10, corner - 40)]                                      # wholly outside: zeros
        for n, low in cases:
            out = np.empty((1, n, n, n, len(CHANNELS)), np.uint8)
            reader.read(np.array([row]), np.array([low]), n, out)
            want = expected_view(atoms, fmt.view_center(low[None], 1.0, n)[0], n, "uint8")
            assert np.array_equal(out[0].transpose(3, 0, 1, 2), want), (name, n, low)
            compared += 1
    assert compared == 12 * 8


@pytest.mark.parametrize("dtype,compression", [("float32", "none"), ("uint8", "zstd"), ("uint8", "none")])
def test_every_origin_reads_as_in_the_per_origin_cache(lattice_factory, dtype, compression):
    lattice = VoxelCacheDataset(lattice_factory(dtype=dtype, compression=compression))
    origins = VoxelCacheDataset(lattice_factory(dtype=dtype, compression=compression, layout="origins"))
    assert len(lattice) == len(origins) > 60
    ids = list(range(len(lattice)))
    a, b = lattice[ids], origins[ids]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["center_A"], b["center_A"])
    assert a["image"].is_contiguous(memory_format=torch.channels_last_3d)
    for i in (0, 7, len(lattice) - 1):  # per item as in the batch
        assert torch.equal(lattice[i]["image"], b["image"][i])
    stored = VoxelCacheDataset(lattice.root, dequantize=False)[ids]["image"]
    assert torch.equal(stored.float() * np.float32(lattice.scale), a["image"])


def test_jitter_rotation_and_sizes_are_views_at_the_reported_centre(lattice_factory):
    root = lattice_factory()
    atoms = {Path(f).name.split(".")[0]: parse_atoms(DATA / f, CHANNELS) for f in THREE}
    ds = VoxelCacheDataset(root, grid_voxels=14, jitter_voxels=3, rotate=True, seed=5, dequantize=False)
    plain = VoxelCacheDataset(root, dequantize=False)
    batch = ds[list(range(0, len(ds), 5))]
    moved = 0
    from cache_tools.read.rotations import rotate_tensor
    for k, origin in enumerate(batch["origin_id"].tolist()):
        center = batch["center_A"][k].double().numpy()
        offset = center - plain[origin]["center_A"].double().numpy()
        assert np.all(np.abs(offset) <= 3.5) and np.all(offset % 1 == 0.5)  # 14 is even, the build's 21 odd
        moved += np.abs(offset).max() > 0.5
        name = ds.structure_id(ds.local_structure(int(batch["structure_index"][k])))
        want = torch.from_numpy(expected_view(atoms[name], center, 14, "uint8"))
        assert torch.equal(batch["image"][k], rotate_tensor(want, int(batch["cube_rotation"][k])))
        item = ds[int(origin)]
        assert torch.equal(item["image"], batch["image"][k]) and torch.equal(item["center_A"], batch["center_A"][k])
    assert moved > 3 and len(set(batch["cube_rotation"].tolist())) > 5
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["center_A"], batch["center_A"][0]) or ds[0]["cube_rotation"] != int(batch["cube_rotation"][0])


def test_rotated_copies_are_the_rotated_atoms(lattice_factory):
    root = lattice_factory(dtype="float32", compression="none", rotations=3)
    ds = VoxelCacheDataset(root, seed=1)
    mats, centers = fmt.read_array(root, fmt.LATTICE_ROTATION), fmt.read_array(root, fmt.LATTICE_ROTATION_CENTER)
    assert mats.shape[1] == 3 and np.allclose(mats[:, 0], np.eye(3))
    batch = ds[list(range(0, len(ds), 3))]
    copies = batch["rotation"].tolist()
    assert {0, 1, 2} <= set(copies)
    for k, copy in enumerate(copies):
        row = int(batch["structure_index"][k])
        name = ds.structure_id(ds.local_structure(row))
        atoms = parse_atoms(next(DATA.glob(name + ".cif*")), CHANNELS)
        xyz = fmt.copy_frame(atoms.xyz, mats[row, copy], centers[row], copy)
        inside = fmt.copy_frame(batch["center_A"][k].double().numpy()[None], mats[row, copy], centers[row], copy)[0]
        assert np.abs(inside * 2 - np.rint(inside * 2)).max() < 1e-4  # a lattice point of the copy (float32 centre)
        inside = np.rint(inside * 2) / 2
        want = voxelize(xyz, atoms.channel, inside, ImageSpec(ds.view_voxels, 1.0, 4, 0.5))
        assert torch.equal(batch["image"][k], torch.from_numpy(want)), (name, copy)
        # rotation_matrix maps structure-frame offsets onto the image axes
        q = ds.rotation_matrix({k2: batch[k2][k] for k2 in ("cube_rotation", "rotation", "structure_index",
                                                              "origin_id")}).double().numpy()
        assert np.allclose(q, mats[row, copy], atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(grid_voxels=0), "grid_voxels must be an integer >= 1, got 0"),
    (dict(grid_voxels=4.5), "grid_voxels must be an integer >= 1, got 4.5"),
    (dict(grid_voxels=1000), "grid_voxels 1000 is more than 256 voxels per side"),
    (dict(jitter_voxels=-1), "jitter_voxels must be an integer >= 0, got -1"),
    (dict(jitter_voxels=200), "jitter_voxels 200 moves a view by more than 4 of its widths"),
])
def test_bad_view_options_are_one_line(lattice_factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        VoxelCacheDataset(lattice_factory(), **kwargs)


def test_views_need_a_lattice_cache(lattice_factory):
    with pytest.raises(ValueError, match="cache stores one 21³ image per origin; build it with "
                                         "`pipeline build-cache --layout lattice`"):
        VoxelCacheDataset(lattice_factory(layout="origins"), grid_voxels=15)


def test_a_damaged_block_is_named_never_read_as_zeros(lattice_factory, tmp_path):
    root = Path(shutil.copytree(lattice_factory(), tmp_path / "damaged.zarr"))
    reader = LatticeReader(str(root))
    layout = reader.layout
    path = Path(layout.shard_file(0))
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-layout.index_nbytes:]), "<u8").reshape(-1, 2)
    offset, length = (int(v) for v in index[3])
    data[offset + length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ds = VoxelCacheDataset(root)
    lattice_of = fmt.read_array(root, fmt.LATTICE_BLOCK_START)
    assert lattice_of[1] > 3  # block 3 belongs to the first structure
    name = fmt.ragged_item(*fmt.read_ragged_strings(root, fmt.STRUCTURE_ID), 0)
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    with pytest.raises(fmt.CacheError, match=f"structure {name}: block 3 in .*blocks/c/0/0/0/0/0: does not decode"):
        ds[list(range(ranges[0, 0], ranges[0, 1]))]
    code = ("import sys\nfrom cache_tools import VoxelCacheDataset\nds = VoxelCacheDataset(sys.argv[1], verify=True)\n"
            "[ds[i] for i in range(int(sys.argv[2]))]\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(int(ranges[0, 1]))], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "block 3" in proc.stderr and "CacheError" in proc.stderr


def test_continuous_rotation_is_exact_for_cube_rotations_and_crops_in_place(lattice_factory):
    from cache_tools import ContinuousRotation
    from cache_tools.read.rotations import CUBE_ROTATION_MATRICES, rotate_tensor

    root = lattice_factory(dtype="float32", compression="none")
    augment = ContinuousRotation(11)
    big = VoxelCacheDataset(root, grid_voxels=augment.source_voxels(11))
    small = VoxelCacheDataset(root, grid_voxels=11)
    ids = [0, 9, 30]
    views, plain = big[ids]["image"], small[ids]["image"]
    for k in (0, 7, 19):
        turned, rotations = augment(views, torch.from_numpy(CUBE_ROTATION_MATRICES[k]).double().expand(3, 3, 3))
        want = torch.stack([rotate_tensor(image, k) for image in plain])
        assert torch.allclose(turned, want, atol=1e-5), k  # trilinear at voxel centres: the voxels themselves
    turned, rotations = augment(views)  # random: orthonormal, and the image keeps most of its mass
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert 0.5 < float(turned.sum() / plain.sum()) < 1.5
    with pytest.raises(ValueError, match="views of 11 voxels are too small"):
        augment(plain)
