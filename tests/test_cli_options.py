"""Issue 12, items 5-8: bad option values are refused at parse time, one line naming the option, exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DATA

BUILD = [sys.executable, "-m", "pipeline.cli", "build-cache"]
TOOLS = [sys.executable, "-m", "cache_tools.commands.cli"]


def run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run the CLIs concurrently (each is only a parse): a second instead of ten."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands]
    out = []
    for cmd, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


BAD_BUILD = [
    (["--seed", "-1"], ["--seed", "non-negative integer"]),
    (["--neighbor-radius", "-3"], ["--neighbor-radius", "positive"]),
    (["--neighbor-radius", "0"], ["--neighbor-radius", "positive"]),
    (["--min-neighbors", "-3"], ["--min-neighbors", "non-negative"]),
    (["--workers", "0"], ["--workers", "positive"]),
    (["--resolution", "nan"], ["--resolution", "positive"]),
    (["--grid-voxels", "0"], ["--grid-voxels", "positive"]),
    (["--dtype", "float32", "--uint8-max", "3"], ["--uint8-max", "only with --dtype uint8"]),
    (["--grid-voxels", "2000"], ["--grid-voxels 2000", "GiB", "memory"]),
    (["--channels", "Xx,Qq"], ["--channels", "'XX' is not an element symbol"]),
    (["--channels", "C,H"], ["--channels", "H", "hydrogens are never voxelized"]),
    # Issue 24, item 10: a level for no codec is refused like --uint8-max without uint8
    (["--compression", "none", "--compression-level", "5"],
     ["--compression-level applies only with --compression zstd (got --compression none)"]),
]


def test_build_options_refused_before_any_work(tmp_path):
    outs = [tmp_path / f"c{k}.zarr" for k in range(len(BAD_BUILD))]
    procs = run_all([[*BUILD, str(DATA / "1aa5.cif.gz"), "--out", str(out), "--quiet", *args]
                     for out, (args, _) in zip(outs, BAD_BUILD)])
    for out, proc, (args, needles) in zip(outs, procs, BAD_BUILD):
        assert_usage_error(proc, *needles)
        assert not out.exists(), args  # refused before the store is touched


def test_check_and_split_options_refused(cache_factory, tmp_path):
    cache = str(cache_factory())
    procs = run_all([
        [*TOOLS, "check", cache, "--spot-check", "-3"],
        [*TOOLS, "check", cache, "--workers", "0"],
        [*TOOLS, "check", cache, "--spot-check", "2", "--seed", "-1"],
        [*TOOLS, "split", cache, "--seed", "-1"],
        [*TOOLS, "split", cache, "--val", "1.5"],
    ])
    assert_usage_error(procs[0], "--spot-check", "non-negative integer")
    assert_usage_error(procs[1], "--workers", "positive integer")
    assert_usage_error(procs[2], "--seed", "non-negative integer")
    assert_usage_error(procs[3], "--seed", "non-negative integer")
    assert_usage_error(procs[4], "--val", "fraction")
    for proc in procs:
        assert proc.stderr.startswith(("cache-tools check: ", "cache-tools split: ")), proc.stderr


def test_channels_that_match_no_atom_give_the_true_reason():
    from pipeline.parse import ParseError, parse_atoms, parse_channels

    with pytest.raises(ParseError, match=r"no atom matches a channel: the first model's heavy atoms are "
                                         r"C, CL, N, O, none of them in --channels ZN\|FE"):
        parse_atoms(DATA / "1aa5.cif.gz", parse_channels("Zn|Fe"))


def test_compression_level_defaults_to_the_codecs_own():
    """Issue 24, item 10: no --compression-level means the codec's default level; a level is kept."""
    from cache_tools.format import DEFAULT_COMPRESSION_LEVEL
    from pipeline.cli import build_parser, params_from_args

    def params(*extra: str):
        return params_from_args(build_parser().parse_args(["build-cache", "x.cif", "--out", "c.zarr", *extra]))

    assert (params().compression, params().compression_level) == ("zstd", DEFAULT_COMPRESSION_LEVEL)
    assert params("--compression-level", "7").compression_level == 7
    assert params("--compression", "none").compression == "none"
    with pytest.raises(ValueError, match="between 1 and 22, got 23"):
        params("--compression-level", "23")
