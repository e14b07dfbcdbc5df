"""`cache-tools check --spot-check / --repair` on lattice caches: damage names the structure and the
block, a spot check re-voxelizes blocks of every lattice copy, and a repair restores every file
byte for byte."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from cache_tools import format as fmt
from cache_tools.commands.check import check_cache
from pipeline.repair import full_check

from conftest import store_files


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "check", *map(str, args), "--quiet"],
                          capture_output=True, text=True)


def structure_ids(root: Path) -> list[str]:
    blob, offsets = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
    return [fmt.ragged_item(blob, offsets, k) for k in range(len(offsets) - 1)]


def flip(root: Path, block: int) -> Path:
    """Change one byte of ``block`` as stored (inside its zstd frame when compressed); returns its shard file."""
    layout = fmt.VoxelLayout(root, fmt.BLOCKS)
    shard, j = divmod(block, layout.items_per_shard)
    path = layout.shard_path(shard)
    data = bytearray(path.read_bytes())
    if layout.codec is None:
        data[j * layout.item_nbytes + 5] ^= 0x01
    else:
        offset, length = (int(v) for v in np.frombuffer(bytes(data[-layout.index_nbytes:]), "<u8").reshape(-1, 2)[j])
        data[offset + length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind", ["zstd", "rotated"])
def test_a_damaged_block_is_named_and_repair_restores_every_file(lattice_factory, tmp_path, kind):
    """A byte flipped in a block of structure 1 (with --rotations 3, in its last, rotated copy): check
    names the block, its structure and file; --repair rewrites that block shard as a clean build wrote it."""
    pristine = lattice_factory() if kind == "zstd" else lattice_factory(dtype="float32", compression="none",
                                                                        rotations=3)
    root = Path(shutil.copytree(pristine, tmp_path / "c.zarr"))
    copies = fmt.read_attrs(root).params.rotations
    start = fmt.read_array(root, fmt.LATTICE_BLOCK_START)
    block = int(start[2 * copies - 1]) + 2  # lattice 1 * K + (K - 1): structure 1's last copy
    path = flip(root, block)
    ids = structure_ids(root)
    rel = str(path.relative_to(root))
    report = check_cache(root, progress=False)
    assert [(p["kind"], p["structure"], p["file"]) for p in report["problems"]] == \
        [("undecodable" if kind == "zstd" else "checksum", ids[1], rel)]
    assert report["problems"][0]["detail"].startswith(f"block {block}: ")

    layout = fmt.VoxelLayout(root, fmt.BLOCKS)
    lo = (block // layout.items_per_shard) * layout.items_per_shard
    hi = lo + layout.origins_in_shard(block // layout.items_per_shard)
    owners = [ids[k] for k in range(len(ids)) if start[k * copies] < hi and start[(k + 1) * copies] > lo]
    out = cli(root, "--repair")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"repaired: {rel} (structures {', '.join(owners)})" and ids[1] in owners
    assert len(lines) == 2 and ": OK (" in lines[1]
    assert store_files(root) == store_files(pristine)
    assert not (root / fmt.BUILD_DIR).exists()


def test_lattice_repair_refuses_a_changed_source_and_writes_nothing(lattice_factory, tmp_path):
    root = Path(shutil.copytree(lattice_factory(), tmp_path / "c.zarr"))
    path = flip(root, int(fmt.read_array(root, fmt.LATTICE_BLOCK_START)[1]) + 1)
    damaged = path.read_bytes()
    out = cli(root, "--repair", "--sources", tmp_path / "nowhere.cif")
    assert out.returncode == 2 and "nowhere.cif: no such file or directory" in out.stderr
    elsewhere = tmp_path / "src"
    elsewhere.mkdir()
    blob, offsets = fmt.read_ragged_strings(root, fmt.STRUCTURE_SOURCE_PATH)
    for k in range(len(offsets) - 1):  # every source, structure 1's with other content
        source = Path(fmt.ragged_item(blob, offsets, k))
        (elsewhere / source.name).write_bytes(source.read_bytes() + (b"\n" if k == 1 else b""))
    out = cli(root, "--repair", "--sources", elsewhere)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"structure {structure_ids(root)[1]}: its source" in out.stderr and "changed since the build" in out.stderr
    assert path.read_bytes() == damaged


def test_lattice_spot_check_revoxelizes_blocks_of_every_copy(lattice_factory, tmp_path):
    """Every block of every copy, voxelized on its own, equals the stored one; a wrong block whose
    checksum was recorded as is (what a voxelizer bug would leave) is found only this way."""
    root = Path(shutil.copytree(lattice_factory(dtype="float32", compression="none", rotations=3),
                                tmp_path / "c.zarr"))
    layout = fmt.VoxelLayout(root, fmt.BLOCKS)
    report = full_check(root, sources=[], spot=10**6, progress=False)
    assert report["ok"], report["problems"][:3]
    assert report["spot_checked"] == layout.n_origins and report["spot_unit"] == "blocks"

    start, fill = fmt.read_array(root, fmt.LATTICE_BLOCK_START), fmt.read_array(root, fmt.BLOCK_FILL)
    block = int(start[1]) + int(np.flatnonzero(fill[start[1]:start[2]] > 0)[0])  # structure 0, rotated copy 1
    shard, j = divmod(block, layout.items_per_shard)
    with open(layout.shard_path(shard), "r+b") as fh:
        fh.seek(j * layout.item_nbytes)
        fh.write(bytes(layout.item_nbytes))
    crc = fmt.read_array(root, fmt.BLOCK_CRC32, mmap=False)
    crc[block] = zlib.crc32(bytes(layout.item_nbytes))
    crc.tofile(fmt.single_chunk_path(root, fmt.BLOCK_CRC32, 1))
    fmt.update_attrs(root, metadata_crc32={**fmt.read_attrs(root).metadata_crc32,
                                           fmt.BLOCK_CRC32: fmt.chunk_crc32(root, fmt.BLOCK_CRC32)})
    assert check_cache(root, progress=False)["ok"], "checksums alone cannot see this"
    report = full_check(root, sources=[], spot=10**6, progress=False)
    assert [(p["kind"], p["structure"], p["file"]) for p in report["problems"]] == \
        [("spot-check", structure_ids(root)[0], str(layout.shard_path(shard).relative_to(root)))]
    assert report["problems"][0]["detail"].startswith(f"block {block}: stored block differs from the re-voxelized one")
    out = cli(root, "--spot-check", "5")
    assert out.stdout.splitlines()[-1].endswith("5 blocks re-voxelized)"), out.stdout + out.stderr


def test_lattice_tables_are_checked_for_every_copy(lattice_factory, tmp_path):
    """--rotations K on a lattice cache stores K copies of each lattice (no per-origin rotations):
    a clean one is OK, and its tables, rotations included, are checked present."""
    root = Path(shutil.copytree(lattice_factory(dtype="float32", compression="none", rotations=3), tmp_path / "c.zarr"))
    assert check_cache(root, progress=False)["ok"]
    fmt.single_chunk_path(root, fmt.BLOCK_FILL, 1).unlink()
    fmt.single_chunk_path(root, fmt.LATTICE_ROTATION, 4).unlink()
    problems = check_cache(root, progress=False)["problems"]
    missing = {p["file"] for p in problems if p["kind"] == "metadata" and "has no data file" in p["detail"]}
    assert missing == {fmt.BLOCK_FILL, fmt.LATTICE_ROTATION}
