"""`cache-tools show` on lattice caches: views of any size, at the build's origins or an origin
set's, and NeighborPairs' home/neighbor views with their labels; each drawn row holds exactly the
view the Dataset returns, and a damaged block flags the views that read it, not the others."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_tools import NeighborPairs, VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.commands.cli import main as cache_tools
from cache_tools.commands.contact_sheet import face_name
from cache_tools.commands.show import collect, contact_sheet, project


@pytest.mark.parametrize("grid", [15, 30])
def test_views_of_any_size_are_drawn_from_the_dataset_s_own_arrays(lattice_factory, grid):
    root = lattice_factory()
    ds = VoxelCacheDataset(root, grid_voxels=grid)
    ids = [0, 7, len(ds) - 1]
    sheet = collect(root, ids, grid_voxels=grid)
    assert [r.origin_id for r in sheet.rows] == ids and sheet.lattice and sheet.view_voxels == grid
    for row in sheet.rows:
        sample = ds[row.origin_id]
        image = sample["image"].numpy()
        assert row.projections.shape == (4, 3, grid, grid) and "DAMAGED" not in row.flags
        np.testing.assert_array_equal(row.projections, project(image))
        assert row.image_sum == float(image.sum()) and row.image_sum > 0
        assert row.structure_id == ds.structure_id(sample["structure_index"])
        np.testing.assert_allclose(row.center_A, sample["center_A"].numpy())
    assert sheet.summary("v.png").startswith(f"v.png: 3 origins, {grid}³ views, 3 rows x 4 channels; flagged: ")
    panels = [ax for ax in contact_sheet(sheet).axes if ax.get_label().startswith("panel:")]
    # the drawn panel's pixels are the row's projections, side by side (one NaN column apart)
    strip = panels[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(strip[:, :grid]), sheet.rows[0].projections[0, 0].T)


def test_views_at_an_origin_set_and_the_command_line(lattice_factory, tmp_path, capsys):
    root = Path(shutil.copytree(lattice_factory(), tmp_path / "c.zarr"))
    centres = fmt.read_array(root, fmt.CENTER)[[3, 40]] + np.float32(1.5)
    ids = [fmt.ragged_item(*fmt.read_ragged_strings(root, fmt.STRUCTURE_ID), int(k))
           for k in fmt.read_array(root, fmt.STRUCTURE_INDEX)[[3, 40]]]
    csv = tmp_path / "sites.csv"
    csv.write_text("".join(f"{sid},{x},{y},{z}\n" for sid, (x, y, z) in zip(ids, centres.tolist())))
    assert cache_tools(["origins", str(root), "sites", "--from", str(csv)]) == 0
    capsys.readouterr()
    ds = VoxelCacheDataset(root, origins="sites", grid_voxels=17)
    sheet = collect(root, [0, 1], origins="sites", grid_voxels=17)
    for row in sheet.rows:
        sample = ds[row.origin_id]
        np.testing.assert_array_equal(row.projections, project(sample["image"].numpy()))
        np.testing.assert_allclose(row.center_A, sample["center_A"].numpy())
    assert sorted(r.structure_id for r in sheet.rows) == sorted(ids)
    out = tmp_path / "sites.png"
    assert cache_tools(["show", str(root), "0", "1", "--origins", "sites", "--grid-voxels", "17", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 2 origins of origin set 'sites', 17³ views, 2 rows x 4 channels")
    assert out.is_file()
    cases = {("2", "--origins", "sites"): "origin id 2 does not exist (origin set 'sites' holds ids 0-1)",
             ("0", "--pairs", "--rotate", "3"): "--rotate: each pair is drawn under the cube rotation",
             ("0", "--origins", "nope"): "nope"}
    for argv, reason in cases.items():
        assert cache_tools(["show", str(root), *argv, "--out", str(tmp_path / "x.png")]) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and reason in captured.err, captured.err


def test_pairs_are_drawn_home_and_neighbor_with_their_label(lattice_factory, cache_factory, tmp_path, capsys):
    root = lattice_factory()
    pairs = NeighborPairs(root, seed=5)
    sheet = collect(root, [0, 3, 9], pairs=True, seed=5)
    assert [(r.origin_id, r.role) for r in sheet.rows] == [(i, role) for i in (0, 3, 9) for role in ("home", "neighbor")]
    listed = []
    for home, neighbor in zip(sheet.rows[::2], sheet.rows[1::2]):
        sample = pairs[pairs.index_of(home.origin_id)]
        for row, v in ((home, 0), (neighbor, 1)):
            image = sample["image"][v].numpy()
            np.testing.assert_array_equal(row.projections, project(image))
            assert row.image_sum == float(image.sum()) and row.label == sample["label"]
            assert row.cube_rotation == sample["cube_rotation"]
            np.testing.assert_allclose(row.center_A, sample["center_A"][v].numpy())
        sid = pairs.structure_id(sample["structure_index"])
        assert home.structure_id == neighbor.structure_id == sid
        listed.append(f"{home.origin_id} {sid} label {sample['label']} ({face_name(sample['label'])})")
    assert sheet.summary("p.png").startswith(f"p.png: 3 pairs, 21³ views, 6 rows x 4 channels; pairs: "
                                             f"{', '.join(listed)}; flagged: ")
    assert [face_name(k) for k in range(6)] == ["-y", "+y", "-x", "+x", "+z", "-z"]
    out = tmp_path / "pairs.png"
    assert cache_tools(["show", str(root), "0", "--pairs", "--grid-voxels", "11", "--seed", "5", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 1 pairs, 11³ views, 2 rows x 4 channels; pairs: 0 ")
    # a per-origin cache cuts no views (its own size is what it stores)
    per_origin = str(cache_factory("float32"))
    assert cache_tools(["show", per_origin, "0", "--pairs", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pairs needs views cut at training time" in err
    assert cache_tools(["show", per_origin, "0", "--grid-voxels", "13", "--out", str(out)]) == 2
    assert "--grid-voxels needs views cut at training time" in capsys.readouterr().err
    assert cache_tools(["show", per_origin, "0", "--grid-voxels", "11", "--out", str(out)]) == 0


def test_a_damaged_block_flags_exactly_the_views_that_read_it(lattice_factory, tmp_path):
    root = Path(shutil.copytree(lattice_factory(), tmp_path / "c.zarr"))
    ds = VoxelCacheDataset(root)
    centers, rows = fmt.read_array(root, fmt.CENTER), fmt.read_array(root, fmt.STRUCTURE_INDEX)
    touched = [set(ds.reader.touched_blocks(int(rows[i]), fmt.view_corner(centers[i], 1.0, 21), 21).tolist())
               for i in range(len(ds))]
    mine = list(ds.origins_of_structure(1))
    counts = {}
    for i in mine:
        for b in touched[i]:
            counts[b] = counts.get(b, 0) + 1
    block = min(counts, key=lambda b: (counts[b], b))  # structure 1's block the fewest of its views read
    expected = {i for i in range(len(ds)) if block in touched[i]}
    assert expected and set(mine) - expected  # some of its views read it, some do not
    layout = fmt.VoxelLayout(root, fmt.BLOCKS)
    shard, j = divmod(block, layout.items_per_shard)
    path = layout.shard_path(shard)
    data = bytearray(path.read_bytes())
    offset, length = (int(v) for v in np.frombuffer(bytes(data[-layout.index_nbytes:]), "<u8").reshape(-1, 2)[j])
    data[offset + length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    sheet = collect(root, random=10**6)
    assert {r.origin_id for r in sheet.rows if r.damaged} == expected
    assert all(r.flags == ["DAMAGED"] and np.isnan(r.projections).all() for r in sheet.rows if r.damaged)
    assert all(np.isfinite(r.projections).all() for r in sheet.rows if not r.damaged)
    assert sheet.summary("d.png").split("flagged: ")[1].startswith(f"damaged {len(expected)} (")
