"""`cache-tools check` on real caches damaged in real ways: every problem found and named."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from cache_tools import format as fmt
from cache_tools.commands.check import check_cache
from pipeline.build import build_cache
from pipeline.repair import full_check

from conftest import DATA, small_params

FILES = ["1aa5.cif.gz", "171l.cif.gz", "1c58.cif.gz"]
PER_SHARD = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A cache built from copies of three sources (so tests may change them), 8 origins per shard."""
    base = tmp_path_factory.mktemp("check")
    sources = base / "sources"
    sources.mkdir()
    for name in FILES:
        shutil.copy(DATA / name, sources / name)
    out = base / "cache.zarr"
    build_cache([str(sources)], out, small_params(max_origins=10, origins_per_shard=PER_SHARD),
                workers=1, progress=False)
    return out


@pytest.fixture()
def cache(pristine, tmp_path) -> Path:
    """A scratch copy of the pristine cache (its recorded source paths still point at the copies)."""
    return Path(shutil.copytree(pristine, tmp_path / "cache.zarr"))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "check", *map(str, args), "--quiet"],
                          capture_output=True, text=True)


def origin_bytes(cache: Path, origin: int) -> tuple[Path, int]:
    layout = fmt.VoxelLayout(cache)
    shard, offset = layout.locate(origin)
    return layout.shard_path(shard), offset


def structure_of(cache: Path, origin: int) -> str:
    k = int(fmt.read_array(cache, fmt.STRUCTURE_INDEX)[origin])
    return fmt.ragged_item(*fmt.read_ragged_strings(cache, fmt.STRUCTURE_ID), k)


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_clean_cache_checks_every_byte(cache):
    layout = fmt.VoxelLayout(cache)
    report = check_cache(cache, progress=False)
    assert report["ok"] and report["problems"] == []
    assert report["origins"] == 28 and report["structures"] == 3  # 10 + 8 + 10 origins
    assert report["bytes_checked"] == layout.n_origins * layout.origin_nbytes
    out = cli(cache)
    assert out.returncode == 0, out.stderr
    mib = 28 * layout.origin_nbytes / 2**20
    assert out.stdout.strip().endswith(f"OK (28 origins, 3 structures, {mib:.1f} MiB checksummed)")


def test_byte_flip_truncation_and_deleted_file_are_each_named(cache):
    layout = fmt.VoxelLayout(cache)
    assert layout.n_shards == 4
    path, offset = origin_bytes(cache, 5)
    poke(path, offset + 777, bytes([path.read_bytes()[offset + 777] ^ 0x10]))
    truncated = layout.shard_path(1)
    truncated.write_bytes(truncated.read_bytes()[:-1])
    layout.shard_path(3).unlink()

    out = cli(cache, "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    found = {(p["kind"], tuple(p["origins"]), p["structure"], p["file"]) for p in report["problems"]}
    shard = lambda s: str(layout.shard_path(s).relative_to(cache))  # noqa: E731
    # structures hold origins 0-9, 10-17, 18-27; shard 1 holds 8-15 and shard 3 holds 24-27
    assert found == {
        ("checksum", (5, 5), structure_of(cache, 5), shard(0)),
        ("truncated-shard", (8, 9), structure_of(cache, 8), shard(1)),
        ("truncated-shard", (10, 15), structure_of(cache, 10), shard(1)),
        ("missing-shard", (24, 27), structure_of(cache, 24), shard(3)),
    }
    text = cli(cache).stdout.splitlines()
    assert text[0] == f"truncated-shard: origins 8-9, structure {structure_of(cache, 8)} " \
                      f"({report['problems'][0]['source']}), in {shard(1)}: shard file has " \
                      f"{layout.shard_nbytes(1) - 1} bytes, expected {layout.shard_nbytes(1)}"
    mib = 16 * layout.origin_nbytes / 2**20  # shards 0 and 2 could be read
    assert text[-1].endswith(f"4 problem(s) (28 origins, 3 structures, {mib:.1f} MiB checksummed)")


def test_nan_and_negative_values(cache):
    path, offset = origin_bytes(cache, 17)
    poke(path, offset + 40, np.float32(np.inf).tobytes())
    path, offset = origin_bytes(cache, 18)
    poke(path, offset + 80, np.float32(-0.25).tobytes())
    kinds = sorted((p["kind"], p["origins"][0]) for p in check_cache(cache, progress=False)["problems"])
    assert kinds == [("checksum", 17), ("checksum", 18), ("negative", 18), ("non-finite", 17)]


def test_damaged_metadata(cache):
    center = fmt.single_chunk_path(cache, fmt.CENTER, 2)
    poke(center, 12, np.float32(99.0).tobytes())          # a centre moved: only its crc32 shows it
    ranges = fmt.single_chunk_path(cache, fmt.STRUCTURE_ORIGIN_RANGE, 2)
    data = np.fromfile(ranges, "<i8").reshape(-1, 2)
    data[1, 0] += 1                                         # a gap between structures 0 and 1
    data.tofile(ranges)
    fmt.single_chunk_path(cache, fmt.STRUCTURE_ATOM_COUNT, 1).unlink()
    problems = {(p["kind"], p["file"], p["detail"]) for p in check_cache(cache, progress=False)["problems"]}
    assert ("metadata", fmt.CENTER, "contents changed since the build (crc32 differs)") in problems
    assert ("metadata", fmt.STRUCTURE_ORIGIN_RANGE, "contents changed since the build (crc32 differs)") in problems
    assert ("metadata", fmt.STRUCTURE_ORIGIN_RANGE,
            "structure origin ranges do not tile 0..27 (structures 0 and 1: [0, 10) then [11, 18))") in problems
    assert any(k == "metadata" and f == fmt.STRUCTURE_ATOM_COUNT and "has no data file" in d
               for k, f, d in problems)


def test_unreadable_cache_exits_2_with_one_line(tmp_path, cache):
    for target, reason in ((tmp_path / "nope.zarr", "no such cache"),
                           (DATA, "missing (zarr group metadata)")):
        out = cli(target)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and reason in out.stderr and "Traceback" not in out.stderr
    (cache / fmt.VOXELS / "zarr.json").unlink()
    out = cli(cache)
    assert out.returncode == 2 and "metadata of array 'voxels'" in out.stderr


def test_incomplete_build_is_a_problem(cache):
    fmt.update_attrs(cache, complete=False)
    report = check_cache(cache, progress=False)
    assert [p["kind"] for p in report["problems"]] == ["incomplete"]


def test_stale_and_missing_sources(cache, tmp_path):
    sources = Path(fmt.ragged_item(*fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH), 0)).parent
    moved = Path(shutil.copytree(sources, tmp_path / "moved"))
    ids = [fmt.ragged_item(*fmt.read_ragged_strings(cache, fmt.STRUCTURE_ID), k) for k in range(3)]
    changed, gone = moved / f"{ids[0]}.cif.gz", moved / f"{ids[2]}.cif.gz"
    changed.write_bytes(changed.read_bytes() + b"\n")
    gone.unlink()
    report = full_check(cache, sources=[str(moved)], progress=False)
    assert report["sources_checked"] == 3
    problems = {(p["kind"], p["structure"], tuple(p["origins"])) for p in report["problems"]}
    assert problems == {("stale", ids[0], (0, 9)), ("source-missing", ids[2], (18, 27))}
    # By default the recorded paths are checked: those are untouched.
    assert check_cache(cache, sources=True, progress=False)["ok"]
    out = cli(cache, "--sources", tmp_path / "does-not-exist")
    assert out.returncode == 2 and "does-not-exist: no such file or directory" in out.stderr


def test_spot_check_revoxelizes_and_catches_a_wrong_image_with_a_valid_checksum(cache):
    report = full_check(cache, sources=[], spot=12, progress=False)
    assert report["ok"] and report["spot_checked"] == 12
    # A wrong image whose checksum was recorded as is (what a voxelizer bug would leave):
    # only re-voxelizing can tell.
    path, offset = origin_bytes(cache, 3)
    layout = fmt.VoxelLayout(cache)
    poke(path, offset, bytes(layout.origin_nbytes))
    crc = fmt.read_array(cache, fmt.CRC32, mmap=False)
    crc[3] = zlib.crc32(bytes(layout.origin_nbytes))
    crc_path = fmt.single_chunk_path(cache, fmt.CRC32, 1)
    crc.tofile(crc_path)
    fmt.update_attrs(cache, metadata_crc32={**fmt.read_attrs(cache).metadata_crc32,
                                            fmt.CRC32: fmt.chunk_crc32(cache, fmt.CRC32)})
    assert check_cache(cache, progress=False)["ok"], "checksums alone cannot see this"
    report = full_check(cache, sources=[], spot=30, progress=False)
    assert [(p["kind"], p["origins"]) for p in report["problems"]] == [("spot-check", [3, 3])]
    assert "differs from the re-voxelized one" in report["problems"][0]["detail"]


def test_repair_restores_the_exact_bytes(cache, pristine):
    layout = fmt.VoxelLayout(cache)
    path, offset = origin_bytes(cache, 12)
    poke(path, offset + 3, b"\xff\xff")
    layout.shard_path(2).write_bytes(b"")
    layout.shard_path(3).unlink()
    out = cli(cache, "--repair")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [ln.split(" (")[0] for ln in lines[:-1]] == [
        f"repaired: {layout.shard_path(s).relative_to(cache)}" for s in (1, 2, 3)]
    assert lines[-1].endswith(f": OK (28 origins, 3 structures, {28 * layout.origin_nbytes / 2**20:.1f} MiB checksummed)")
    for s in range(layout.n_shards):
        assert layout.shard_path(s).read_bytes() == fmt.VoxelLayout(pristine).shard_path(s).read_bytes()
    assert not (cache / fmt.BUILD_DIR).exists()


def test_repair_needs_only_the_sources_of_the_structures_it_revoxelizes(cache, pristine, tmp_path):
    """Issue 24 item 13: `--repair --sources DIR` with only the needed file in DIR repaired the shard but
    exited 1 with a source-missing line for every other structure."""
    ids = [fmt.ragged_item(*fmt.read_ragged_strings(cache, fmt.STRUCTURE_ID), k) for k in range(3)]
    recorded = Path(fmt.ragged_item(*fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH), 0))
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(recorded, only / recorded.name)  # structure 0's file: shard 0 holds its origins 0-7 only
    layout = fmt.VoxelLayout(cache)
    path, offset = origin_bytes(cache, 5)
    poke(path, offset + 3, b"\xff\xff")
    out = cli(cache, "--repair", "--sources", only)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"repaired: {layout.shard_path(0).relative_to(cache)} (structures {ids[0]})"
    assert len(lines) == 2 and lines[1].endswith(": OK (28 origins, 3 structures, "
                                                 f"{28 * layout.origin_nbytes / 2**20:.1f} MiB checksummed)")
    assert path.read_bytes() == fmt.VoxelLayout(pristine).shard_path(0).read_bytes()
    # a structure the repair does need and DIR lacks: one line naming it, nothing written
    path, offset = origin_bytes(cache, 20)  # shard 2: origins 16-23, structures 1 and 2
    poke(path, offset + 3, b"\xff\xff")
    before = path.read_bytes()
    out = cli(cache, "--repair", "--sources", only)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"structure {ids[1]}: no source file with id '{ids[1]}' among --sources" in out.stderr
    assert path.read_bytes() == before


def test_repair_refuses_a_changed_source(cache):
    k0_path = Path(fmt.ragged_item(*fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH), 0))
    layout = fmt.VoxelLayout(cache)
    path, offset = origin_bytes(cache, 0)
    poke(path, offset, b"\x01")
    backup = k0_path.read_bytes()
    try:
        k0_path.write_bytes(backup + b"\n")
        before = path.read_bytes()
        out = cli(cache, "--repair")
        assert out.returncode == 1
        assert out.stderr.count("\n") == 1 and "missing or changed since the build" in out.stderr
        assert path.read_bytes() == before, "a refused repair must not touch the shard"
    finally:
        k0_path.write_bytes(backup)
    assert layout.n_origins == 28


def test_plain_check_never_imports_the_build_side(pristine, tmp_path):
    """cache_tools never imports pipeline: --sources PATH, --spot-check and --repair run `pipeline check`."""
    heavy = ["gemmi", "scipy", "pipeline", "zarr", "torch", "macromol_voxelize", "distributed"]

    def run(*args: str, block: bool = False) -> subprocess.CompletedProcess:
        code = ("import sys\n"
                + (f"for name in {heavy!r}:\n    sys.modules[name] = None  # importing it fails\n" if block else "")
                + "from cache_tools.commands.cli import main\n"
                f"code = main(['check', {str(pristine)!r}, '--quiet', *{list(args)!r}])\n"
                "loaded = {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
                f"print(code, sorted(loaded & {set(heavy)!r}))\n"
                "sys.exit(code)\n")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)

    for args in [(), ("--sources",)]:  # --sources alone hashes the recorded paths: no parsing
        proc = run(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "0 []", args
    # --spot-check runs `pipeline check` in a child process: this one still imports none of it
    proc = run("--spot-check", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2].endswith("2 origins re-voxelized)") and proc.stdout.splitlines()[-1] == "0 []"
    # and without the build side installed at all: a plain check works, --spot-check says why not
    assert run(block=True).returncode == 0
    proc = run("--spot-check", "2", block=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("cache-tools check: --spot-check needs the build side of voxel-cache")


def test_repair_waits_its_turn_behind_a_build(cache):
    """A repair takes the build's lock: while another process holds it, --repair refuses in one
    line naming the holder, and writes nothing."""
    import signal as _signal

    from pipeline.lock import lock_path

    path, offset = origin_bytes(cache, 12)
    poke(path, offset + 3, b"\xff\xff")
    damaged = path.read_bytes()
    hold = ("import sys, time; from pipeline.lock import BuildLock\nwith BuildLock(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(cache)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = cli(cache, "--repair")
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert "another build is writing this cache (host" in out.stderr and f"pid {holder.pid}" in out.stderr
        assert path.read_bytes() == damaged and lock_path(cache).exists()
    finally:
        holder.send_signal(_signal.SIGKILL)
        holder.wait()
    assert cli(cache, "--repair").returncode == 0 and path.read_bytes() != damaged  # the dead holder's lock: taken over
    assert not lock_path(cache).exists()


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_lattice_cache_is_checked_block_by_block(lattice_factory, tmp_path, compression):
    """Every block's crc32 against lattice/block_crc32; damage names the block, its structure and file."""
    root = Path(shutil.copytree(lattice_factory(compression=compression), tmp_path / "lattice.zarr"))
    clean = check_cache(root, progress=False)
    assert clean["ok"] and clean["origins"] == len(fmt.read_array(root, fmt.CENTER)) and clean["structures"] == 3
    layout = fmt.VoxelLayout(root, fmt.BLOCKS)
    block = int(fmt.read_array(root, fmt.LATTICE_BLOCK_START)[1]) + 2  # a block of the second structure
    shard, j = divmod(block, layout.items_per_shard)
    path = layout.shard_path(shard)
    data = bytearray(path.read_bytes())
    if compression == "none":
        data[j * layout.item_nbytes + 5] ^= 0x01
    else:
        offset, length = (int(v) for v in np.frombuffer(bytes(data[-layout.index_nbytes:]), "<u8").reshape(-1, 2)[j])
        data[offset + length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = check_cache(root, progress=False)
    kind = "checksum" if compression == "none" else "undecodable"
    sid = fmt.ragged_item(*fmt.read_ragged_strings(root, fmt.STRUCTURE_ID), 1)
    assert [(p["kind"], p["structure"], p["file"]) for p in report["problems"]] == \
        [(kind, sid, str(path.relative_to(root)))]
    assert report["problems"][0]["detail"].startswith(f"block {block}: ")
