"""Origin sets (`cache-tools origins`): view centres chosen after the build, on real lattice caches."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from cache_tools import NeighborPairs, VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.commands.cli import main as cache_tools
from cache_tools.commands.origin_rule import MassCounter, MassRule
from cache_tools.read.lattice import LatticeReader
from cache_tools.read.rotations import rotate_tensor
from pipeline.parse import parse_atoms, parse_channels
from pipeline.voxelize import ImageSpec, Storage, voxelize

from conftest import DATA, THREE

CHANNELS = parse_channels("C,N,O,*")
IDS = sorted(f.split(".")[0] for f in THREE)  # 171l, 1aa5, 3fy3: rows 0, 1, 2 (the build sorts its inputs)


@pytest.fixture(scope="module")
def atoms():
    return {f.split(".")[0]: parse_atoms(DATA / f, CHANNELS) for f in THREE}


@pytest.fixture()
def cache(lattice_factory, tmp_path) -> Path:
    """A copy of the uint8/zstd lattice cache of three sample files (21³ at 1 Å), free to change."""
    return Path(shutil.copytree(lattice_factory(), tmp_path / "c.zarr"))


def sites_csv(path: Path, atoms) -> tuple[Path, list[tuple[str, np.ndarray]]]:
    """A CSV of centres near atoms (off the lattice), interleaved across structures, an upper-cased
    id, a header and a comment, and one centre far from any atom (an empty view)."""
    rng = np.random.default_rng(7)
    rows = []
    for k in range(5):
        for sid in IDS:
            xyz = atoms[sid].xyz[rng.integers(len(atoms[sid].xyz))] + rng.uniform(-2, 2, 3)
            rows.append((sid, xyz))
    rows.append(("171l", np.array([500.25, -300.7, 80.1])))
    lines = ["structure_id,x,y,z", "# picked by hand"]
    lines += [f"{sid.upper() if i == 0 else sid},{float(x)!r},{float(y)!r},{float(z)!r}" for i, (sid, (x, y, z)) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path, rows


def test_a_set_from_a_csv_is_snapped_stored_and_read_as_the_voxelizer_at_its_centres(cache, atoms, tmp_path, capsys):
    csv, rows = sites_csv(tmp_path / "sites.csv", atoms)
    assert cache_tools(["origins", str(cache), "sites", "--from", str(csv)]) == 0
    assert capsys.readouterr().out == f"sites: 16 origins in 3 structures, from {csv} (16 rows, 1 empty views)\n"
    # grouped by structure row, file order within each; snapped to the 21-voxel grid's centres (k + 1/2 Å)
    order = sorted(range(len(rows)), key=lambda i: IDS.index(rows[i][0]))
    want_rows = np.array([IDS.index(rows[i][0]) for i in order])
    want_centers = np.array([np.floor(rows[i][1]) + 0.5 for i in order], np.float32)
    record = fmt.read_attrs(cache).origin_sets["sites"]
    assert (record.rule, record.origins, record.structures, record.rows, record.empty) == ("file", 16, 3, 16, 1)
    assert record.sha256 == fmt.file_sha256(csv) and record.path == str(csv)
    part = lambda p: fmt.read_array(cache, fmt.origin_set_array("sites", p))  # noqa: E731
    assert np.array_equal(part("center_A"), want_centers) and np.array_equal(part("structure_index"), want_rows)
    assert part("origin_range").tolist() == [[0, 6], [6, 11], [11, 16]]
    raw = json.loads((cache / "zarr.json").read_text())["attributes"][fmt.ATTRS_KEY]
    assert fmt.read_attrs(cache).to_json() == raw  # the new attribute round-trips exactly

    ds = VoxelCacheDataset(cache, origins="sites", dequantize=False)
    assert len(ds) == 16 and ds.n_structures == 3
    batch = ds[list(range(16))]
    assert batch["origin_id"].tolist() == list(range(16)) and batch["structure_index"].tolist() == want_rows.tolist()
    assert torch.equal(batch["center_A"], torch.from_numpy(want_centers))
    for k in range(16):
        sid = IDS[want_rows[k]]
        image = voxelize(atoms[sid].xyz, atoms[sid].channel, want_centers[k], ImageSpec(21, 1.0, 4, 0.5))
        assert torch.equal(batch["image"][k], torch.from_numpy(Storage("uint8").encode(image)[0])), k
        assert torch.equal(ds[k]["image"], batch["image"][k])
    assert int(batch["image"][5].sum()) == 0  # the far centre: an empty view, kept and counted
    # selection still applies: structure 1 alone, its origins local 0..4, ids into the set
    one = VoxelCacheDataset(cache, origins="sites", structures=[1])
    assert len(one) == 5 and one.origins_of_structure(0) == range(0, 5)
    assert one.origin_id(0) == 6 and one.index_of(10) == 4 and one.structure_id(0) == "1aa5"
    with pytest.raises(ValueError, match=r"origin id 0 \(structure row 0\) is not in the selected structures "
                                         r"\(origin set 'sites'\)"):
        one.index_of(0)


@pytest.mark.parametrize("content,where,reason", [
    ("id,x,y,z\n1aa5,1,2,3\nnope,1,2,3\n", ":3:", "structure id 'nope' is not in the cache (ids as the cache stores "
                                                   "them, e.g. 171l)"),
    ("1aa5,1,2,3\n1aa5,a,b,c\n", ":2:", "coordinates are not numbers: a,b,c"),
    ("1aa5,1,2,x\n", ":1:", "coordinates are not numbers: 1,2,x"),  # not a header: two are numbers
    ("1aa5,nan,0,0\n", ":1:", "coordinates are not finite: nan,0,0"),
    ("structure_id,x,y,z\n1aa5,1,inf,0\n", ":2:", "coordinates are not finite: 1,inf,0"),
    ("1aa5,1,2\n", ":1:", "expected 'structure_id,x,y,z', got 3 fields"),
    ("# sites\n\n171l,1,2,3,4\n", ":3:", "expected 'structure_id,x,y,z', got 5 fields"),
    (b"1aa5,1,2,3\n\xff\xfe,1,2,3\n", ":2:", "not UTF-8 text"),
    ("", ":", "no origin rows (expected lines 'structure_id,x,y,z')"),
    ("structure_id,x,y,z\n# nothing yet\n", ":", "no origin rows (expected lines 'structure_id,x,y,z')"),
    (None, ":", "cannot read origins file (No such file or directory)"),
    ("dir", ":", "cannot read origins file (Is a directory)"),
])
def test_a_bad_row_is_one_line_naming_file_and_line_and_nothing_is_stored(lattice_factory, tmp_path, capsys,
                                                                         content, where, reason):
    cache = lattice_factory()  # shared: nothing may be stored
    path = tmp_path / "o.csv"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert cache_tools(["origins", str(cache), "bad", "--from", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"cache-tools origins: {path}{where} {reason}\n"
    assert fmt.read_attrs(cache).origin_sets == {} and not (cache / fmt.ORIGIN_SETS_DIR).exists()


def test_usage_errors_are_one_line(lattice_factory, tmp_path, capsys):
    lattice, per_origin = lattice_factory(), lattice_factory(layout="origins")
    csv = tmp_path / "o.csv"
    csv.write_text("1aa5,1,2,3\n")
    cases = [
        (["origins", str(per_origin), "x", "--from", str(csv)], "origin sets need a lattice cache (views cut at "
                                                                "training time)"),
        (["origins", str(lattice), "a/b", "--from", str(csv)], "origin set name 'a/b': use letters, digits"),
        (["origins", str(lattice), "zarr.json", "--from", str(csv)], "origin set name 'zarr.json': the name of a "
                                                                     "zarr metadata file"),
        (["origins", str(lattice), "x", "--from", str(csv), "--min-spacing", "3"],
         "--from and the rule options (--min-spacing) exclude each other"),
        (["origins", str(lattice), "x", "--min-neighbors", "3"], "the rule form needs --neighbor-radius, "
                                                                 "--min-spacing too"),
        (["origins", str(lattice), "x"], "origin set x: give --from FILE.csv, or the rule"),
        (["origins", str(lattice), "x", "--delete"], "no origin set named 'x' (stored: none)"),
        (["origins", str(lattice), "--delete"], "give an origin set NAME"),
        (["origins", str(lattice), "x", "--min-neighbors", "1000", "--neighbor-radius", "2", "--min-spacing", "1"],
         "no lattice point of any structure has >= 1000 atoms' mass within 2.0 Å; origin set 'x' not stored"),
    ]
    for argv, message in cases:
        assert cache_tools(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    with pytest.raises(SystemExit) as exit:  # argparse's own one line
        cache_tools(["origins", str(lattice), "x", "--neighbor-radius", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("cache-tools origins: argument --neighbor-radius: must be a positive number, "
                                       "got 0 (see --help)\n")
    assert fmt.read_attrs(lattice).origin_sets == {}
    with pytest.raises(fmt.CacheError, match="origin sets need views cut at training time.*views cannot be cut"):
        VoxelCacheDataset(per_origin, origins="x")
    with pytest.raises(fmt.CacheError, match=r"no origin set named 'x' \(available: none; run `cache-tools origins`\)"):
        VoxelCacheDataset(lattice, origins="x")


def ball(radius: int, size: int) -> np.ndarray:
    """Voxels of a ``size``-voxel view (odd) whose centres lie within ``radius`` voxels of its centre voxel's."""
    d = np.arange(size) - size // 2
    return (d[:, None, None] ** 2 + d[None, :, None] ** 2 + d[None, None, :] ** 2) <= radius ** 2


def test_the_rule_form_keeps_points_whose_mass_count_passes_spread_out(cache, atoms, capsys):
    argv = ["origins", str(cache), "dense", "--min-neighbors", "30", "--neighbor-radius", "6", "--min-spacing", "6",
            "--max-per-structure", "25", "--seed", "3"]
    assert cache_tools(argv) == 0
    record = fmt.read_attrs(cache).origin_sets["dense"]
    assert capsys.readouterr().out.startswith(f"dense: {record.origins} origins in 3 structures, mass rule: >= 30 "
                                              "atoms' mass within 6 Å, spacing 6 Å, at most 25 per structure, seed 3")
    assert (record.rule, record.min_neighbors, record.neighbor_radius_A, record.seed) == ("mass-count", 30, 6.0, 3)
    ds = VoxelCacheDataset(cache, origins="dense", grid_voxels=15)  # 15 is odd as 21: centred on the origin
    batch = ds[list(range(len(ds)))]
    centers, rows = batch["center_A"].double().numpy(), batch["structure_index"].numpy()
    assert np.array_equal(centers, fmt.read_array(cache, fmt.origin_set_array("dense", "center_A")))
    counts = np.bincount(rows, minlength=3)
    assert counts.tolist() == [min(25, c) for c in counts] and record.origins == len(ds) > 40
    mass = (batch["image"].sum(dim=1).double().numpy() * ball(6, 15)).sum(axis=(1, 2, 3))
    assert mass.min() - 1 >= 30  # the count: all channels' mass within 6 Å, less the point's own atom
    assert (batch["image"][:, :, 7, 7, 7].sum(dim=1) > 0).all()  # each sits in a voxel holding mass
    assert np.array_equal(centers % 1, np.full_like(centers, 0.5))  # on the 21-voxel grid's centres
    for row, sid in enumerate(IDS):
        mine = centers[rows == row]
        assert [tuple(p) for p in mine] == sorted(tuple(p) for p in mine)
        assert cKDTree(mine).query(mine, k=2)[0][:, 1].min() >= 6.0
        # within the structure: an atom (radius 0.5) reaches each origin's voxel (half-diagonal 0.87)
        assert cKDTree(atoms[sid].xyz).query(mine)[0].max() <= 0.5 + 3 ** 0.5 / 2
    # reproducible from the seed, different with another
    again = ["origins", str(cache), "again", *argv[3:]]
    assert cache_tools(again) == 0 and cache_tools(["origins", str(cache), "other", *argv[3:-1], "4"]) == 0
    part = lambda name: fmt.read_array(cache, fmt.origin_set_array(name, "center_A"))  # noqa: E731
    assert np.array_equal(part("again"), part("dense")) and not np.array_equal(part("other"), part("dense"))


def test_cubes_find_exactly_the_points_of_a_whole_box_count(lattice_factory):
    """The cube-by-cube count (with cube edges crossing the structure) against one FFT convolution
    of the structure's whole box: the same points, exactly (uint8 sums are integers)."""
    from scipy.signal import fftconvolve

    root = str(lattice_factory())
    attrs = fmt.read_attrs(root)
    rule = MassRule(min_neighbors=20, neighbor_radius_A=5.0)
    grid = fmt.read_array(root, fmt.LATTICE_GRID).astype(np.int64)
    reader = LatticeReader(root, threads=1)
    for row in range(3):
        corner, side = grid[row, :3], grid[row, 3:] * 8
        n = int(side.max()) + 12
        view = np.empty((1, n, n, n, 4), np.uint8)
        reader.read(np.array([row]), (corner - 6)[None], n, view)
        mass = view[0].astype(np.int64).sum(axis=-1)
        sums = np.rint(fftconvolve(mass, ball(5, 11).astype(np.float64), mode="same")).astype(np.int64)
        own = mass > 0
        inside = np.zeros_like(own)
        inside[6:6 + side[0], 6:6 + side[1], 6:6 + side[2]] = True
        want = np.argwhere(own & inside & (sums * attrs.scale - 1 >= 20)) + corner - 6
        for cube in (16, 64):
            got, _ = MassCounter(root, attrs, rule, cube_voxels=cube).points(row)
            assert len(got) > 100 and np.array_equal(got, want), (row, cube)


def test_pairs_and_the_data_module_use_the_set(cache, atoms, tmp_path):
    csv, _ = sites_csv(tmp_path / "sites.csv", atoms)
    assert cache_tools(["origins", str(cache), "sites", "--from", str(csv)]) == 0
    pairs = NeighborPairs(cache, origins="sites", seed=2, min_neighbor_fill=0.0)
    views = VoxelCacheDataset(cache, origins="sites")
    assert len(pairs) == 16 and pairs.homes_without_neighbor() == 0
    batch = pairs[list(range(16))]
    centers = fmt.read_array(cache, fmt.origin_set_array("sites", "center_A"))
    assert torch.equal(batch["center_A"][:, 0], torch.from_numpy(centers[batch["origin_id"].numpy()]))
    for k in (0, 7, 15):
        home = views[int(batch["origin_id"][k])]["image"]
        assert torch.equal(batch["image"][k, 0], rotate_tensor(home, int(batch["cube_rotation"][k])))
    with pytest.raises(fmt.CacheError, match="no origin set named 'nope' \\(available: sites\\)"):
        NeighborPairs(cache, origins="nope")

    from cache_tools.commands.split import assign_splits
    from cache_tools.read.lightning import VoxelCacheDataModule

    assign_splits(cache, val=0.34, seed=0)
    dm = VoxelCacheDataModule(cache, split="train", origins="sites", batch_size=4)
    dm.setup("fit")
    assert dm.train_dataset.origins == dm.val_dataset.origins == "sites"
    assert len(dm.train_dataset) + len(dm.val_dataset) == 16 and len(dm.val_dataset) in (5, 6)


def test_info_check_delete_and_a_damaged_set_file_named_with_its_command(cache, atoms, tmp_path, capsys):
    csv, _ = sites_csv(tmp_path / "sites.csv", atoms)
    assert cache_tools(["origins", str(cache), "sites", "--from", str(csv)]) == 0
    assert cache_tools(["origins", str(cache)]) == 0
    listed = capsys.readouterr().out.splitlines()[-1]
    assert listed == f"sites: 16 origins in 3 structures, from {csv} (16 rows, 1 empty views)"
    assert cache_tools(["info", str(cache)]) == 0
    assert f"  origin set {listed}\n" in capsys.readouterr().out
    assert cache_tools(["info", str(cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["origin_sets"]["sites"]["origins"] == 16
    assert cache_tools(["check", str(cache), "--quiet"]) == 0
    capsys.readouterr()
    data = fmt.single_chunk_path(cache, fmt.origin_set_array("sites", "structure_index"), 1)
    data.write_bytes(data.read_bytes()[:-4] + b"\x07\x00\x00\x00")
    assert cache_tools(["check", str(cache), "--quiet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"origin-set: in origin_sets/sites/structure_index: origin set 'sites': contents changed since "
                        f"it was stored (crc32 differs); recreate it: cache-tools origins {cache} sites --from {csv}")
    assert len(lines) == 2 and lines[1].startswith(f"{cache}: 1 problem(s) (88 origins, 3 structures")
    assert cache_tools(["origins", str(cache), "sites", "--from", str(csv)]) == 0  # the command it names
    assert cache_tools(["check", str(cache), "--quiet"]) == 0
    data.write_bytes(data.read_bytes()[:8])
    assert cache_tools(["check", str(cache), "--quiet"]) == 1
    assert "is truncated (8 of 64 bytes" in capsys.readouterr().out
    assert cache_tools(["origins", str(cache), "sites", "--delete"]) == 0
    assert not (cache / fmt.origin_set_dir("sites")).exists() and fmt.read_attrs(cache).origin_sets == {}
    assert cache_tools(["check", str(cache), "--quiet"]) == 0
    with pytest.raises(fmt.CacheError, match=r"no origin set named 'sites' \(available: none"):
        VoxelCacheDataset(cache, origins="sites")


def test_a_full_disk_while_replacing_a_set_keeps_the_old_one(cache, atoms, tmp_path, capsys, monkeypatch):
    """Origin sets publish as splits and subsets do: staged first, so a full disk while storing a
    new version of a set leaves the old version, every byte of it, and says nothing was changed."""
    import errno
    import os
    import stat

    csv, _ = sites_csv(tmp_path / "sites.csv", atoms)
    assert cache_tools(["origins", str(cache), "sites", "--from", str(csv)]) == 0
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    other = tmp_path / "other.csv"
    other.write_text("structure_id,x,y,z\n1aa5,1.0,2.0,3.0\n")
    real_fsync = os.fsync

    written = []

    def full(fd: int) -> None:  # the disk fills up after the first file
        if stat.S_ISREG(os.fstat(fd).st_mode):
            written.append(fd)
            if len(written) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", full)
    code = cache_tools(["origins", str(cache), "sites", "--from", str(other)])
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.endswith("nothing was changed\n"), err
    assert "No space left on device" in err
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before
    assert len(VoxelCacheDataset(cache, origins="sites")) == 16
