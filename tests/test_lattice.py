"""Lattice voxelization: crops of lattice tiles equal macromol_voxelize at each stored centre."""
from __future__ import annotations

import numpy as np
import pytest

from cache_tools import format as fmt
from pipeline.build import build_cache
from pipeline.encode import LatticeEncoder, OriginEncoder, lattice_exact, snap_centers, tile_order
from pipeline.origins import OriginRule, pick_origins
from pipeline.parse import parse_atoms, parse_channels
from pipeline.voxelize import ImageSpec, Storage, voxelize

from conftest import DATA, small_params

CHANNELS = parse_channels("C,N,O,*")
ALL_FILES = sorted(p.name for p in DATA.iterdir())


@pytest.mark.parametrize("grid", [21, 10])
def test_crops_equal_per_origin_voxelization_on_every_sample_file(grid):
    spec = ImageSpec(grid, 1.0, len(CHANNELS), 0.5)
    storage = Storage("float32")
    # Tiles of at most 3 images per side, so big structures cross many tile boundaries.
    tile_bytes = spec.n_channels * 4 * (3 * grid) ** 3
    rng = np.random.default_rng(grid)
    compared, multi_tile = 0, 0
    assert len(ALL_FILES) == 13
    for name in ALL_FILES:
        atoms = parse_atoms(DATA / name, CHANNELS)
        picked = pick_origins(atoms.xyz, OriginRule(max_per_structure=120), fmt.file_sha256(DATA / name))
        if len(picked) == 0:  # a file without buried atoms (the build records it as failed): any atoms
            picked = pick_origins(atoms.xyz, OriginRule(min_neighbors=0), fmt.file_sha256(DATA / name))
        centers = snap_centers(picked, spec).astype(np.float64)
        # snapped: at most half a voxel per axis, odd grids mid-voxel, even grids on a plane
        assert np.abs(centers - picked).max() <= 0.5
        assert np.all(centers % 1.0 == (0.5 if grid % 2 else 0.0))
        centers = centers[tile_order(centers, spec, tile_bytes)]  # as the build stores them
        encoder = LatticeEncoder(atoms.xyz, atoms.channel, spec, storage, tile_bytes=tile_bytes)
        stored = [b for b, _ in encoder.encode_many(centers)]
        assert len(stored) == len(centers) and encoder.tiles >= 1
        multi_tile += encoder.tiles > 1
        for j in rng.choice(len(centers), size=min(6, len(centers)), replace=False):
            expected = voxelize(atoms.xyz, atoms.channel, centers[j], spec)  # every atom, no pre-filter
            assert expected.sum() > 1
            assert stored[j] == expected.tobytes(), f"{name} origin {j}"
            compared += 1
    assert compared > 60 and multi_tile >= 5


def test_off_lattice_origins_and_inexact_resolutions_are_voxelized_one_by_one():
    atoms = parse_atoms(DATA / "1aa5.cif.gz", CHANNELS)
    spec = ImageSpec(9, 1.0, len(CHANNELS), 0.5)
    centers = np.vstack([snap_centers(atoms.xyz[[10, 50]], spec), atoms.xyz[[100]]]).astype(np.float64)
    encoder = LatticeEncoder(atoms.xyz, atoms.channel, spec, Storage("float32"))
    q, on = encoder.corners(centers)
    assert on.tolist() == [True, True, False]
    for j, (stored, _) in enumerate(encoder.encode_many(centers)):
        assert stored == voxelize(atoms.xyz, atoms.channel, centers[j], spec).tobytes()
    assert encoder.tiles == 1
    assert lattice_exact(ImageSpec(9, 0.75)) and not lattice_exact(ImageSpec(9, 0.3))
    inexact = ImageSpec(9, 0.3, len(CHANNELS), 0.5)
    assert not LatticeEncoder(atoms.xyz, atoms.channel, inexact, Storage()).corners(
        snap_centers(centers, inexact).astype(np.float64))[1].any()


def test_origins_file_is_snapped_and_exact_centers_keeps_it(tmp_path):
    source = DATA / "1aa5.cif.gz"
    atoms = parse_atoms(source, CHANNELS)
    listed = atoms.xyz[[5, 80, 150]] + np.array([0.3, -0.2, 0.45])
    origins = tmp_path / "origins.csv"
    origins.write_text("structure_id,x,y,z\n" + "".join(f"1aa5,{float(x)!r},{float(y)!r},{float(z)!r}\n" for x, y, z in listed))
    for exact in (False, True):
        out = tmp_path / f"c-{exact}.zarr"
        params = small_params(origins_file=str(origins), exact_centers=exact)
        build_cache([str(source)], out, params, workers=1, progress=False)
        centers = fmt.read_array(out, fmt.CENTER)
        expected_centers = listed.astype(np.float32) if exact else np.floor(listed).astype(np.float32) + 0.5
        assert np.array_equal(centers, expected_centers)
        assert fmt.read_attrs(out).params.centers == ("exact" if exact else "lattice")
        layout = fmt.VoxelLayout(out)
        reference = OriginEncoder(atoms.xyz, atoms.channel, params.image, params.storage)
        for origin in range(3):
            shard, offset = layout.locate(origin)
            with open(layout.shard_path(shard), "rb") as fh:
                fh.seek(offset)
                assert fh.read(layout.origin_nbytes) == reference.encode(centers[origin])[0]


def test_write_tasks_follow_structures_not_shards():
    """Shards of 10 origins, structures of 33 and 62: tasks of ~20 origins end near a
    structure's end (boundary 30, 3 from the first's end; 90, 5 from the second's), else at
    twice the target (70), and never span a shard that is already written (gap 5)."""
    from pipeline.build import plan_write_tasks

    ranges = np.array([[0, 33], [33, 95]])
    assert plan_write_tasks(list(range(10)), 10, 95, ranges, 20) == [[0, 1, 2], [3, 4, 5, 6], [7, 8], [9]]
    assert plan_write_tasks([0, 1, 2, 3, 4, 6, 7], 10, 95, ranges, 1000) == [[0, 1, 2, 3, 4], [6, 7]]
    assert plan_write_tasks([0, 1, 2], 10, 25, np.array([[0, 25]]), 1) == [[0], [1], [2]]
