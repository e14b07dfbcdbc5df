"""Issue 12, items 13 and 15: empty splits refused; duplicates skipped; one entry, one split.
Issue 24, items 2, 3 and 16: a split given twice, an empty time split, split names by the subsets' rule."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.commands.cli import main as cache_tools
from cache_tools.commands.split import assign_splits

from conftest import DATA

TOOLS = [sys.executable, "-m", "cache_tools.commands.cli"]


def test_identical_inputs_skipped_and_one_entry_stays_in_one_split(tmp_path):
    copy = tmp_path / "in" / "copy_of_1aa5.cif.gz"
    copy.parent.mkdir()
    shutil.copy(DATA / "1aa5.cif.gz", copy)
    out = tmp_path / "c.zarr"
    files = [DATA / f for f in ("1aa5.cif.gz", "1qjg.cif.gz", "1qjg_clean.cif", "171l.cif.gz", "1c58.cif.gz",
                                "3fy3.cif.gz")]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", *map(str, files), str(copy),
                           "--out", str(out), "--grid-voxels", "9", "--max-origins-per-structure", "2",
                           "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 ok, 0 failed, 1 duplicates skipped" in proc.stdout
    assert proc.stderr.count("SKIPPED") == 1 and "same content as" in proc.stderr
    blob, offsets = fmt.read_ragged_strings(out, fmt.STRUCTURE_ID)
    ids = [fmt.ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]
    assert len(ids) == 6 and ("1aa5" in ids) != ("copy_of_1aa5" in ids)
    entries = dict(zip(ids, fmt.entry_ids(out)))  # recorded from _entry.id ('1qjg' in the clean file)
    assert entries["1qjg"] == entries["1qjg_clean"] == "1QJG" and entries["171l"] == "171L"
    info = subprocess.run([*TOOLS, "info", str(out)], capture_output=True, text=True)
    assert "skipped:" in info.stdout and "same content as" in info.stdout
    k1, k2 = ids.index("1qjg"), ids.index("1qjg_clean")
    val_sizes = set()
    for seed in range(8):
        counts = assign_splits(out, val=0.5, seed=seed)
        codes = fmt.read_array(out, fmt.STRUCTURE_SPLIT)
        assert codes[k1] == codes[k2], seed
        val_sizes.add(counts["val"])
    assert val_sizes <= {2, 3, 4}  # 5 entries: groups of 1 or 2 structures fill half of 6 structures
    listed = tmp_path / "val.txt"
    listed.write_text("1qjg_clean\n")  # a listed structure takes its entry along
    assign_splits(out, from_files={"val": ["1qjg_clean"]})
    assert fmt.read_array(out, fmt.STRUCTURE_SPLIT)[k1] == 1

    # Caches built before the entry id was recorded fall back to the file name before "_".
    old = tmp_path / "old.zarr"
    shutil.copytree(out, old)
    for part in ("_utf8", "_offsets"):
        shutil.rmtree(old / (fmt.STRUCTURE_ENTRY_ID + part))
    assert fmt.entry_ids(old) == [sid.split("_")[0].upper() for sid in ids]
    proc = subprocess.run([*TOOLS, "split", str(old), "--val", "0.5", "--seed", "3"], capture_output=True, text=True)
    assert proc.returncode == 0 and "kept together: 1 entries" in proc.stdout, proc.stderr
    codes = fmt.read_array(old, fmt.STRUCTURE_SPLIT)
    assert codes[k1] == codes[k2]


def test_empty_splits_are_refused_and_the_summary_counts_origins(cache_factory, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(cache_factory(), root)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    commands = [[*TOOLS, "split", str(root), "--val", "0.01"],
                [*TOOLS, "split", str(root), "--from-file", f"val={empty}"]]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    (_, small), (_, none) = (p.communicate(timeout=60) for p in procs)
    assert [p.returncode for p in procs] == [2, 2]
    assert "--val 0.01 gives split 'val' no structures" in small
    assert f"{empty} lists no ids" in none
    assert not (root / fmt.STRUCTURE_SPLIT).exists()
    proc = subprocess.run([*TOOLS, "split", str(root), "--val", "0.3", "--balance", "origins"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    codes = fmt.read_array(root, fmt.STRUCTURE_SPLIT)
    per = ranges[:, 1] - ranges[:, 0]
    n_val = int(per[codes == 1].sum())
    assert f"val: {int((codes == 1).sum())} structures, {n_val} origins" in proc.stdout
    assert abs(n_val - 0.3 * per.sum()) <= per.max() / 2 + 1e-9  # within half a structure of 30% of origins


def test_a_split_given_twice_is_refused_not_overwritten(cache_factory, tmp_path, capsys):
    root = shutil.copytree(cache_factory(), tmp_path / "c.zarr")
    ids = tmp_path / "ids.txt"
    ids.write_text("1aa5\n")
    assert cache_tools(["split", str(root), "--by-date", "val=2000-01-01", "--by-date", "val=2010-01-01"]) == 2
    assert capsys.readouterr().err == ("cache-tools split: --by-date 'val=2010-01-01': split 'val' is already given "
                                       "(--by-date val=2000-01-01); give each split once\n")
    assert cache_tools(["split", str(root), "--from-file", f"val={ids}", "--from-file", f"val={tmp_path}/b.txt"]) == 2
    assert capsys.readouterr().err == (f"cache-tools split: --from-file 'val={tmp_path}/b.txt': split 'val' is already "
                                       f"given (--from-file val={ids}); give each split once\n")
    assert not (root / fmt.STRUCTURE_SPLIT).exists() and fmt.read_attrs(root).splits == ()


@pytest.mark.parametrize("bad", ["../x", "a/b", "x" * 300, "zarr.json", ".x", "__x"])
def test_split_and_subset_names_follow_one_rule(cache_factory, tmp_path, capsys, bad):
    root = shutil.copytree(cache_factory(), tmp_path / "c.zarr")
    ids = tmp_path / "ids.txt"
    ids.write_text("1aa5\n")
    rule = ("the name of a zarr metadata file; choose another" if bad == "zarr.json" else
            "use letters, digits, '_', '-' or '.' (not starting with '.', '-' or '__', at most 64 characters)")
    for argv in (["--by-date", f"{bad}=2000-01-01"], ["--from-file", f"{bad}={ids}"]):
        assert cache_tools(["split", str(root), *argv]) == 2
        assert capsys.readouterr().err == f"cache-tools split: split name {bad!r}: {rule}\n"
    assert cache_tools(["subset", str(root), bad, "--where", "models == 1"]) == 2
    assert capsys.readouterr().err == f"cache-tools subset: subset name {bad!r}: {rule}\n"
    with pytest.raises(ValueError, match=f"split name {bad!r}"):
        assign_splits(root, from_files={bad: ["1aa5"]})
    with pytest.raises(ValueError, match=f"split name {bad!r}"):
        assign_splits(root, by_date={bad: "2000-01-01"})
    attrs = fmt.read_attrs(root)
    assert attrs.splits == () and attrs.subsets == {}
    assert not (root / fmt.STRUCTURE_SPLIT).exists() and not (root / fmt.SUBSET_DIR).exists()


def test_an_empty_split_is_refused_by_split_and_by_the_dataset(cache_factory, tmp_path, capsys):
    root = shutil.copytree(cache_factory(), tmp_path / "c.zarr")
    assert cache_tools(["split", str(root), "--by-date", "val=2030-01-01"]) == 2
    assert capsys.readouterr().err == ("cache-tools split: --by-date val=2030-01-01 gives split 'val' no structures "
                                       "(the cache's structures: deposited 1995-03-24 .. 2009-01-21, 1 undated)\n")
    assert not (root / fmt.STRUCTURE_SPLIT).exists()
    with pytest.raises(ValueError, match="--by-date test=2000-01-01 gives split 'test' no structures"):
        assign_splits(root, by_date={"val": "2000-01-01", "test": "2000-01-01"})  # test: [2000, 2000)
    assert cache_tools(["split", str(root), "--test", "0.2"]) == 0  # 'val' named, and empty
    capsys.readouterr()
    with pytest.raises(fmt.CacheError, match=r"split 'val' holds no structure; `cache-tools info` counts each split's"):
        VoxelCacheDataset(root, split="val")
    assert len(VoxelCacheDataset(root, split="test")) > 0
