"""build-cache on real mmCIF files with a real dask LocalCluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import macromol_voxelize as mmvox
import numpy as np
import polars as pl
import pytest
import zarr

from cache_tools import format as fmt
from pipeline.build import InputError, build_cache
from pipeline.parse import parse_atoms, parse_channels

from conftest import DATA, SMALL_FILES, build_small, small_params, store_files

CHANNELS = parse_channels("C,N,O,*")


def reference_image(source: str, center: np.ndarray, grid: int, rotation=None) -> np.ndarray:
    """macromol_voxelize's public API on the parsed atoms: what the cache must hold."""
    atoms = parse_atoms(source, CHANNELS)
    xyz = atoms.xyz
    c = center.astype(np.float64)
    if rotation is not None:
        xyz = (xyz - c) @ rotation.astype(np.float64).T + c
    df = pl.DataFrame({"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                       "channels": [[int(ch)] for ch in atoms.channel]}).with_columns(radius_A=0.5)
    img, _ = mmvox.image_from_atoms(df, mmvox.ImageParams(channels=4, grid=mmvox.Grid(grid, 1.0, c)))
    return img


def structure_of(group, origin: int) -> tuple[str, np.ndarray]:
    k = int(group["origins/structure_index"][origin])
    blob, off = group["structures/source_path_utf8"][:], group["structures/source_path_offsets"][:]
    return bytes(blob[off[k]:off[k + 1]]).decode(), group["structures/origin_range"][k]


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_stored_images_equal_macromol_voxelize(cache_factory, dtype):
    root = cache_factory(dtype)
    group = zarr.open_group(str(root), mode="r")
    voxels = group["voxels"]
    attrs = group.attrs[fmt.ATTRS_KEY]
    assert attrs["complete"] is True and voxels.dtype == np.dtype(dtype)
    scale = attrs["params"]["storage"]["scale"]
    n = voxels.shape[0]
    assert n >= 40 and voxels.shape[1:] == (4, 11, 11, 11)
    rng = np.random.default_rng(1)
    for origin in rng.choice(n, size=20, replace=False):
        source, _ = structure_of(group, origin)
        expected = reference_image(source, group["origins/center_A"][origin], 11)
        stored = voxels[origin].astype(np.float32) * np.float32(scale)
        if dtype == "float32":
            assert np.array_equal(stored, expected)
        elif dtype == "float16":
            assert np.allclose(stored, expected, rtol=2**-11, atol=2**-25)
        else:
            assert np.abs(stored - expected).max() <= attrs["params"]["storage"]["max_abs_error"] + 1e-7
        assert expected.sum() > 10  # a real image: the centre is on an atom


def test_origins_contiguous_and_on_atoms(cache_factory):
    root = cache_factory()
    group = zarr.open_group(str(root), mode="r")
    ranges = group["structures/origin_range"][:]
    sindex = group["origins/structure_index"][:]
    centers = group["origins/center_A"][:]
    assert ranges[0, 0] == 0 and ranges[-1, 1] == len(sindex)
    assert np.array_equal(ranges[1:, 0], ranges[:-1, 1])  # tiles 0..N-1, no gap or overlap
    for k, (start, stop) in enumerate(ranges):
        assert stop > start and np.all(sindex[start:stop] == k)
        source, _ = structure_of(group, start)
        atoms = parse_atoms(source, CHANNELS).xyz
        # every centre is one of this structure's atoms snapped to the image lattice: the grid
        # (11) is odd, so centres sit mid-voxel, at k + 1/2 Å, at most 0.5 Å from the atom per axis
        assert np.all(centers[start:stop] - np.floor(centers[start:stop]) == 0.5)
        snapped = np.floor(atoms) + 0.5
        hit = (snapped[None, :, :] == centers[start:stop, None, :]).all(axis=2)
        assert hit.any(axis=1).all()
    ids = [fmt.ragged_item(*fmt.read_ragged_strings(root, fmt.STRUCTURE_ID), k) for k in range(len(ranges))]
    assert ids == ["171l", "1aa5", "1c58", "1qjg_clean", "3fy3"]


def test_crc_and_metadata_readable_without_zarr(cache_factory):
    root = cache_factory()
    layout = fmt.VoxelLayout(root)
    crc = fmt.read_array(root, fmt.CRC32)
    import zlib
    for origin in (0, layout.n_origins // 2, layout.n_origins - 1):
        shard, offset = layout.locate(origin)
        with open(layout.shard_path(shard), "rb") as fh:
            fh.seek(offset)
            assert zlib.crc32(fh.read(layout.origin_nbytes)) == crc[origin]
    assert not (root / fmt.BUILD_DIR).exists()


def test_one_and_two_workers_identical(tmp_path, cache_factory):
    one = tmp_path / "one.zarr"
    build_small(one, workers=1)
    a, b = store_files(one), store_files(cache_factory())
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []


@pytest.fixture(scope="module")
def kill_inputs(tmp_path_factory):
    """20 real files (the small set, 4 copies each) so that both phases last long enough to hit."""
    src = tmp_path_factory.mktemp("kill-src")
    for copy in range(4):
        for name in SMALL_FILES:
            (src / f"c{copy}_{name}").write_bytes((DATA / name).read_bytes())
    args = [sys.executable, "-m", "pipeline.cli", "build-cache", str(src), "--grid-voxels", "15",
            "--max-origins-per-structure", "8", "--origins-per-shard", "2", "--workers", "1", "--quiet",
            "--keep-duplicates"]
    reference = tmp_path_factory.mktemp("kill-ref") / "ref.zarr"
    subprocess.run([*args, "--out", str(reference)], check=True, capture_output=True)
    return args, store_files(reference)


def count(path: Path, pattern: str) -> int:
    return len(list(path.glob(pattern))) if path.exists() else 0


@pytest.mark.parametrize("point", ["scan", "early write", "late write"])
def test_kill_9_then_rerun_is_identical(tmp_path, kill_inputs, point):
    """kill -9 the CLI and its dask workers at a point of the build; the rerun equals a clean build."""
    args, reference = kill_inputs
    out = tmp_path / "killed.zarr"
    scan, done = out / fmt.BUILD_DIR / "scan", out / fmt.BUILD_DIR / "done"
    n_shards = sum(1 for k in reference if k.startswith("voxels/c/"))
    reached = {"scan": lambda: count(scan, "*.npz") >= 4,
               "early write": lambda: count(done, "*.npz") >= 2,
               "late write": lambda: count(done, "*.npz") >= n_shards * 3 // 4}[point]
    proc = subprocess.Popen([*args, "--out", str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not reached() and proc.poll() is None:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert fmt.read_attrs(out).complete is False, "the kill should land before the build completes"
    if point == "scan":
        assert 4 <= count(scan, "*.npz") < 20 and count(done, "*.npz") == 0
    else:
        assert 2 <= count(done, "*.npz") < n_shards
    check = [sys.executable, "-m", "cache_tools.commands.cli", "check", str(out), "--quiet"]
    before = subprocess.run(check, capture_output=True, text=True)
    assert before.returncode == 1 and before.stdout.startswith("incomplete: the build has not finished")
    rerun = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed and completed" in rerun.stdout
    again = store_files(out)
    assert again.keys() == reference.keys()
    assert [k for k in again if again[k] != reference[k]] == []
    after = subprocess.run(check, capture_output=True, text=True)
    assert after.returncode == 0 and ": OK (" in after.stdout, after.stdout + after.stderr


def test_bad_files_are_listed_and_the_rest_builds(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = (DATA / "1aa5.cif.gz").read_bytes()
    (src / "1aa5.cif.gz").write_bytes(good)
    (src / "trunc.cif.gz").write_bytes((DATA / "171l.cif.gz").read_bytes()[:5000])
    (src / "empty.cif").write_bytes(b"")
    (src / "smallmol.cif").write_text(
        "data_nacl\n_cell_length_a 5.64\n_cell_length_b 5.64\n_cell_length_c 5.64\n"
        "loop_\n_atom_site_label\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
        "Na1 0 0 0\nCl1 0.5 0.5 0.5\n")
    out = tmp_path / "c.zarr"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", str(src), "--out", str(out),
                           "--grid-voxels", "9", "--workers", "1", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    failed = sorted(line for line in proc.stderr.splitlines() if line.startswith("FAILED"))
    assert len(failed) == 3
    assert "empty.cif: empty file" in failed[0]
    assert "smallmol.cif: small-molecule CIF without an _atom_site table" in failed[1]
    assert "trunc.cif.gz: corrupt or truncated gzip" in failed[2]
    attrs = fmt.read_attrs(out)
    assert sorted(Path(f.path).name for f in attrs.failures) == ["empty.cif", "smallmol.cif", "trunc.cif.gz"]
    ids = fmt.read_ragged_strings(out, fmt.STRUCTURE_ID)
    assert fmt.ragged_item(*ids, 0) == "1aa5" and len(fmt.read_array(out, fmt.STRUCTURE_ATOM_COUNT)) == 1


def test_all_inputs_bad_exits_1_and_lists_them(tmp_path):
    (tmp_path / "a.cif").write_text("data_x\n_cell_length_a 1\n")
    (tmp_path / "b.cif.gz").write_bytes(b"\x1f\x8b not really gzip")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", str(tmp_path), "--out",
                           str(tmp_path / "c.zarr"), "--workers", "1", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("FAILED") and lines[1].startswith("FAILED")
    assert lines[2] == ("pipeline build-cache: no usable input: all 2 inputs failed (see FAILED lines); "
                        "fix or replace them, then build again")


def test_existing_store_with_other_params_is_refused(tmp_path, cache_factory):
    out = tmp_path / "c.zarr"
    build_small(out, files=["1aa5.cif.gz"])
    files = [str(DATA / "1aa5.cif.gz")]
    with pytest.raises(InputError, match="other parameters.*--grid-voxels.*grid_voxels 11 before, 13 now.*--overwrite"):
        build_cache(files, out, small_params(grid=13), workers=1, progress=False)
    again = build_cache(files, out, small_params(), workers=1, progress=False)
    assert again.already_complete
    replaced = build_cache(files, out, small_params(grid=13), workers=1, progress=False, overwrite=True)
    assert fmt.VoxelLayout(out).image_shape == (4, 13, 13, 13) and replaced.origins == again.origins
    # --overwrite replaces only what differs: the same parameters again find the cache complete
    assert build_cache(files, out, small_params(grid=13), workers=1, progress=False, overwrite=True).already_complete


def test_cli_errors_are_one_line(tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", *argv],
                              capture_output=True, text=True)
    missing = run(str(tmp_path / "nope"), "--out", str(tmp_path / "x.zarr"))
    assert missing.returncode == 2 and "nope: no such file or directory" in missing.stderr
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "precious.txt").write_text("keep me")
    conflict = run(str(DATA / "1aa5.cif.gz"), "--out", str(tmp_path / "notacache"), "--overwrite")
    assert conflict.returncode == 2 and "is not a voxel cache; refusing" in conflict.stderr
    assert (tmp_path / "notacache" / "precious.txt").read_text() == "keep me"
    bad = run(str(DATA / "1aa5.cif.gz"), "--out", str(tmp_path / "y.zarr"), "--grid-voxels", "0")
    assert bad.returncode == 2 and "--grid-voxels: must be a positive integer" in bad.stderr
    for proc in (missing, conflict, bad):
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_lattice_build_killed_mid_write_resumes_to_the_bytes_of_a_clean_build(tmp_path, kill_inputs):
    """The lattice layout resumes like the per-origin one: kill -9 in the write phase, rerun,
    and every file equals an uninterrupted build's (block ids and shards are fixed before
    anything is voxelized, so the bytes do not depend on who writes what when)."""
    args, _ = kill_inputs
    args = [a if a != "2" else "40" for a in args] + ["--layout", "lattice", "--dtype", "uint8"]  # 40 blocks a shard
    reference = tmp_path / "ref.zarr"
    subprocess.run([*args, "--out", str(reference)], check=True, capture_output=True)
    out = tmp_path / "killed.zarr"
    done = out / fmt.BUILD_DIR / "done"
    n_shards = fmt.VoxelLayout(reference, fmt.BLOCKS).n_shards
    proc = subprocess.Popen([*args, "--out", str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and count(done, "*.npz") < n_shards // 2 and proc.poll() is None:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert fmt.read_attrs(out).complete is False and 1 <= count(done, "*.npz") < n_shards
    rerun = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0 and "resumed and completed" in rerun.stdout, rerun.stderr
    assert store_files(out) == store_files(reference)
