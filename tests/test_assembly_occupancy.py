"""Issue 23, items 1 and 2: --assembly {asym,first,ID} and --occupancy {one,weight}.

The reference for both is the field's own recipe (macromol_gym's atoms, as gemmi builds
them; /work/proto/mmgym/REPORT.md section 2), written out here independently of
pipeline/parse.py, and macromol_voxelize's PUBLIC image_from_atoms on a polars frame.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gemmi
import macromol_voxelize as mmvox
import numpy as np
import polars as pl
import pytest
import torch

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.commands.cli import main as cache_tools
from pipeline.build import build_cache
from pipeline.cli import main as pipeline_main
from pipeline.encode import LatticeEncoder, snap_centers
from pipeline.parse import parse_atoms, parse_channels
from pipeline.voxelize import ImageSpec, Storage

from conftest import DATA, small_params

CHANNELS = parse_channels("C,N,O,*")
ALL_FILES = sorted(p.name for p in DATA.iterdir())
ASSEMBLY_FILES = ["3fy3.cif.gz", "1qjg.cif.gz", "1qjg_clean.cif"]  # 2x, 1/3 of the AU, no assembly records


def their_atoms(path: Path, assembly: str, occupancy: str) -> dict[str, np.ndarray]:
    """The atoms the field voxelizes, from gemmi directly (REPORT.md's recipe): first model;
    the first assembly when asked and the file has one (copies named as the originals);
    waters (HOH/DOD) and H/D dropped; with occupancy 'weight' every conformer, weighted by
    the file's occupancy clipped to [0, 1] (zero-occupancy atoms kept: they add nothing),
    with 'one' the first conformer of each atom at weight 1, zero occupancy dropped."""
    st = gemmi.read_structure(str(path), merge_chain_parts=False)
    model = st[0]
    if assembly == "first" and len(st.assemblies):
        model = gemmi.make_assembly(st.assemblies[0], model, gemmi.HowToNameCopiedChain.Dup)
    if occupancy == "one":
        st2 = gemmi.Structure()
        st2.add_model(model)
        st2.remove_alternative_conformations()
        model = st2[0]
    # occupancies as written in the file (float64), by atom serial: gemmi keeps float32
    block = gemmi.cif.read(str(path)).sole_block()
    text = dict(zip(block.find_values("_atom_site.id"), block.find_values("_atom_site.occupancy")))
    xyz, channel, weight = [], [], []
    lookup = {"C": 0, "N": 1, "O": 2}
    for chain in model:
        for residue in chain:
            if residue.name in ("HOH", "DOD"):
                continue
            for atom in residue:
                element = atom.element.name.upper()
                if element in ("H", "D"):
                    continue
                occ = min(max(float(text[str(atom.serial)]), 0.0), 1.0)
                if occupancy == "one":
                    if occ <= 0:
                        continue
                    occ = 1.0
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                channel.append(lookup.get(element, 3))
                weight.append(occ)
    return {"xyz": np.array(xyz), "channel": np.array(channel), "occupancy": np.array(weight)}


def reference_image(atoms: dict[str, np.ndarray], center: np.ndarray, grid: int) -> np.ndarray:
    """macromol_voxelize's public API on a polars frame of the atoms (occupancy column included)."""
    df = pl.DataFrame({"x": atoms["xyz"][:, 0], "y": atoms["xyz"][:, 1], "z": atoms["xyz"][:, 2],
                       "channels": [[int(c)] for c in atoms["channel"]], "occupancy": atoms["occupancy"]})
    img, _ = mmvox.image_from_atoms(df.with_columns(radius_A=0.5),
                                    mmvox.ImageParams(channels=4, grid=mmvox.Grid(grid, 1.0, center)))
    return img


@pytest.mark.parametrize("assembly,occupancy", [("asym", "weight"), ("first", "one"), ("first", "weight")])
def test_images_equal_image_from_atoms_on_every_sample_file(assembly, occupancy):
    spec = ImageSpec(11, 1.0, len(CHANNELS), 0.5)
    rng = np.random.default_rng(23)
    weighted_somewhere = 0
    assert len(ALL_FILES) == 13
    for name in ALL_FILES:
        ours = parse_atoms(DATA / name, CHANNELS, assembly, occupancy)
        theirs = their_atoms(DATA / name, assembly, occupancy)
        # the same atoms, in the same order (ours drop zero-occupancy atoms, which add nothing)
        kept = theirs["occupancy"] > 0
        assert np.array_equal(ours.xyz, theirs["xyz"][kept]), name
        assert np.array_equal(ours.channel, theirs["channel"][kept]), name
        weights = np.ones(len(ours)) if ours.occupancy is None else ours.occupancy
        assert (ours.occupancy is None) == (occupancy == "one")
        assert np.array_equal(weights, theirs["occupancy"][kept]), name
        weighted_somewhere += bool((weights < 1).any())
        # images: three snapped centres on atoms, cut from a lattice tile as the build does
        centers = snap_centers(ours.xyz[rng.choice(len(ours), 3, replace=False)], spec).astype(np.float64)
        encoder = LatticeEncoder(ours.xyz, ours.channel, spec, Storage("float32"), occupancy=ours.occupancy)
        for center, (stored, _) in zip(centers, encoder.encode_many(centers)):
            expected = reference_image(theirs, center, 11)
            assert expected.sum() > 0.5
            assert stored == expected.tobytes(), f"{name} at {center}"
    if occupancy == "weight":  # 1aa5, 1c58, 3fy3, 7spt have alternate conformers or partial occupancy
        assert weighted_somewhere >= 4


@pytest.fixture(scope="module")
def assembly_cache(tmp_path_factory) -> Path:
    """3fy3 (a 2x assembly), 1qjg (its first assembly is a third of the AU) and 1qjg_clean (no
    assembly records), built with --assembly first --occupancy weight."""
    out = tmp_path_factory.mktemp("assembly") / "asm.zarr"
    build_cache([str(DATA / f) for f in ASSEMBLY_FILES], out,
                small_params(max_origins=4, assembly="first", occupancy="weight"), workers=1, progress=False)
    return out


def structure_table(root: Path) -> dict[str, dict]:
    blob, offsets = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
    counts = fmt.read_array(root, fmt.STRUCTURE_ATOM_COUNT)
    return {fmt.ragged_item(blob, offsets, k): {"atoms": int(counts[k]), "assembly": a}
            for k, a in enumerate(fmt.assemblies(root))}


def test_assembly_has_more_atoms_where_the_entry_defines_a_larger_one(assembly_cache, tmp_path):
    """3fy3 built both ways with the same occupancy rule: its first assembly is two copies of
    the asymmetric unit (operators 1 and 2), 2 x 1,936 atoms; the first copy is the AU itself."""
    asym = tmp_path / "asym.zarr"
    build_cache([str(DATA / "3fy3.cif.gz")], asym, small_params(max_origins=4, occupancy="weight"),
                workers=1, progress=False)
    built = structure_table(assembly_cache)
    assert structure_table(asym) == {"3fy3": {"atoms": 1936, "assembly": "asym"}}
    assert built["3fy3"] == {"atoms": 2 * 1936, "assembly": "1"}
    assert built["1qjg"] == {"atoms": 1932, "assembly": "1"}            # a subset: 1 of its 3 dimers
    assert built["1qjg_clean"] == {"atoms": 1932, "assembly": "asym"}   # no records: its AU, counted
    assembly = parse_atoms(DATA / "3fy3.cif.gz", CHANNELS, "first", "weight")
    au = parse_atoms(DATA / "3fy3.cif.gz", CHANNELS, "asym", "weight")
    assert np.array_equal(assembly.xyz[:len(au)], au.xyz) and not np.allclose(assembly.xyz[len(au):], au.xyz)
    attrs = fmt.read_attrs(assembly_cache)
    assert (attrs.params.assembly, attrs.params.occupancy) == ("first", "weight")
    assert attrs.params.voxelizer.occupancy == "atom"
    assert [n.id for n in attrs.asym_fallbacks] == ["1qjg_clean"]
    assert "no assembly records" in attrs.asym_fallbacks[0].reason
    # an asym build keeps today's format: no assembly column, no new keys in the fingerprint
    doc = fmt.read_attrs(asym).params.to_json()
    assert doc["occupancy"] == "weight" and "assembly" not in doc
    assert not (asym / (fmt.STRUCTURE_ASSEMBLY + "_utf8")).exists()


def test_assembly_cache_opens_in_every_command(assembly_cache, tmp_path, capsys):
    root = shutil.copytree(assembly_cache, tmp_path / "c.zarr")
    assert cache_tools(["info", str(root)]) == 0
    text = capsys.readouterr().out
    assert "assembly:   first (the first biological assembly of each file; structures per assembly: 1: 2, " \
           "asym: 1)" in text
    assert "occupancy:  weight (every alternate conformer, weighted by its occupancy)" in text
    assert "asym:       " in text and "1qjg_clean.cif: no assembly records" in text
    assert cache_tools(["info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["assembly"], info["occupancy"], info["assemblies"]) == ("first", "weight", {"1": 2, "asym": 1})
    # check re-voxelizes with the cache's assembly and occupancy
    assert pipeline_main(["check", str(root), "--spot-check", "12", "--quiet"]) == 0
    assert "12 origins re-voxelized" in capsys.readouterr().out
    assert cache_tools(["split", str(root), "--val", "0.4", "--seed", "2"]) == 0
    assert cache_tools(["subset", str(root), "xray", "--where", "method == 'X-RAY DIFFRACTION'"]) == 0
    assert cache_tools(["show", str(root), "--split", "val", "--random", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert cache_tools(["check", str(root), "--quiet"]) == 0
    capsys.readouterr()
    ds = VoxelCacheDataset(root, subset="xray")
    assert ds.n_structures == 2 and float(ds[0]["image"].sum()) > 1
    # the spot check really uses them: told the cache holds the asymmetric unit at weight 1,
    # it finds 3fy3's images (two copies, alternate conformers at half weight) wrong
    meta = json.loads((root / "zarr.json").read_text())
    params = meta["attributes"][fmt.ATTRS_KEY]["params"]
    params["occupancy"] = "one"
    (root / "zarr.json").write_text(json.dumps(meta))
    assert pipeline_main(["check", str(root), "--spot-check", "12", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "spot-check: origin" in out and "structure 3fy3" in out and "differs from the re-voxelized" in out


def test_repair_rewrites_shards_with_the_cache_assembly_and_occupancy(assembly_cache, tmp_path, capsys):
    root = shutil.copytree(assembly_cache, tmp_path / "c.zarr")
    layout = fmt.VoxelLayout(root)
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    shards = sorted({int(ranges[k, 0]) // layout.origins_per_shard for k in range(len(ranges))})
    before = {s: layout.shard_path(s).read_bytes() for s in shards}
    for s in shards:  # the first shard of every structure: 3fy3, 1qjg (assembly 1) and 1qjg_clean (asym)
        layout.shard_path(s).unlink()
    assert pipeline_main(["check", str(root), "--repair", "--quiet"]) == 0
    assert capsys.readouterr().out.count("repaired: ") == len(shards) == 3
    assert {s: layout.shard_path(s).read_bytes() for s in shards} == before


def test_lattice_layout_views_are_the_fields_images_too(assembly_cache, tmp_path):
    """--layout lattice with --assembly first --occupancy weight: every origin's view equals the
    per-origin cache's image and image_from_atoms on the field's atoms at its centre."""
    out = tmp_path / "lattice.zarr"
    build_cache([str(DATA / f) for f in ASSEMBLY_FILES], out,
                small_params(max_origins=4, assembly="first", occupancy="weight", layout="lattice"),
                workers=1, progress=False)
    assert fmt.assemblies(out) == fmt.assemblies(assembly_cache) == ["1", "asym", "1"]  # 1qjg, 1qjg_clean, 3fy3
    lattice, origins = VoxelCacheDataset(out), VoxelCacheDataset(assembly_cache)
    ids = list(range(len(origins)))
    a, b = lattice[ids], origins[ids]
    assert len(lattice) == len(origins) == 12 and torch.equal(a["image"], b["image"])
    theirs = {k: their_atoms(DATA / f, "first", "weight") for k, f in enumerate(sorted(ASSEMBLY_FILES))}
    for i in ids:
        expected = reference_image(theirs[int(a["structure_index"][i])], a["center_A"][i].double().numpy(), 11)
        assert np.array_equal(a["image"][i].numpy(), expected), i


def test_old_and_default_caches_read_as_asymmetric_unit_at_occupancy_one(cache_factory, capsys):
    root = cache_factory()
    attrs = fmt.read_attrs(root)
    assert (attrs.params.assembly, attrs.params.occupancy) == ("asym", "one")
    assert "assembly" not in attrs.params.to_json() and "occupancy" not in attrs.params.to_json()
    assert set(fmt.assemblies(root)) == {"asym"}
    assert cache_tools(["info", str(root)]) == 0
    text = capsys.readouterr().out
    assert "assembly:   asym (the asymmetric unit of the first model)" in text
    assert "occupancy:  one (the first conformer of each atom, at weight 1)" in text


def test_a_build_with_other_settings_refuses_to_resume(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    args = ["build-cache", str(DATA / "1qjg_clean.cif"), "--out", str(out), "--grid-voxels", "9",
            "--max-origins-per-structure", "2", "--workers", "1", "--quiet"]
    assert pipeline_main(args + ["--assembly", "first"]) == 0
    capsys.readouterr()
    assert pipeline_main(args + ["--assembly", "first", "--occupancy", "weight"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "(--occupancy differs: one before, weight now); pass --overwrite" in err
    assert pipeline_main(args) == 2
    assert "--assembly differs: first before, asym now" in capsys.readouterr().err
    assert pipeline_main(args + ["--assembly", "first"]) == 0  # the same settings: nothing to do
    assert "already complete" in capsys.readouterr().out
