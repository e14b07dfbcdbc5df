"""Bad input to `pipeline build-cache`, tried as a new user would.

Every case is a real file (cut, garbled or rewritten from the bundled mmCIFs) run through
the real build, next to good files that must still be built. A failing file is recorded
in the store attributes as {path, id, reason} with a specific one-line reason, and the
CLI prints it once as ``FAILED path: reason``.
"""
from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from pipeline.build import build_cache
from pipeline.encode import snap_centers
from pipeline.parse import parse_atoms, parse_channels, structure_key
from pipeline.voxelize import ImageSpec, voxelize

from conftest import DATA, small_params, store_files

CLI = [sys.executable, "-m", "pipeline.cli", "build-cache"]
SMALL = ["--grid-voxels", "11", "--max-origins-per-structure", "4", "--workers", "1", "--quiet"]
SPEC = ImageSpec(11, 1.0, 4, 0.5)  # what small_params() and SMALL build
CHANNELS = parse_channels("C,N,O,*")
GOOD = ["1aa5.cif.gz", "1c58.cif.gz"]
# Deterministic stderr whatever the locale: names that are not UTF-8 print as \udcXX escapes.
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8:backslashreplace"}


def run_cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    """The real CLI; the timeout turns a hang (e.g. a FIFO opened for reading) into a failure."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, encoding="utf-8", env=ENV,
                          timeout=timeout, **kw)


def text_of(name: str) -> str:
    raw = (DATA / name).read_bytes()
    return (gzip.decompress(raw) if name.endswith(".gz") else raw).decode()


class AtomSite:
    """A real mmCIF's text split around its _atom_site loop, to rewrite the rows."""

    def __init__(self, text: str):
        lines = text.splitlines(keepends=True)
        h0 = next(i for i, line in enumerate(lines) if line.startswith("_atom_site."))
        h1 = h0
        while lines[h1].startswith("_atom_site."):
            h1 += 1
        r1 = h1
        while not lines[r1].startswith("#"):
            r1 += 1
        assert lines[h0 - 1].startswith("loop_")
        self.before_loop, self.header, self.tail = lines[:h0 - 1], lines[h0 - 1:h1], lines[r1:]
        self.columns = [line.strip().split(".", 1)[1] for line in lines[h0:h1]]
        self.rows = [line.split() for line in lines[h1:r1]]
        assert all(len(r) == len(self.columns) for r in self.rows)  # no quoted values to split

    def col(self, name: str) -> int:
        return self.columns.index(name)

    def text(self, rows: list[list[str]] | None = None, drop: str | None = None) -> str:
        rows = self.rows if rows is None else rows
        header = self.header
        if drop is not None:
            k = self.col(drop)
            header = [line for line in header if line.strip() != f"_atom_site.{drop}"]
            rows = [r[:k] + r[k + 1:] for r in rows]
        return "".join(self.before_loop + header + [" ".join(r) + "\n" for r in rows] + self.tail)

    def without_loop(self) -> str:
        return "".join(self.before_loop + self.tail)

    def renumbered(self, rows: list[list[str]]) -> list[list[str]]:
        k = self.col("id")
        return [r[:k] + [str(i + 1)] + r[k + 1:] for i, r in enumerate(rows)]


def shifted(row: list[str], site: AtomSite, d: float) -> list[str]:
    row = list(row)
    for axis in "xyz":
        k = site.col(f"Cartn_{axis}")
        row[k] = f"{float(row[k]) + d:.3f}"
    return row


def structures(out: Path) -> dict[str, dict]:
    """id -> {k, path, atom_count, origins: range} of the structures a cache holds."""
    ids = fmt.read_ragged_strings(out, fmt.STRUCTURE_ID)
    paths = fmt.read_ragged_strings(out, fmt.STRUCTURE_SOURCE_PATH)
    counts = fmt.read_array(out, fmt.STRUCTURE_ATOM_COUNT)
    ranges = fmt.read_array(out, fmt.STRUCTURE_ORIGIN_RANGE)
    table = {}
    for k in range(len(counts)):
        sid = fmt.ragged_item(*ids, k)
        assert sid not in table, f"structure id {sid!r} is not unique"
        table[sid] = {"k": k, "path": fmt.ragged_item(*paths, k), "atom_count": int(counts[k]),
                      "origins": range(int(ranges[k, 0]), int(ranges[k, 1]))}
    return table


def assert_one_line(reason: str) -> None:
    assert reason and "\n" not in reason and "\r" not in reason and "Traceback" not in reason, reason


# --- the bad files --------------------------------------------------------------------

def small_molecule_cif() -> str:
    """A CIF as a small-molecule crystallographer writes it (CIF 1 core dictionary)."""
    return """#\\#CIF_1.1
data_aspirin
_chemical_name_common 'acetylsalicylic acid'
_chemical_formula_sum 'C9 H8 O4'
_symmetry_space_group_name_H-M 'P 21/c'
_cell_length_a 11.430(3)
_cell_length_b 6.591(2)
_cell_length_c 11.395(3)
_cell_angle_alpha 90
_cell_angle_beta 95.68(2)
_cell_angle_gamma 90
_cell_volume 854.2(4)
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_U_iso_or_equiv
O1 O 0.1540(1) 0.2132(2) 0.0574(1) 0.051
O2 O 0.0404(1) 0.5096(2) 0.0539(1) 0.049
O3 O 0.3418(1) 0.3055(2) 0.1927(1) 0.044
C1 C 0.1552(1) 0.3966(2) 0.0872(1) 0.037
C2 C 0.2542(1) 0.5055(2) 0.1475(1) 0.035
"""


def chemical_component_cif() -> str:
    """ALA as the PDB's Chemical Component Dictionary has it (abridged)."""
    return """data_ALA
#
_chem_comp.id                                    ALA
_chem_comp.name                                  ALANINE
_chem_comp.type                                  "L-PEPTIDE LINKING"
_chem_comp.pdbx_type                             ATOMP
_chem_comp.formula                               "C3 H7 N O2"
_chem_comp.formula_weight                        89.093
_chem_comp.three_letter_code                     ALA
#
loop_
_chem_comp_atom.comp_id
_chem_comp_atom.atom_id
_chem_comp_atom.alt_atom_id
_chem_comp_atom.type_symbol
_chem_comp_atom.charge
_chem_comp_atom.pdbx_aromatic_flag
_chem_comp_atom.pdbx_leaving_atom_flag
_chem_comp_atom.pdbx_stereo_config
_chem_comp_atom.model_Cartn_x
_chem_comp_atom.model_Cartn_y
_chem_comp_atom.model_Cartn_z
_chem_comp_atom.pdbx_model_Cartn_x_ideal
_chem_comp_atom.pdbx_model_Cartn_y_ideal
_chem_comp_atom.pdbx_model_Cartn_z_ideal
_chem_comp_atom.pdbx_component_atom_id
_chem_comp_atom.pdbx_component_comp_id
_chem_comp_atom.pdbx_ordinal
ALA N   N   N 0 N N N 2.281 26.213 12.804 -0.966 0.493  1.500  N   ALA 1
ALA CA  CA  C 0 N N S 1.169 26.942 13.411 0.257  0.418  0.692  CA  ALA 2
ALA C   C   C 0 N N N 1.539 28.344 13.874 -0.094 0.017  -0.716 C   ALA 3
ALA O   O   O 0 N N N 2.709 28.647 14.114 -1.056 -0.682 -0.923 O   ALA 4
ALA CB  CB  C 0 N N N 0.601 26.143 14.574 1.204  -0.620 1.296  CB  ALA 5
ALA OXT OXT O 0 N Y N 0.523 29.194 13.997 0.661  0.439  -1.742 OXT ALA 6
#
loop_
_chem_comp_bond.comp_id
_chem_comp_bond.atom_id_1
_chem_comp_bond.atom_id_2
_chem_comp_bond.value_order
ALA N  CA  SING
ALA CA C   SING
ALA C  O   DOUB
ALA CA CB  SING
#
"""


NOT_UTF8_NAME = b"r\xe9sum\xe9.cif.gz"  # a Latin-1 file name, as an old archive unpacks it

# file name -> expected reason (a regular expression matched against the whole reason)
BAD = {
    # 1. truncated gzip
    "truncated.cif.gz": re.escape("corrupt or truncated gzip (Compressed file ended before the "
                                  "end-of-stream marker was reached)"),
    # 2. empty file
    "empty.cif": re.escape("empty file"),
    "empty_gzip.cif.gz": re.escape("empty file (after gunzip)"),
    # 3. random bytes, random printable text
    "random_bytes.cif": re.escape("binary data, not a CIF text file"),
    "random_text.cif": re.escape("not a CIF file (line 1: expected block header (data_))"),
    # 4. small-molecule CIF, 5. chemical-component CIF
    "aspirin.cif": re.escape("small-molecule CIF without an _atom_site table (not an mmCIF coordinate file)"),
    "ALA.cif": re.escape("chemical-component CIF without an _atom_site table (not an mmCIF coordinate file)"),
    # 6. no models: a real entry's header without _atom_site, an _atom_site loop with 0 rows,
    #    rows without coordinates columns, rows with '?' coordinates
    "header_only.cif": re.escape("mmCIF entry without an _atom_site table (not an mmCIF coordinate file)"),
    "zero_rows.cif": re.escape("empty _atom_site table (0 atom rows, so no models)"),
    "no_cartn_x.cif": re.escape("_atom_site table has 1288 rows but no models "
                                "(missing column _atom_site.Cartn_x)"),
    "unknown_coords.cif": re.escape("atom CA of MET A1: missing or non-numeric coordinates in "
                                    "_atom_site.Cartn_x/y/z"),
    # a real file too small to hold any origin (23 atoms)
    "1qjg_mnt.cif": re.escape("no origins: no atom has >= 30 heavy atoms within 6.0 Å (23 heavy atoms)"),
    # what else a new user feeds it: a PDB file, a failed download, a plain file cut short
    "pdb_format.cif": re.escape("PDB-format file, not mmCIF (convert it, e.g. `gemmi convert in.pdb out.cif`)"),
    "download_404.cif": re.escape("an HTML page, not a CIF file (a failed download?)"),
    "cut_mid_row.cif": r"malformed CIF, truncated or corrupt \(line \d+: Wrong number of values in loop _atom_site\.\*\)",
    # 11. unreadable files that stay unreadable as root
    "named_pipe.cif": re.escape("a named pipe (FIFO), not a regular file"),
    "dangling.cif.gz": re.escape("broken symbolic link (target deleted.cif.gz does not exist)"),
    os.fsdecode(NOT_UTF8_NAME): re.escape("file name is not valid UTF-8 (the cache stores names as UTF-8); "
                                          "rename the file"),
}


def write_bad_files(src: Path) -> None:
    rng = np.random.default_rng(20240611)
    raw = (DATA / "1aa5.cif.gz").read_bytes()
    (src / "truncated.cif.gz").write_bytes(raw[:len(raw) // 2])
    (src / "empty.cif").write_bytes(b"")
    (src / "empty_gzip.cif.gz").write_bytes(gzip.compress(b""))
    (src / "random_bytes.cif").write_bytes(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    printable = rng.integers(32, 127, 8192, dtype=np.uint8)
    printable[rng.integers(0, 8192, 100)] = ord("\n")
    (src / "random_text.cif").write_bytes(printable.tobytes())
    (src / "aspirin.cif").write_text(small_molecule_cif())
    (src / "ALA.cif").write_text(chemical_component_cif())
    site = AtomSite(text_of("171l.cif.gz"))
    (src / "header_only.cif").write_text(site.without_loop())
    (src / "zero_rows.cif").write_text(site.text(rows=[]))
    (src / "no_cartn_x.cif").write_text(site.text(drop="Cartn_x"))
    rows = [list(r) for r in site.rows]
    assert rows[1][site.col("label_atom_id")] == "CA"
    for axis in "xyz":
        rows[1][site.col(f"Cartn_{axis}")] = "?"
    (src / "unknown_coords.cif").write_text(site.text(rows=rows))
    (src / "1qjg_mnt.cif").write_bytes((DATA / "1qjg_mnt.cif").read_bytes())
    (src / "pdb_format.cif").write_text(gemmi.read_structure(str(DATA / "1aa5.cif.gz")).make_pdb_string())
    (src / "download_404.cif").write_text(
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        "<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n")
    lines = text_of("1c58.cif.gz").splitlines(keepends=True)
    rows = [i for i, line in enumerate(lines) if line.startswith(("ATOM ", "HETATM "))]
    middle = rows[len(rows) // 2]
    (src / "cut_mid_row.cif").write_text("".join(lines[:middle]) + lines[middle][:30])  # cut inside a row
    os.mkfifo(src / "named_pipe.cif")
    os.symlink("deleted.cif.gz", src / "dangling.cif.gz")
    with open(os.path.join(os.fsencode(src), NOT_UTF8_NAME), "wb") as fh:
        fh.write((DATA / "1c58.cif.gz").read_bytes())


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """One CLI build of a directory holding every bad file and two good ones."""
    src = tmp_path_factory.mktemp("bad") / "in"
    src.mkdir()
    write_bad_files(src)
    for name in GOOD:
        (src / name).write_bytes((DATA / name).read_bytes())
    assert sorted(os.listdir(src)) == sorted([*BAD, *GOOD])
    out = src.parent / "c.zarr"
    proc = run_cli(src, "--out", out, *SMALL)
    return src, out, proc


def test_combined_cli_run_lists_each_bad_file_once_and_builds_the_good_ones(bad_run):
    src, out, proc = bad_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    attrs = fmt.read_attrs(out)
    assert attrs.complete is True
    failures = [f.to_json() for f in attrs.failures]
    assert sorted(Path(f["path"]).name for f in failures) == sorted(BAD)
    # stderr holds exactly one `FAILED path: reason` line per bad file, and nothing else
    expected = sorted(f"FAILED {f['path']}: {f['reason']}".encode("utf-8", "backslashreplace").decode()
                      for f in failures)
    assert sorted(proc.stderr.splitlines()) == expected
    assert f"structures: 2 ok, {len(BAD)} failed" in proc.stdout
    built = structures(out)
    assert sorted(built) == ["1aa5", "1c58"]
    for sid, s in built.items():
        assert s["path"] == str(src / f"{sid}.cif.gz")
        assert len(s["origins"]) > 0 and s["atom_count"] > 0
    assert built["1c58"]["atom_count"] == len(parse_atoms(DATA / "1c58.cif.gz", CHANNELS).xyz)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_reason(bad_run, name):
    src, out, _ = bad_run
    (failure,) = [f.to_json() for f in fmt.read_attrs(out).failures if Path(f.path).name == name]
    assert failure["path"] == str(src / name)
    assert failure["id"] == structure_key(name)
    assert_one_line(failure["reason"])
    assert re.fullmatch(BAD[name], failure["reason"]), failure["reason"]


# --- tricky but valid inputs ----------------------------------------------------------

NMR_SHIFT = 2.0      # model m is model 1 moved by (m-1) * 2 Å on each axis
ALT_SHIFT = 1.5      # conformer B is conformer A moved by 1.5 Å on each axis


def write_good_tricky_files(base: Path) -> dict[str, Path]:
    src = base / "in"
    src.mkdir()
    files = {"171l": src / "171l.cif.gz"}
    files["171l"].write_bytes((DATA / "171l.cif.gz").read_bytes())

    # 7. an NMR-style entry: models 2 and 3 are model 1 moved, listed after it
    site = AtomSite(text_of("171l.cif.gz"))
    model = site.col("pdbx_PDB_model_num")
    rows = [list(r) for r in site.rows]
    for m in (2, 3):
        for r in site.rows:
            r = shifted(r, site, NMR_SHIFT * (m - 1))
            r[model] = str(m)
            rows.append(r)
    files["nmr"] = src / "nmr.cif"
    files["nmr"].write_text(site.text(rows=site.renumbered(rows)))

    # 8. alternate locations: every 10th atom is split into A (0.6) and B (0.4, moved)
    alt, occ = site.col("label_alt_id"), site.col("occupancy")
    rows = []
    for i, r in enumerate(site.rows):
        r = list(r)
        if i % 10 == 5:
            r[alt], r[occ] = "A", "0.60"
            b = shifted(r, site, ALT_SHIFT)
            b[alt], b[occ] = "B", "0.40"
            rows += [r, b]
        else:
            rows.append(r)
    files["altloc"] = src / "altloc.cif"
    files["altloc"].write_text(site.text(rows=site.renumbered(rows)))

    # 9. a non-ASCII file name
    files["1aa5-é✓"] = src / "1aa5-é✓.cif.gz"
    files["1aa5-é✓"].write_bytes((DATA / "1aa5.cif.gz").read_bytes())

    # 10. two different entries whose data blocks have the same name
    for name, entry in (("same_block_a", "1aa5.cif.gz"), ("same_block_b", "1c58.cif.gz")):
        text = text_of(entry)
        assert text.startswith("data_")
        files[name] = src / f"{name}.cif"
        files[name].write_text("data_SAME" + text[text.index("\n"):])
    #     the same file name in two directories, and a file already named like a suffixed id
    for rel in ("x/1aa5.cif.gz", "y/1aa5.cif.gz", "w/1c58-2.cif.gz", "x/1c58.cif.gz", "y/1c58.cif.gz"):
        (src / rel).parent.mkdir(exist_ok=True)
        (src / rel).write_bytes((DATA / Path(rel).name.replace("-2", "")).read_bytes())
    #     a gzipped file named .cif (it is read by content, not by name)
    files["gz_named_cif"] = src / "gz_named_cif.cif"
    files["gz_named_cif"].write_bytes((DATA / "1c58.cif.gz").read_bytes())

    # 13. names crafted to escape the store, given through an @list file that a Windows
    #     editor saved (BOM, CRLF): "../../evil.cif" and a file named "...cif.gz" (id "..")
    (base / "evil.cif").write_text(text_of("1aa5.cif.gz"))
    (base / "...cif.gz").write_bytes((DATA / "1c58.cif.gz").read_bytes())
    deep = base / "lists" / "deep"
    deep.mkdir(parents=True)
    (deep / "inputs.txt").write_bytes("\ufeff# crafted names\r\n../../evil.cif\r\n../../...cif.gz\r\n".encode())
    files["evil"] = deep / ".." / ".." / "evil.cif"
    files[".."] = deep / ".." / ".." / "...cif.gz"
    return files


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under root outside ``skip``: files with (size, mtime), directories by name."""
    return {str(p): None if p.is_dir() and not p.is_symlink() else (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tricky")
    files = write_good_tricky_files(base)
    out = base / "store" / "c.zarr"
    out.parent.mkdir()
    before = snapshot(base, out)
    summary = build_cache([str(base / "in"), f"@{base / 'lists' / 'deep' / 'inputs.txt'}"], out,
                          small_params(max_origins=4, keep_duplicates=True), workers=1, progress=False)
    after = snapshot(base, out)
    return {"base": base, "files": files, "out": out, "summary": summary, "before": before, "after": after}


def test_tricky_valid_inputs_all_build(good_run):
    assert good_run["summary"].failures == []
    built = structures(good_run["out"])
    for sid, path in good_run["files"].items():
        assert built[sid]["path"] == str(path)
        assert len(built[sid]["origins"]) > 0 and built[sid]["atom_count"] > 0


def model_one() -> tuple[np.ndarray, np.ndarray]:
    atoms = parse_atoms(DATA / "171l.cif.gz", CHANNELS)
    return atoms.xyz, atoms.channel


def assert_images_are_of(out: Path, origins: range, xyz: np.ndarray, channel: np.ndarray,
                         others: np.ndarray) -> None:
    """Each stored image is `xyz` voxelized at its centre (on an atom of `xyz`), and the
    atoms that must not count (`others`) do fall inside some image, so it is a real test."""
    ds = VoxelCacheDataset(out)
    reach = SPEC.grid_voxels * SPEC.resolution_A / 2 + SPEC.atom_radius_A
    others_inside = 0
    for origin in origins:
        item = ds[origin]
        center = item["center_A"].numpy().astype(np.float64)
        # centred on a kept atom, snapped to the image lattice
        assert (snap_centers(xyz, SPEC) == center).all(axis=1).any()
        expected = voxelize(xyz, channel, center, SPEC)
        assert np.array_equal(item["image"].numpy(), expected)
        others_inside += int(np.all(np.abs(others - center) < reach, axis=1).sum())
    assert others_inside > 0


def test_nmr_entry_contributes_model_one_only(good_run):
    built = structures(good_run["out"])
    xyz, channel = model_one()
    assert built["171l"]["atom_count"] == len(xyz) == 1288
    assert built["nmr"]["atom_count"] == len(xyz)
    later_models = np.concatenate([xyz + NMR_SHIFT * 1, xyz + NMR_SHIFT * 2])
    assert_images_are_of(good_run["out"], built["nmr"]["origins"], xyz, channel, later_models)


def test_alternate_locations_count_once_at_the_first_conformer(good_run):
    built = structures(good_run["out"])
    xyz, channel = model_one()
    assert built["altloc"]["atom_count"] == len(xyz)  # 129 atoms have two rows, counted once
    conformer_b = xyz[5::10] + ALT_SHIFT
    assert len(conformer_b) == 129
    assert_images_are_of(good_run["out"], built["altloc"]["origins"], xyz, channel, conformer_b)


def test_non_ascii_file_name_round_trips(good_run):
    out, path = good_run["out"], good_run["files"]["1aa5-é✓"]
    built = structures(out)
    k = built["1aa5-é✓"]["k"]
    ds = VoxelCacheDataset(out)
    assert ds.structure_id(k) == "1aa5-é✓"
    assert list(ds.origins_of_structure(k)) == list(built["1aa5-é✓"]["origins"])
    source = fmt.ragged_item(*fmt.read_ragged_strings(out, fmt.STRUCTURE_SOURCE_PATH), k)
    assert source == str(path) and Path(source).read_bytes() == (DATA / "1aa5.cif.gz").read_bytes()
    assert built["1aa5-é✓"]["atom_count"] == built["1aa5"]["atom_count"]


def test_same_block_names_and_same_file_names_get_unique_ids(good_run):
    built = structures(good_run["out"])  # asserts every id is unique
    src = good_run["base"] / "in"
    assert built["same_block_a"]["atom_count"] == built["1aa5"]["atom_count"]
    assert built["same_block_b"]["atom_count"] == built["1c58"]["atom_count"]
    by_path = {s["path"]: sid for sid, s in built.items()}
    # sorted input order: w/1c58-2, x/1aa5, x/1c58, y/1aa5, y/1c58; "1c58-2" is a real name
    assert by_path[str(src / "x/1aa5.cif.gz")] == "1aa5"
    assert by_path[str(src / "y/1aa5.cif.gz")] == "1aa5-2"
    assert by_path[str(src / "w/1c58-2.cif.gz")] == "1c58-2"
    assert by_path[str(src / "x/1c58.cif.gz")] == "1c58"
    assert by_path[str(src / "y/1c58.cif.gz")] == "1c58-3"
    assert by_path[str(src / "gz_named_cif.cif")] == "gz_named_cif"
    for sid in ("1aa5", "1aa5-2", "1c58", "1c58-2", "1c58-3", "same_block_a", "same_block_b"):
        assert len(built[sid]["origins"]) > 0


# --- 13. security ----------------------------------------------------------------------

STORE_NAMES = {"zarr.json", "c"} | {part for name in (
    fmt.VOXELS, fmt.CENTER, fmt.STRUCTURE_INDEX, fmt.CRC32, fmt.ROTATION,
    fmt.STRUCTURE_ID + "_utf8", fmt.STRUCTURE_ID + "_offsets",
    fmt.STRUCTURE_SOURCE_PATH + "_utf8", fmt.STRUCTURE_SOURCE_PATH + "_offsets",
    fmt.STRUCTURE_SHA256, fmt.STRUCTURE_ATOM_COUNT, fmt.STRUCTURE_ORIGIN_RANGE, fmt.STRUCTURE_SPLIT,
    *fmt.STRUCTURE_META_ARRAYS, fmt.STRUCTURE_ENTRY_ID + "_utf8", fmt.STRUCTURE_ENTRY_ID + "_offsets",
) for part in name.split("/")}


def assert_no_pickles(root: Path) -> None:
    """No pickled objects anywhere: raw arrays with plain dtypes; any .npz loads without pickle."""
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        assert path.suffix not in (".pkl", ".pickle", ".npy", ".joblib"), path
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                for key in data.files:
                    assert data[key].dtype != object, (path, key)
        if path.name == "zarr.json":
            meta = json.loads(path.read_text())
            if meta["node_type"] == "array":
                assert meta["data_type"] in ("float32", "float16", "uint8", "int8", "uint16", "int32", "int64",
                                             "uint32", "uint64"), (path, meta["data_type"])


def test_store_holds_no_pickles_and_nothing_escapes_it(good_run):
    out = good_run["out"]
    built = structures(out)
    assert ".." in built and "evil" in built  # the crafted names are data in the tables...
    assert good_run["files"][".."].exists() and built[".."]["path"] == str(good_run["files"][".."])
    assert_no_pickles(out)
    root = out.resolve()
    every = list(out.rglob("*"))
    assert len(every) > 30
    for path in every:  # ...and never a path: every name in the store comes from the format
        rel = path.resolve().relative_to(root)  # raises if a path leads outside the store
        assert not path.is_symlink(), path
        assert all(part in STORE_NAMES or part.isdigit() for part in rel.parts), rel
    # the build wrote nothing outside the store: inputs untouched, no new file anywhere else
    assert good_run["after"] == good_run["before"]


def test_dataset_maps_shards_read_only(good_run):
    out = good_run["out"]
    ds = VoxelCacheDataset(out)
    layout = fmt.VoxelLayout(out)
    shard_path = layout.shard_path(layout.locate(0)[0])
    before = hashlib.sha256(shard_path.read_bytes()).hexdigest()
    item = ds[0]
    original = item["image"].clone()
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(" " + str(shard_path))]
    assert maps, f"{shard_path} is not mapped by this process"
    for fields in maps:
        assert "w" not in fields[1], fields  # perms like r--s / r--p: never writable
    item["image"].fill_(7.0)  # the sample is a private copy, not a window on the file
    assert hashlib.sha256(shard_path.read_bytes()).hexdigest() == before
    assert np.array_equal(ds[0]["image"].numpy(), original.numpy())


# --- 11. missing and unreadable inputs -------------------------------------------------

def _drop_dac_capabilities() -> None:
    """In the child, before exec: drop root's permission-check overrides from the bounding set,
    so the exec'd CLI (and its dask workers) are denied like any user (PR_CAPBSET_DROP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")


def test_missing_and_unreadable_inputs(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for name in GOOD:
        (good / name).write_bytes((DATA / name).read_bytes())

    missing = tmp_path / "no such dir" / "1abc.cif"
    proc = run_cli(good, missing, "--out", tmp_path / "m.zarr", *SMALL)
    assert proc.returncode == 2
    assert proc.stderr == f"pipeline build-cache: {missing}: no such file or directory\n"
    assert not (tmp_path / "m.zarr").exists()

    # chmod 000 stops everyone but root; as root (CI), the CLI runs without the capabilities
    # that bypass permission checks, so it meets the denial a user would.
    preexec = _drop_dac_capabilities if os.geteuid() == 0 else None
    if preexec is not None:
        probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=preexec, capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.fail(f"running as root and cannot drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH "
                        f"(prctl refused: {probe.stderr.strip().splitlines()[-1:]}); without that, "
                        "root reads a chmod 000 directory and the denial cannot be tested")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "1aa5.cif.gz").write_bytes((DATA / "1aa5.cif.gz").read_bytes())
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "1aa5.cif.gz").write_bytes((DATA / "1aa5.cif.gz").read_bytes())
    (tree / "sub" / "1c58.cif.gz").write_bytes((DATA / "1c58.cif.gz").read_bytes())
    secret = good / "secret.cif.gz"
    secret.write_bytes((DATA / "171l.cif.gz").read_bytes())
    for path in (locked, tree / "sub", secret):
        path.chmod(0)
    try:
        # an unreadable directory given as input: exit 2, one line naming it
        proc = run_cli(locked, "--out", tmp_path / "a.zarr", *SMALL, preexec_fn=preexec)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"pipeline build-cache: {locked}: directory is not readable (permission denied)\n"
        # an unreadable directory found while walking an input: exit 2, one line naming it
        proc = run_cli(tree, "--out", tmp_path / "b.zarr", *SMALL, preexec_fn=preexec)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"pipeline build-cache: {tree / 'sub'}: cannot list directory (Permission denied)\n"
        # an --out the user may not write: exit 1, one line naming it
        proc = run_cli(good, "--out", locked / "c.zarr", *SMALL, preexec_fn=preexec)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == (f"pipeline build-cache: Permission denied ({locked / 'c.zarr'}); "
                               "fix this and rerun the same command to resume\n")
        # an unreadable file among good ones: FAILED once, the others are built
        out = tmp_path / "d.zarr"
        proc = run_cli(good, "--out", out, *SMALL, preexec_fn=preexec)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == f"FAILED {secret}: cannot read: Permission denied\n"
    finally:
        for path in (locked, tree / "sub", secret):
            path.chmod(0o755)
    assert [f.to_json() for f in fmt.read_attrs(out).failures] == [
        {"path": str(secret), "id": "secret", "reason": "cannot read: Permission denied"}]
    assert sorted(structures(out)) == ["1aa5", "1c58"]


# --- 12. a full disk -------------------------------------------------------------------

def phase_reached(out: Path, n_files: int) -> str:
    """Where a build that stopped was: scanning files, writing the layout, or writing shards."""
    if len(list((out / fmt.BUILD_DIR / "scan").glob("*.npz"))) < n_files:
        return "scan"
    if not (out / fmt.VOXELS / "zarr.json").exists():
        return "layout"
    return "write"


@pytest.fixture()
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs to fill ({(proc.stderr or proc.stdout).strip()}); "
                    "this test needs root (CAP_SYS_ADMIN), as in CI")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True, capture_output=True)

    yield mnt, resize
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_exits_1_and_the_rerun_resumes_to_a_clean_build(tmp_path, small_tmpfs):
    mnt, resize = small_tmpfs
    files = [DATA / f for f in ("1aa5.cif.gz", "1c58.cif.gz", "171l.cif.gz")]
    args = [*files, "--grid-voxels", "21", "--max-origins-per-structure", "4", "--workers", "1", "--quiet",
            "--compression", "none"]  # raw images: the sizes below stop each phase
    clean = tmp_path / "clean.zarr"
    assert run_cli(*args, "--out", clean).returncode == 0  # 12 origins of 148 KiB: 1.7 MiB
    out = mnt / "c.zarr"
    # Sizes that stop the build in each phase (scan state ~80 KiB, layout ~100 KiB more).
    phases = []
    for size in ("40k", "120k", "1M"):
        resize(size)
        proc = run_cli(*args, "--out", out)
        assert proc.returncode == 1, (size, proc.stderr)
        assert proc.stderr == ("pipeline build-cache: No space left on device; free space and rerun "
                               "the same command to resume\n"), size
        assert fmt.read_attrs(out).complete is False
        assert_no_pickles(out)  # the resumable state (.build/*.npz) too
        phases.append(phase_reached(out, len(files)))
    assert phases == ["scan", "layout", "write"], "retune the tmpfs sizes to stop in each phase"
    resize("8M")
    proc = run_cli(*args, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "resumed and completed" in proc.stdout
    assert fmt.read_attrs(out).failures == ()  # a full disk never marks a good file as failed
    got, want = store_files(out), store_files(clean)
    assert got.keys() == want.keys()  # no temporaries left behind by the failed writes
    assert [k for k in got if got[k] != want[k]] == []
    assert any(k.startswith("voxels/c/") for k in got)
