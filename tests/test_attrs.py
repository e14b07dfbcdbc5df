"""The typed cache attributes: parsed once, written back exactly, old caches still open."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.commands.cli import main as cache_tools
from cache_tools.commands.split import assign_splits
from cache_tools.commands.subset import create_subset
from pipeline.cli import main as pipeline_main


def raw_attrs(root: Path) -> dict:
    return json.loads((root / "zarr.json").read_text())["attributes"][fmt.ATTRS_KEY]


def set_raw_attrs(root: Path, doc: dict) -> None:
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"][fmt.ATTRS_KEY] = doc
    (root / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", [("float32", 1, "none"), ("uint8", 1, "zstd"), ("float32", 3, "none")])
def test_every_cache_round_trips_exactly(cache_factory, tmp_path, kind):
    root = shutil.copytree(cache_factory(*kind), tmp_path / "c.zarr")
    assign_splits(root, val=0.4, seed=1)
    create_subset(root, "hires", "resolution <= 2.0")
    doc = raw_attrs(root)
    attrs = fmt.read_attrs(root)
    assert attrs.to_json() == doc
    assert attrs.params.storage.dtype == kind[0] and attrs.params.rotations == kind[1]
    assert (attrs.params.compression is not None) == (kind[2] == "zstd")
    assert attrs.splits == ("train", "val", "test") and set(attrs.subsets) == {"hires"}
    assert attrs.scale == (2.0 / 255 if kind[0] == "uint8" else 1.0)
    # the build's checksum of its parameters, still valid after split and subset rewrote the attributes
    assert attrs.params_crc32 == fmt.params_checksum(doc["params"]) and fmt.params_problem(attrs) is None


def test_a_cache_from_before_centers_compression_and_checksums_opens(cache_factory, tmp_path, capsys):
    root = shutil.copytree(cache_factory(), tmp_path / "old.zarr")
    doc = raw_attrs(root)
    for key in ("metadata_crc32", "duplicates", "empty", "pipeline_version", "params_crc32"):
        doc.pop(key)
    doc["params"].pop("centers")  # voxelized one by one, before the lattice build
    set_raw_attrs(root, doc)
    attrs = fmt.read_attrs(root)
    assert attrs.params.centers is None and not attrs.params.snapped and attrs.metadata_crc32 == {}
    assert attrs.params.to_json() == doc["params"]
    ds = VoxelCacheDataset(root)
    assert float(ds[0]["image"].sum()) > 0
    assert cache_tools(["info", str(root)]) == 0 and cache_tools(["check", str(root), "--quiet"]) == 0
    assert "note: the build recorded no checksum of its parameters" in capsys.readouterr().out


def test_an_edited_scale_is_named_by_check_and_refused_by_the_dataset(cache_factory, tmp_path, capsys):
    """Doubling `scale` in zarr.json doubled every image, and check said OK (issue 24)."""
    root = shutil.copytree(cache_factory("uint8", compression="zstd"), tmp_path / "c.zarr")
    assert cache_tools(["check", str(root), "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().out
    doc = raw_attrs(root)
    doc["params"]["storage"]["scale"] *= 2
    set_raw_attrs(root, doc)
    assert cache_tools(["check", str(root), "--quiet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attributes: in zarr.json: cache attributes changed since the build: ") and \
        "(params checksum mismatch)" in lines[0]
    assert len(lines) == 2 and ": 1 problem(s) (" in lines[1]
    with pytest.raises(fmt.CacheError, match=r"c\.zarr: cache attributes changed since the build: .*"
                                             r"\(params checksum mismatch\)"):
        VoxelCacheDataset(root)
    capsys.readouterr()
    assert pipeline_main(["check", str(root), "--repair", "--quiet"]) == 1  # no shard rebuilt from edited params
    assert "cannot repair" in capsys.readouterr().err
    assign_splits(root, val=0.4, seed=1)  # rewriting the attributes keeps the build's record: still refused
    with pytest.raises(fmt.CacheError, match=r"params checksum mismatch"):
        VoxelCacheDataset(root, split="val")
    doc = raw_attrs(root)
    doc["params"]["storage"]["scale"] /= 2  # put back: reads again
    set_raw_attrs(root, doc)
    assert float(VoxelCacheDataset(root, split="val")[0]["image"].sum()) > 0


def test_an_edited_voxels_dtype_is_refused_not_reinterpreted(cache_factory, tmp_path, capsys):
    """The reader reads by voxels/zarr.json, the images mean what the attributes say: cross-checked."""
    root = shutil.copytree(cache_factory("uint8", compression="zstd"), tmp_path / "c.zarr")
    meta = json.loads((root / fmt.VOXELS / "zarr.json").read_text())
    meta["data_type"] = "int8"  # values above 127 would read negative
    (root / fmt.VOXELS / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(fmt.CacheError, match=r"c\.zarr: voxels are int8 \[4, 11, 11, 11\], attributes say uint8 "
                                             r"\[4, 11, 11, 11\] \(damaged cache; run cache-tools check\)"):
        VoxelCacheDataset(root)
    assert cache_tools(["check", str(root), "--quiet"]) == 1
    assert "metadata: in voxels: voxels are int8 [4, 11, 11, 11], attributes say uint8" in capsys.readouterr().out


def test_keys_this_version_does_not_know_survive_a_rewrite(cache_factory, tmp_path):
    root = shutil.copytree(cache_factory(), tmp_path / "new.zarr")
    doc = raw_attrs(root)
    doc["from_the_future"] = {"a": 1}
    doc["params"]["future_param"] = [1, 2]
    set_raw_attrs(root, doc)
    create_subset(root, "all", "atoms > 0")  # rewrites the attributes
    after = raw_attrs(root)
    assert after["from_the_future"] == {"a": 1} and after["params"]["future_param"] == [1, 2]
    assert after["subsets"]["all"]["structures"] == len(fmt.read_array(root, fmt.STRUCTURE_ATOM_COUNT))


def test_damaged_attributes_are_one_line(cache_factory, tmp_path, capsys):
    root = shutil.copytree(cache_factory(), tmp_path / "bad.zarr")
    doc = raw_attrs(root)
    del doc["params"]["image"]
    set_raw_attrs(root, doc)
    with pytest.raises(fmt.CacheError, match=r"damaged cache attributes in zarr.json \(KeyError: 'image'\)"):
        fmt.read_attrs(root)
    assert cache_tools(["info", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged cache attributes" in err
