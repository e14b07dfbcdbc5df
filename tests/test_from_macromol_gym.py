"""Issue 23, item 3: --origins with split and assembly columns, and the converter from a
macromol_gym training database (tests/data/mmgym/mmgym_fixture.sqlite, made by their own
pipeline: tests/data/mmgym/make_fixture_db.py)."""
from __future__ import annotations

import csv
import io
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.commands.split import compute_splits
from pipeline.cli import main as pipeline_main
from pipeline.origins import read_origins_file

from conftest import DATA

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "mmgym" / "mmgym_fixture.sqlite"
sys.path.insert(0, str(REPO / "workflows"))
import from_macromol_gym  # noqa: E402


def their_zones() -> list[tuple[str, str, str, np.ndarray]]:
    """(pdb id, split name, assembly id, centre) of every zone, read straight from their tables."""
    db = sqlite3.connect(f"{FIXTURE.as_uri()}?mode=ro", uri=True)
    rows = db.execute("SELECT structure.pdb_id, split.name, assembly.pdb_id, zone.center_A FROM zone "
                      "JOIN assembly ON assembly.id = zone.assembly_id "
                      "JOIN structure ON structure.id = assembly.struct_id "
                      "JOIN split ON split.id = structure.split_id ORDER BY zone.id").fetchall()
    db.close()
    return [(p, s, a, np.load(io.BytesIO(c))) for p, s, a, c in rows]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmgym") / "origins.csv"
    assert from_macromol_gym.main([str(FIXTURE), "--out", str(out)]) == 0
    return out


def test_fixture_is_small_and_made_by_the_script_next_to_it():
    assert FIXTURE.stat().st_size < 200_000
    script = (FIXTURE.parent / "make_fixture_db.py").read_text()
    assert "mmg.pick_training_zones" in script and "mmg.make_splits" in script and "pip install" in script


def test_converter_round_trips_the_fixture(converted, capsys):
    zones = their_zones()
    assert len(zones) == 24
    with open(converted, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["structure_id", "x", "y", "z", "split", "assembly"]
    assert len(rows) == len(zones)  # every zone becomes an origin
    got = sorted((r["structure_id"], r["split"], r["assembly"], float(r["x"]), float(r["y"]), float(r["z"]))
                 for r in rows)
    want = sorted((p, s, a, *map(float, c)) for p, s, a, c in zones)
    assert got == want  # coordinates exactly (repr of their float64), splits and assemblies as theirs
    per_split = {}
    for p, s, _, _ in zones:
        per_split.setdefault(s, set()).add(p)
    assert per_split == {"test": {"3fy3"}, "train": {"1ypi"}, "val": {"1qjg"}}
    listed = read_origins_file(converted)
    assert listed.has_split and listed.has_assembly
    assert {sid: (len(v.centers), v.split, v.assembly) for sid, v in listed.structures.items()} == \
        {"3fy3": (10, "test", "1"), "1ypi": (13, "train", "1"), "1qjg": (1, "val", "1")}


def test_build_from_converted_file_stores_their_splits_and_assemblies(converted, tmp_path, capsys):
    out = tmp_path / "gym.zarr"
    files = [str(DATA / f) for f in ("3fy3.cif.gz", "1ypi.cif.gz", "1qjg.cif.gz")]
    assert pipeline_main(["build-cache", *files, "--origins", str(converted), "--occupancy", "weight",
                          "--grid-voxels", "11", "--workers", "1", "--quiet", "--out", str(out)]) == 0
    attrs = fmt.read_attrs(out)
    assert (attrs.params.assembly, attrs.params.occupancy) == ("origins", "weight")
    assert fmt.assemblies(out) == ["1", "1", "1"]
    blob, offsets = fmt.read_ragged_strings(out, fmt.STRUCTURE_ID)
    ids = [fmt.ragged_item(blob, offsets, k) for k in range(3)]
    atom_count = dict(zip(ids, fmt.read_array(out, fmt.STRUCTURE_ATOM_COUNT).tolist()))
    assert atom_count == {"3fy3": 3872, "1ypi": 3766, "1qjg": 1932}  # their stored atoms (REPORT.md)
    # stored exactly as `cache-tools split --from-file` stores the same assignment
    assert attrs.splits == ("train", "val", "test")
    assert attrs.split_params == {"origins_file": str(converted)}
    names, codes = compute_splits(out, from_files={"train": ["1ypi"], "val": ["1qjg"], "test": ["3fy3"]})
    assert tuple(names) == attrs.splits and np.array_equal(fmt.read_array(out, fmt.STRUCTURE_SPLIT), codes)
    assert attrs.metadata_crc32[fmt.STRUCTURE_SPLIT] == fmt.chunk_crc32(out, fmt.STRUCTURE_SPLIT)
    zones = their_zones()
    for split, n in (("train", 13), ("val", 1), ("test", 10)):
        ds = VoxelCacheDataset(out, split=split)  # works at once, no `cache-tools split`
        assert len(ds) == n
        pdb = {p for p, s, _, _ in zones if s == split}
        assert {ds.structure_id(k) for k in range(ds.n_structures)} == pdb
        centres = np.array([c for p, s, _, c in zones if s == split])
        for i in range(len(ds)):  # each image is centred on a zone centre, snapped to the lattice
            assert np.abs(centres - ds[i]["center_A"].numpy()).max(axis=1).min() <= 0.5
            assert float(ds[i]["image"].sum()) > 1
    assert pipeline_main(["check", str(out), "--spot-check", "6", "--quiet"]) == 0


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def one_line_exit_2(capsys, argv: list[str], expected: str) -> str:
    assert pipeline_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert expected in err, err
    return err


def test_bad_origins_and_assembly_input_is_one_line_and_exit_2(tmp_path, capsys):
    src = str(DATA / "3fy3.cif.gz")
    base = ["build-cache", src, "--grid-voxels", "9", "--workers", "1", "--quiet", "--out", str(tmp_path / "c.zarr")]
    head = "structure_id,x,y,z,split,assembly\n"
    row = "3fy3,17.98,-24.02,-22.79"
    cases = {  # file text -> what the line says (checked before any work)
        head + f"{row},test,1\n{row},,1\n": "origins.csv:3: empty split value for structure '3fy3'",
        head + f"{row},test,1\n{row},train,1\n": "origins.csv:3: structure '3fy3' has split 'train' here but "
                                                 "'test' on line 2",
        head + f"{row},test,1\n{row},test,2\n": "origins.csv:3: structure '3fy3' has assembly '2' here but '1'",
        head + f"{row},test,one two\n": "origins.csv:2: assembly 'one two' is not an assembly id",
        head + f"{row},te st,1\n": "origins.csv:2: split name 'te st'",
        "structure_id,x,y,z,splits\n" + f"{row},test\n": "origins.csv:1: unknown column 'splits'",
    }
    for text, expected in cases.items():
        one_line_exit_2(capsys, base + ["--origins", str(write(tmp_path / "origins.csv", text))], expected)
    one_line_exit_2(capsys, base + ["--assembly", "a b"], "--assembly: assembly 'a b' is not an assembly id")
    one_line_exit_2(capsys, base + ["--assembly", "first", "--origins",
                                    str(write(tmp_path / "origins.csv", head + f"{row},test,1\n"))],
                    "--assembly first and the assembly column of")
    assert not (tmp_path / "c.zarr").exists()  # none of these started a build


def test_an_assembly_that_does_not_exist_stops_the_build_naming_the_row(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    files = [str(DATA / "3fy3.cif.gz"), str(DATA / "1qjg.cif.gz")]
    base = ["build-cache", *files, "--grid-voxels", "9", "--workers", "1", "--quiet", "--out", str(out)]
    origins = write(tmp_path / "origins.csv", "structure_id,x,y,z,assembly\n1qjg,12.8,85.7,-29.9,2\n"
                                              "3fy3,17.98,-24.02,-22.79,7\n3fy3,12,-16,-22.8,7\n")
    err = one_line_exit_2(capsys, base + ["--origins", str(origins)], f"{origins}:3: structure 3fy3 (")
    assert err.endswith("3fy3.cif.gz): no assembly '7' (its assemblies: 1)")
    err = one_line_exit_2(capsys, base + ["--assembly", "3"], "--assembly 3: 3fy3 (")
    assert err.endswith("no assembly '3' (its assemblies: 1)")
    # the same id in a file that has it works, and the corrected file builds without --overwrite
    write(origins, "structure_id,x,y,z,assembly\n1qjg,12.8,85.7,-29.9,2\n3fy3,17.98,-24.02,-22.79,1\n")
    assert pipeline_main(base + ["--origins", str(origins)]) == 0
    assert fmt.assemblies(out) == ["2", "1"]  # 1qjg, 3fy3 (input order)
