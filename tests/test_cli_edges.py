"""Issue 24, item 8: small edges of the `cache-tools` command line (a closed pipe, old attributes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from cache_tools.commands.cli import main as cache_tools
from conftest import sigint_while_waiting_on

TOOLS = [sys.executable, "-m", "cache_tools.commands.cli"]


def test_info_into_a_closed_pipe_exits_quietly(cache_factory):
    """`cache-tools info CACHE | head -3`: head may exit before info writes. Here the pipe's reader
    is closed before info starts, so every run meets the closed pipe (the report's race, made certain)."""
    cache = str(cache_factory())
    for extra in ([], ["--json"]):
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run([*TOOLS, "info", cache, *extra], stdout=write, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
        finally:
            os.close(write)
        assert (proc.returncode, proc.stderr) == (141, ""), (extra, proc.returncode, proc.stderr)


def test_info_of_a_uint8_cache_without_uint8_max(cache_factory, tmp_path, capsys):
    """Attributes that give the scale but not `uint8_max` (hand-made or older): info derives the
    top of the range from the scale (255 steps of it), the value the Dataset dequantizes with."""
    root = shutil.copytree(cache_factory("uint8"), tmp_path / "c.zarr")
    meta = json.loads((root / "zarr.json").read_text())
    storage = meta["attributes"]["voxel_cache"]["params"]["storage"]
    assert storage.pop("uint8_max") == 2.0
    (root / "zarr.json").write_text(json.dumps(meta))
    assert cache_tools(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "storage:    uint8 (scale 0.00784314, max abs error 0.00392 up to 2; " in out, out


def test_spot_check_of_a_uint8_cache_without_uint8_max_revoxelizes_with_its_scale(data_dir, tmp_path, capfd):
    """A cache from before uint8_max and the params checksum were recorded, built with another top
    than the default: re-voxelizing takes the top from the scale (255 steps of it), not 2.0."""
    from pipeline.cli import main as pipeline

    root = tmp_path / "c.zarr"
    assert pipeline(["build-cache", str(data_dir / "1aa5.cif.gz"), "--out", str(root), "--dtype", "uint8",
                     "--uint8-max", "3", "--grid-voxels", "9", "--max-origins-per-structure", "4",
                     "--workers", "1", "--quiet"]) == 0
    meta = json.loads((root / "zarr.json").read_text())
    cache = meta["attributes"]["voxel_cache"]
    assert cache["params"]["storage"].pop("uint8_max") == 3.0
    cache.pop("params_crc32")
    (root / "zarr.json").write_text(json.dumps(meta))
    capfd.readouterr()
    assert cache_tools(["check", str(root), "--spot-check", "4", "--sources", str(data_dir)]) == 0
    out = capfd.readouterr().out
    assert "OK" in out and "4 origins re-voxelized" in out, out


def test_sigint_reaches_cache_tools_started_with_sigint_ignored(cache_factory, tmp_path):
    """`cache-tools ... &` from a script starts with SIGINT ignored; SIGINT still interrupts it:
    one line, exit 130. `split --from-file` waits on its id list, a FIFO, so the signal arrives
    while the command runs."""
    root = shutil.copytree(cache_factory("uint8"), tmp_path / "c.zarr")
    fifo = tmp_path / "ids.txt"
    command = [sys.executable, "-m", "cache_tools.commands.cli", "split", str(root), "--from-file", f"val={fifo}"]
    assert sigint_while_waiting_on(fifo, command) == (130, "cache-tools: interrupted\n")


def test_a_build_into_a_closed_pipe_exits_quietly(data_dir, tmp_path):
    """`pipeline build-cache ... | head -1`: the reader of stdout is gone before the summary is
    printed. The build completes (its store is whole) and exits 141 with nothing on stderr."""
    read, write = os.pipe()
    os.close(read)
    out = tmp_path / "c.zarr"
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "build-cache", str(data_dir / "1aa5.cif.gz"),
                               "--out", str(out), "--grid-voxels", "9", "--max-origins-per-structure", "4",
                               "--workers", "1", "--quiet"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, ""), (proc.returncode, proc.stderr)
    assert cache_tools(["check", str(out)]) == 0
