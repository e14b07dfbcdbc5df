"""Structure metadata recorded at build time, the --where grammar, subsets and time splits."""
from __future__ import annotations

import datetime as dt
import math
import shutil
import warnings

import gemmi
import numpy as np
import pytest

from cache_tools import format as fmt
from cache_tools.read import where
from cache_tools.commands.cli import main as cache_tools
from cache_tools.commands.info import cache_info
from cache_tools.read.structure_meta import StructureColumns
from pipeline import metadata
from pipeline.parse import parse_atoms, parse_channels

from conftest import DATA, SMALL_FILES

CHANNELS = parse_channels("C,N,O,*")


def ids_of(root) -> list[str]:
    blob, offsets = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
    return [fmt.ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]


def header(path) -> dict:
    """The fields as gemmi reads them from the file, independently of pipeline.metadata."""
    block = gemmi.cif.read(str(path))[0]
    get = lambda tag: [gemmi.cif.as_string(v) for v in block.find_values(tag) if not gemmi.cif.is_null(v)]
    return {"method": get("_exptl.method"), "res": [float(x) for x in get("_refine.ls_d_res_high")],
            "dep": get("_pdbx_database_status.recvd_initial_deposition_date"),
            "rel": sorted(get("_pdbx_audit_revision_history.revision_date")),
            "poly": get("_entity_poly.type")}


def test_build_records_metadata_columns(cache_factory):
    root = cache_factory()
    cols = StructureColumns(root)
    assert cols.present
    ids = ids_of(root)
    assert sorted(ids) == sorted(f.split(".")[0] for f in SMALL_FILES)
    recorded = fmt.read_attrs(root).metadata_crc32
    for name in fmt.STRUCTURE_META_ARRAYS:  # checksummed like every metadata array
        assert recorded[name] == fmt.chunk_crc32(root, name)
    for k, sid in enumerate(ids):
        path = next(DATA.glob(sid + ".cif*"))
        h, row = header(path), cols.row(k)
        st = gemmi.read_structure(str(path))
        assert row["n_models"] == len(st) and row["n_chains"] == len(st[0])  # read_structure merges chain parts
        if sid == "1qjg_clean":  # header stripped: every field absent, the structure still built
            assert row["method"] == [] and math.isnan(row["resolution_A"])
            assert row["deposited"] is None and row["released"] is None and row["polymer"] == []
            continue
        assert row["method"] == h["method"] == ["X-RAY DIFFRACTION"]
        assert row["resolution_A"] == pytest.approx(min(h["res"]))
        assert row["deposited"] == dt.date.fromisoformat(h["dep"][0])
        assert row["released"] == dt.date.fromisoformat(h["rel"][0])
        assert row["polymer"] == (["protein"] if h["poly"] else [])  # 1c58 is a carbohydrate: no polymer
    assert cols.row(ids.index("1aa5"))["resolution_A"] == pytest.approx(0.89)
    assert cols.row(ids.index("1aa5"))["deposited"] == dt.date(1997, 1, 23)


def test_em_nmr_dna_and_models_from_edited_real_files(tmp_path):
    """Fields the bundled X-ray files lack: set in a real entry with gemmi, read back by the build's code."""
    st = gemmi.read_structure(str(DATA / "3fy3.cif.gz"))
    model = st[0].clone()
    model.num = 2
    st.add_model(model)  # a second model, as NMR entries have
    doc = st.make_mmcif_document()
    block = doc[0]
    block.set_pair("_exptl.method", gemmi.cif.quote("ELECTRON MICROSCOPY"))
    block.set_pair("_em_3d_reconstruction.resolution", "3.4")
    block.set_pair("_refine.ls_d_res_high", "?")
    block.set_pair("_pdbx_database_status.recvd_initial_deposition_date", "2019-12-31")
    loop = block.init_loop("_entity_poly.", ["entity_id", "type"])
    loop.add_row(["1", gemmi.cif.quote("polypeptide(L)")])
    loop.add_row(["2", "polyribonucleotide"])
    path = tmp_path / "em.cif"
    doc.write_file(str(path))
    atoms = parse_atoms(path, CHANNELS)
    fields = metadata.scan_fields(atoms.block, atoms.n_models, atoms.n_chains)
    assert fields["meta_method"] == 1 << fmt.METHODS.index("ELECTRON MICROSCOPY")
    assert fields["meta_resolution"] == np.float32(3.4)
    assert fields["meta_deposited"] == (dt.date(2019, 12, 31) - dt.date(1970, 1, 1)).days
    assert fields["meta_released"] == fmt.DATE_MISSING
    assert fields["meta_n_models"] == 2
    assert fields["meta_polymer"] == 1 | 4  # protein and RNA
    block.set_pair("_exptl.method", gemmi.cif.quote("MADE-UP METHOD"))
    block.set_pair("_pdbx_database_status.recvd_initial_deposition_date", "31/12/2019")  # unparsable date
    fields = metadata.scan_fields(block, 1, 1)
    assert fields["meta_method"] == 1 << fmt.METHODS.index("OTHER")
    assert fields["meta_deposited"] == fmt.DATE_MISSING


def test_where_selects_what_numpy_selects(cache_factory):
    root = cache_factory()
    cols = StructureColumns(root)
    res, dep = cols.values("resolution"), cols.values("deposited")
    day = (dt.date(2005, 1, 1) - dt.date(1970, 1, 1)).days
    expect = np.flatnonzero((cols.values("method") & 1 != 0) & (res <= 2.2) & (dep < day) & (dep != fmt.DATE_MISSING))
    got = where.select(root, "method == 'x-ray  diffraction' and resolution <= 2.2 and deposited < 2005-01-01")
    assert got.tolist() == expect.tolist() and 0 < len(got) < len(res)
    ids = ids_of(root)
    assert where.select(root, "id in ('1AA5', '3fy3')").tolist() == sorted([ids.index("1aa5"), ids.index("3fy3")])
    # absent values match no comparison, `not` inverts, != on a set means "does not include"
    clean = ids.index("1qjg_clean")
    assert clean not in where.select(root, "resolution > 0 or deposited > 1900-01-01").tolist()
    assert where.select(root, "not resolution > 0").tolist() == [clean]
    assert where.select(root, "method != 'X-RAY DIFFRACTION'").tolist() == [clean]
    assert where.select(root, "polymer == 'protein' and (chains >= 4 or atoms < 0)").tolist() == [
        k for k in range(len(ids)) if cols.row(k)["polymer"] == ["protein"] and cols.row(k)["n_chains"] >= 4]
    origins = cols.values("origins")
    assert where.select(root, f"origins == {int(origins[0])}").tolist() == np.flatnonzero(origins == origins[0]).tolist()


def test_where_edges_of_numbers_and_nesting(cache_factory):
    """Issue 24, items 7 and 11: 100 levels of nesting still parse; a literal beyond float32 compares
    as infinity without numpy's overflow warning; `in` on a count never rounds a fraction."""
    root = cache_factory()
    cols = StructureColumns(root)
    res, models = cols.values("resolution"), cols.values("models")
    known = np.flatnonzero(~np.isnan(res)).tolist()
    assert where.select(root, "(" * 100 + "resolution > 0" + ")" * 100).tolist() == known
    assert where.select(root, "not " * 100 + "resolution > 0").tolist() == known
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert where.select(root, "resolution < " + "9" * 41).tolist() == known
        assert where.select(root, "resolution > -" + "9" * 41).tolist() == known
        assert where.select(root, "resolution in (1" + "0" * 40 + ", 1)").tolist() == []
        assert where.select(root, "models in (" + "9" * 41 + ")").tolist() == []
    assert where.select(root, "models in (1.5)").tolist() == []
    assert where.select(root, "models in (1)").tolist() == np.flatnonzero(models == 1).tolist() != []
    # As the README says: `not` inverts, so an absent resolution passes `not (resolution < 100)`
    clean = ids_of(root).index("1qjg_clean")
    assert clean in where.select(root, "not (resolution < 100)").tolist()
    assert clean not in where.select(root, "resolution >= 100").tolist()


@pytest.mark.parametrize("expression, message", [
    ("resolution <= 'x'", "position 15: type mismatch: resolution is a number, 'x' is a string"),
    ("deposited < 2.5", "type mismatch: deposited is a date"),
    ("method < 'X-RAY DIFFRACTION'", "type mismatch: method supports == != in, not <"),
    ("method == 'XRAY'", "unknown method 'XRAY'"),
    ("wibble == 1", "unknown column 'wibble'"),
    ("__import__('os')", "unknown column '__import__'"),
    ("__import__('os').system('true')", "unexpected character '.'"),
    ("resolution <= 2.5 and", "expected a column name, found the end"),
    ("(resolution <= 2.5", "expected ')'"),
    ("deposited < 2020-02-30", "'2020-02-30' is not a date"),
    ("id == abc", "quote strings"),
    ("resolution ; 1", "unexpected character ';'"),
    ("", "empty expression"),
    # Issue 24, items 7 and 11: deep nesting is one line, not a RecursionError; only ASCII digits
    # and spaces count outside quotes (a fullwidth digit is not read as 2).
    ("(" * 330 + "resolution < 2" + ")" * 330, "position 101: nested deeper than 100 levels of parentheses and 'not'"),
    ("not " * 500 + "resolution < 2", "position 401: nested deeper than 100 levels"),
    ("resolution < \uff12", "position 14: unexpected character '\uff12' (outside quotes, only ASCII"),
    ("resolution <\u30002", "position 13: unexpected character '\\u3000'"),  # repr of a non-printable
])
def test_bad_expressions_are_one_line_exit_2(cache_factory, tmp_path, capsys, expression, message):
    root = shutil.copytree(cache_factory(), tmp_path / "c.zarr")
    assert cache_tools(["subset", str(root), "s", "--where", expression]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert fmt.read_attrs(root).subsets == {}


def test_subset_stored_listed_checked_and_deleted(cache_factory, tmp_path, capsys):
    root = shutil.copytree(cache_factory(), tmp_path / "c.zarr")
    expression = "method == 'X-RAY DIFFRACTION' and resolution <= 2.0"
    assert cache_tools(["subset", str(root), "hires", "--where", expression]) == 0
    rows = fmt.read_array(root, fmt.subset_array("hires"))
    assert rows.dtype == np.int32 and rows.tolist() == where.select(root, expression).tolist()
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    n_origins = int((ranges[rows, 1] - ranges[rows, 0]).sum())
    assert f"hires: {len(rows)} structures, {n_origins} origins" in capsys.readouterr().out
    assert cache_info(root)["subsets"]["hires"] == {"where": expression, "structures": len(rows), "origins": n_origins}
    assert cache_tools(["check", str(root)]) == 0  # its checksum is recorded
    assert cache_tools(["subset", str(root)]) == 0 and f"hires: {len(rows)} structures" in capsys.readouterr().out
    assert cache_tools(["subset", str(root), "none", "--where", "resolution > 100"]) == 2
    assert "matches no structure" in capsys.readouterr().err
    assert cache_tools(["subset", str(root), "../x", "--where", "models == 1"]) == 2
    assert "subset name '../x'" in capsys.readouterr().err
    assert cache_tools(["subset", str(root), "hires", "--delete"]) == 0
    assert not (root / fmt.subset_array("hires")).exists() and fmt.read_attrs(root).subsets == {}
    assert cache_tools(["check", str(root)]) == 0


def test_time_split(cache_factory, tmp_path, capsys):
    root = shutil.copytree(cache_factory(), tmp_path / "c.zarr")
    assert cache_tools(["split", str(root), "--by-date", "test=2005-01-01", "--by-date", "val=1998-01-01"]) == 0
    out = capsys.readouterr().out
    names, codes = list(fmt.read_attrs(root).splits), fmt.read_array(root, fmt.STRUCTURE_SPLIT)
    dep = StructureColumns(root).values("deposited")
    d = lambda s: (dt.date.fromisoformat(s) - dt.date(1970, 1, 1)).days
    for k in range(len(codes)):
        expect = ("train" if dep[k] == fmt.DATE_MISSING or dep[k] < d("1998-01-01") else
                  "val" if dep[k] < d("2005-01-01") else "test")
        assert names[codes[k]] == expect
    assert {names[c] for c in codes} == {"train", "val", "test"}
    assert "1 structures have no deposition date" in out
    assert cache_tools(["split", str(root), "--by-date", "val=2021-13-01"]) == 2
    assert cache_tools(["split", str(root), "--by-date", "val=2021-01-01", "--val", "0.2"]) == 2
    assert "--by-date replaces --val/--test" in capsys.readouterr().err


def test_old_cache_without_metadata_opens_and_says_absent(cache_factory, tmp_path, capsys):
    root = shutil.copytree(cache_factory(), tmp_path / "old.zarr")
    attrs = fmt.read_attrs(root)
    for name in fmt.STRUCTURE_META_ARRAYS:  # what a cache built before this change looks like
        shutil.rmtree(root / name)
    fmt.update_attrs(root, metadata_crc32={k: v for k, v in attrs.metadata_crc32.items()
                                           if k not in fmt.STRUCTURE_META_ARRAYS})
    assert cache_tools(["check", str(root)]) == 0
    assert cache_tools(["info", str(root)]) == 0
    assert "metadata:   absent" in capsys.readouterr().out
    assert cache_info(root)["structure_meta"] is None
    with pytest.raises(fmt.CacheError, match="no structure metadata"):
        StructureColumns(root).row(0)
    assert cache_tools(["subset", str(root), "s", "--where", "resolution < 2"]) == 2
    assert "no structure metadata" in capsys.readouterr().err
    assert where.select(root, "atoms > 0").tolist() == list(range(len(ids_of(root))))  # core columns still work


def test_info_shows_distributions(cache_factory, capsys):
    root = cache_factory()
    meta = cache_info(root)["structure_meta"]
    assert meta["method"] == {"X-RAY DIFFRACTION": 4, "(none)": 1}
    assert meta["resolution_A"]["absent"] == 1 and meta["resolution_A"]["min"] == pytest.approx(0.89)
    assert sum(meta["resolution_A"]["histogram"].values()) == 4
    assert meta["deposited"]["first"] == "1995-03-24" and meta["deposited"]["absent"] == 1
    assert cache_tools(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "method:     X-RAY DIFFRACTION 4, (none) 1" in out and "deposited:  1995-03-24 .. 2009-01-21" in out


def test_dataset_subset_combined_with_split(cache_factory, tmp_path):
    from cache_tools import VoxelCacheDataset
    from cache_tools.commands.split import assign_splits

    root = shutil.copytree(cache_factory(), tmp_path / "c.zarr")
    assign_splits(root, val=0.4, seed=1)
    assert cache_tools(["subset", str(root), "protein", "--where", "polymer == 'protein'"]) == 0
    subset = fmt.read_array(root, fmt.subset_array("protein")).tolist()
    codes, names = fmt.read_array(root, fmt.STRUCTURE_SPLIT), list(fmt.read_attrs(root).splits)
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    cols = StructureColumns(root)
    for split in (None, "train", "val"):
        ds = VoxelCacheDataset(root, split=split, subset="protein")
        rows = [r for r in subset if split is None or names[codes[r]] == split]
        assert [ds.structure_row(k) for k in range(ds.n_structures)] == rows  # local positions, global rows
        assert len(ds) == sum(int(ranges[r, 1] - ranges[r, 0]) for r in rows)
        origins = sorted(int(o) for r in rows for o in range(*ranges[r]))
        batch = ds[list(range(len(ds)))]
        assert batch["origin_id"].tolist() == origins  # ids returned are global
        assert set(batch["structure_index"].tolist()) == set(rows)
        for k in range(ds.n_structures):
            assert ds.structure_meta(k) == cols.row(rows[k])
            assert ds.structure_id(k) == ids_of(root)[rows[k]]
            assert [ds.origin_id(i) for i in ds.origins_of_structure(k)] == list(range(*ranges[rows[k]]))
    assert VoxelCacheDataset(root, split="val", subset="protein").structure_meta(0)["polymer"] == ["protein"]
    with pytest.raises(fmt.CacheError, match="no subset named 'nope' \\(available: protein\\)"):
        VoxelCacheDataset(root, subset="nope")
    outside = next(r for r in range(len(ranges)) if r not in subset)
    with pytest.raises(ValueError, match="is not in subset 'protein'"):
        VoxelCacheDataset(root, subset="protein").local_structure(outside)
