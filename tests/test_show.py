"""`cache-tools show`: the picture is drawn from the Dataset's own arrays, one panel per
origin and channel, and flags what a reviewer must see (empty, saturated, odd sums)."""
from __future__ import annotations

import contextlib
import dataclasses
import shutil

import numpy as np
import pytest
import zarr
from matplotlib.image import imread

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.commands.cli import main as cache_tools_main
from cache_tools.read.rotations import N_CUBE_ROTATIONS, rotate_view
from cache_tools.commands.show import collect, contact_sheet, origin_projections, project, render
from pipeline.build import build_cache
from pipeline.parse import parse_atoms, parse_channels
from pipeline.voxelize import Storage

from conftest import DATA, small_params


def test_projections_equal_max_of_what_the_dataset_returns_under_cube_and_stored_rotations(cache_factory):
    root = cache_factory("float32", rotations=3)
    plain = VoxelCacheDataset(root, seed=7)
    augmented = VoxelCacheDataset(root, rotate=True, seed=7)
    checked = set()
    for i in range(len(augmented)):
        sample = augmented[i]
        cube = sample["cube_rotation"]  # the rotation the Dataset applied; show applies the same
        projections, shown = origin_projections(plain, i, cube)
        image = sample["image"].numpy()
        # and it is the only one of the 24 that fits (a real image has no symmetry to hide behind)
        fits = [k for k in range(N_CUBE_ROTATIONS)
                if np.array_equal(project(rotate_view(plain[i]["image"].numpy(), k)), projections)]
        assert fits == [cube]
        assert projections.shape == (4, 3, 11, 11)
        for a in range(3):
            np.testing.assert_array_equal(projections[:, a], image.max(axis=1 + a))
        assert shown["rotation"] == sample["rotation"] and shown["origin_id"] == sample["origin_id"] == i
        checked.add((cube != 0, sample["rotation"] != 0))
        if len(checked) == 4:
            break
    assert checked == {(True, True), (True, False), (False, True), (False, False)}
    # project() itself, on a non-cubic array so a swapped axis cannot pass
    a = np.random.default_rng(0).random((2, 3, 4, 5))
    assert [p.shape for p in [project(a[..., :3, :3, :3])[0, k] for k in range(3)]] == [(3, 3)] * 3
    np.testing.assert_array_equal(project(a[:, :3, :3, :3])[:, 1], a[:, :3, :3, :3].max(axis=2))


def test_sheet_has_one_panel_per_origin_and_channel_and_the_png_decodes(cache_factory, tmp_path):
    root = cache_factory("float32", rotations=3)
    sheet = collect(root, [0, 5, 17], rotate=4)
    assert [r.origin_id for r in sheet.rows] == [0, 5, 17] and {r.cube_rotation for r in sheet.rows} == {4}
    ds = VoxelCacheDataset(root)
    assert [r.structure_id for r in sheet.rows] == [ds.structure_id(ds[i]["structure_index"]) for i in (0, 5, 17)]
    np.testing.assert_allclose(sheet.rows[1].center_A, ds[5]["center_A"].numpy())
    fig = contact_sheet(sheet)
    panels = [ax for ax in fig.axes if ax.get_label().startswith("panel:")]
    assert len(panels) == 3 * 4 and len(fig.axes) == 3 * 4 + 4  # + one colour bar per channel
    # one colour scale per channel across the sheet: its maximum over the three origins
    for c in range(4):
        limits = {ax.images[0].get_clim() for ax in panels if ax.get_label().endswith(f":{c}")}
        assert limits == {(0.0, float(max(r.projections[c].max() for r in sheet.rows)))}
    out = tmp_path / "sheet.png"
    render(sheet, out)
    pixels = imread(out)
    width, height = fig.get_size_inches() * fig.dpi
    assert pixels.shape == (round(height), round(width), 4)
    assert pixels[..., :3].std() > 0.1  # not a blank page

    every = collect(root, [3], rotate="all")
    assert [r.cube_rotation for r in every.rows] == list(range(24))
    for row in every.rows:
        np.testing.assert_array_equal(row.projections, project(rotate_view(ds[3]["image"].numpy(), row.cube_rotation)))


@pytest.fixture(scope="module")
def flagged_cache(tmp_path_factory):
    """A uint8 cache of 1aa5 with a low --uint8-max (saturates), from --origins: five origins
    on atoms, one 4.5 A beyond the outermost atom (few atoms: low sum), one far away (empty)."""
    tmp = tmp_path_factory.mktemp("flags")
    atoms = parse_atoms(DATA / "1aa5.cif.gz", parse_channels("C,N,O,*"))
    centre = atoms.xyz.mean(axis=0)
    inner = atoms.xyz[np.argsort(np.linalg.norm(atoms.xyz - centre, axis=1))[:40:8]]
    edge = atoms.xyz[atoms.xyz[:, 0].argmax()] + [4.5, 0, 0]
    rows = [*inner, edge, [1000.0, 1000.0, 1000.0]]
    origins = tmp / "origins.csv"
    origins.write_text("structure_id,x,y,z\n" + "".join(f"1aa5,{x},{y},{z}\n" for x, y, z in rows))
    params = dataclasses.replace(small_params(dtype="uint8", origins_file=str(origins)),
                                 storage=Storage("uint8", 0.5))
    root = tmp / "flags.zarr"
    build_cache([str(DATA / "1aa5.cif.gz")], root, params, workers=1, progress=False)
    return root


def test_flags_empty_saturated_and_odd_sums_in_picture_and_summary(flagged_cache, tmp_path, capsys):
    root = flagged_cache
    stored = zarr.open_array(root / fmt.VOXELS, mode="r")[:]  # zarr's own reading, not the Dataset's
    assert len(stored) == 7
    sheet = collect(root, range(7))
    rows = {r.origin_id: r for r in sheet.rows}
    for i in range(7):
        np.testing.assert_array_equal(rows[i].saturated, (stored[i] == 255).sum(axis=(1, 2, 3)))
    assert stored[:5].max() == 255 and all(rows[i].saturated.any() for i in range(5))
    assert rows[6].flags == ["EMPTY"] and stored[6].max() == 0
    assert rows[5].flags[0].startswith("sum ") and rows[5].image_sum < rows[5].structure_median / 3
    assert not any(f.startswith("sum") or f == "EMPTY" for i in range(5) for f in rows[i].flags)
    assert all(r.structure_id == "1aa5" for r in sheet.rows)

    fig = contact_sheet(sheet)
    first = {int(ax.get_label().split(":")[1]): ax for ax in fig.axes if ax.get_label().endswith(":0")
             and ax.get_label().startswith("panel:")}
    assert "EMPTY" in first[6].get_ylabel() and "sum " in first[5].get_ylabel()
    assert first[6].spines["left"].get_edgecolor()[:3] == (1.0, 0.0, 0.0)  # red frame
    assert "uint8" in first[0].get_ylabel() and "origin 0 · 1aa5" in first[0].get_ylabel()

    out = tmp_path / "flags.png"
    assert cache_tools_main(["show", str(root), *map(str, range(7)), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and imread(out).shape[0] > 0
    saturated = ", ".join(str(i) for i in range(7) if (stored[i] == 255).any())
    assert "empty 1 (6)" in line and f"saturated {saturated.count(',') + 1} ({saturated})" in line
    assert "median 1 (5)" in line


def test_bad_ids_unknown_split_and_unwritable_out_exit_2_with_one_line(cache_factory, tmp_path, capsys):
    root = str(cache_factory("float32", rotations=3))
    n = len(VoxelCacheDataset(root))
    out = str(tmp_path / "x.png")
    cases = {
        (root, str(n), "--out", out): f"origin id {n} does not exist",
        (root, "-1", "--out", out): "origin id -1 does not exist",
        (root, "--random", "3", "--split", "nope", "--out", out): "no split named 'nope'",
        (root, "0", "--out", str(tmp_path / "missing" / "x.png")): "does not exist",
        (root, "0", "--out", str(tmp_path)): "is a directory",
        (root, "--out", out): "no origins to show",
        (str(tmp_path / "nocache"), "0", "--out", out): "no such cache",
    }
    for argv, reason in cases.items():
        assert cache_tools_main(["show", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and reason in captured.err, captured.err
    assert not (tmp_path / "x.png").exists()


def test_cli_samples_a_split_reproducibly(cache_factory, tmp_path, capsys):
    root = tmp_path / "cache.zarr"
    shutil.copytree(cache_factory("float32", rotations=3), root)
    assert cache_tools_main(["split", str(root), "--val", "0.4", "--seed", "1"]) == 0
    capsys.readouterr()
    val = VoxelCacheDataset(root, split="val")
    in_val = {val.origin_id(i) for i in range(len(val))}
    a = collect(root, split="val", random=5, seed=3)
    b = collect(root, split="val", random=5, seed=3)
    assert [r.origin_id for r in a.rows] == [r.origin_id for r in b.rows]
    assert len({r.origin_id for r in a.rows}) == 5 and {r.origin_id for r in a.rows} <= in_val
    out = tmp_path / "val.png"
    assert cache_tools_main(["show", str(root), "--split", "val", "--random", "5", "--seed", "3",
                             "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 5 origins") and imread(out).ndim == 3


def test_out_names_the_file_written_and_a_bad_out_or_sum_factor_is_one_line(cache_factory, tmp_path, capsys,
                                                                             monkeypatch):
    """Issue 24 item 15: `--out sh11` writes sh11.png and the summary must name it; `--out ""` is no
    directory; a NaN --sum-factor would flag every image."""
    root = str(cache_factory("float32", rotations=3))
    monkeypatch.chdir(tmp_path)
    assert cache_tools_main(["show", root, "0", "--out", "sh11"]) == 0
    assert capsys.readouterr().out.startswith("sh11.png: 1 origins, 1 rows x 4 channels; flagged:")
    assert (tmp_path / "sh11.png").is_file() and not (tmp_path / "sh11").exists()
    cases = {("--out", ""): "--out '': give the name of the picture to write",
             ("--out", "x.png", "--sum-factor", "nan"): "--sum-factor nan: must be a finite number above 1",
             ("--out", "x.png", "--sum-factor", "inf"): "--sum-factor inf: must be a finite number above 1",
             ("--out", "x.png", "--sum-factor", "1"): "--sum-factor 1.0: must be a finite number above 1",
             ("--out", "x.png", "--page", "0"): "argument --page: must be a positive integer, got 0",
             ("--out", "x.png", "--page", "2"): "--page 2: the sheet has 1 page(s) of at most 200 rows (1 rows)"}
    for argv, reason in cases.items():
        with pytest.raises(SystemExit) if "argument" in reason else contextlib.nullcontext() as stop:
            assert cache_tools_main(["show", root, "0", *argv]) == 2, argv
        if stop is not None:
            assert stop.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and reason in captured.err, captured.err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="--sum-factor nan"):
        collect(root, [0], sum_factor=float("nan"))


def test_a_sheet_holds_at_most_200_rows_and_reads_only_its_page(cache_factory, tmp_path, capsys):
    """`--random 100000` drew every origin into one picture (600 rows took 1.1 GiB): now pages of 200 rows."""
    root = str(cache_factory("float32", rotations=3))
    n = len(VoxelCacheDataset(root))
    first = collect(root, random=100000, rotate="all")
    assert len(first.rows) == 200 and first.total_rows == 24 * n and first.pages == -(-24 * n // 200)
    assert [(r.origin_id, r.cube_rotation) for r in first.rows] == [(i, k) for i in range(9) for k in range(24)][:200]
    summary = first.summary("a.png")
    assert f"(page 1 of {first.pages}: rows 1-200 of {24 * n}, at most 200 per picture; --page P draws the others)" \
        in summary
    out = tmp_path / "p2.png"
    assert cache_tools_main(["show", root, *map(str, range(9)), "--rotate", "all", "--page", "2",
                             "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{out}: 1 origins, 16 rows x 4 channels (page 2 of 2: rows 201-216 of 216,") and out.is_file()


def test_a_damaged_origin_is_flagged_and_the_rest_of_its_structure_is_drawn(cache_factory, tmp_path, capsys):
    root = tmp_path / "cache.zarr"
    shutil.copytree(cache_factory("float32"), root)
    layout = fmt.VoxelLayout(root)
    shard, offset = layout.locate(3)
    path = layout.shard_path(shard)
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0x40
    path.write_bytes(bytes(data))
    structure = int(fmt.read_array(root, fmt.STRUCTURE_INDEX)[3])
    ds = VoxelCacheDataset(root)
    mates = [i for i in ds.origins_of_structure(structure) if i != 3]
    sheet = collect(root, random=100000)
    rows = {r.origin_id: r for r in sheet.rows}
    assert len(rows) == len(ds) and rows[3].flags == ["DAMAGED"] and "checksum mismatch" in rows[3].damaged
    assert np.isnan(rows[3].projections).all()
    expected_median = float(np.median([ds[i]["image"].numpy().sum() for i in mates]))
    for i in mates:
        np.testing.assert_array_equal(rows[i].projections, project(ds[i]["image"].numpy()))
        assert rows[i].structure_median == expected_median and "DAMAGED" not in rows[i].flags
    assert sheet.summary("d.png").split("flagged: ")[1].startswith("damaged 1 (3) (run cache-tools check); empty")
    out = tmp_path / "d.png"
    assert cache_tools_main(["show", str(root), "2", "3", "4", "--out", str(out)]) == 1
    assert "damaged 1 (3)" in capsys.readouterr().out and out.is_file()
