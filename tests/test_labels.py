"""Issue 12, item 17: labels and docs say what the program does."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cache_tools import VoxelCacheDataset
from cache_tools.info import cache_info, format_info

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_help_names_every_suffix_and_the_shard_minimum():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", "--help"],
                         capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    assert ".cif, .cif.gz, .mmcif, .mmcif.gz" in out
    assert "~256 MiB shards, but at least 64 shards" in out


def test_info_rounds_the_error_and_counts_saturation_and_repr_names_both_dtypes(cache_factory):
    root = cache_factory("uint8")
    info = cache_info(root)
    text = format_info(info)
    storage = next(line for line in text.splitlines() if line.strip().startswith("storage:"))
    assert "max abs error 0.00392 up to 2" in storage and "0.0039215686" not in storage
    saturated = info["build"].get("saturated_voxels", 0)
    assert (f"{saturated:,} voxels saturated" if saturated else "no voxel saturated") in storage
    r = repr(VoxelCacheDataset(root))
    assert "items=float32" in r and "stored=uint8" in r and "dtype=uint8" not in r


def test_readme_sample_size_matches_what_info_reports():
    origins, nbytes = 2250, 4 * 21 ** 3 * 4  # the sample: 2,250 origins of 4 x 21^3 float32
    # The default build compresses (zstd); the raw size is stated for --compression none.
    assert f"{origins * nbytes / 2**20:.0f} MiB with `--compression none`" in README
    assert f"{nbytes:,} bytes each" in README and "~320 MB" not in README
