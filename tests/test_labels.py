"""Issue 12, item 17: labels and docs say what the program does."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cache_tools import VoxelCacheDataset
from cache_tools.commands.info import cache_info, format_info
from cache_tools.commands.options import human_bytes

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


def test_readme_sample_size_matches_what_info_reports(sample_cache):
    """The figures the README gives for the sample build are what `cache-tools info` says of it."""
    info = cache_info(sample_cache)
    origins, nbytes, voxels = info["origins"], info["bytes_per_origin"], info["voxels"]
    shape = " × ".join([str(info["image_shape"][0]), f"{info['image_shape'][1]}³"])
    assert (f"{human_bytes(info['bytes_on_disk'])} ({info['bytes_on_disk'] / 1e6:.1f} MB; `cache-tools info` counts "
            f"in MiB = 2²⁰ bytes): {origins:,} origins of {shape}\nfloat32, {nbytes:,} bytes each before zstd, "
            f"{human_bytes(voxels['stored_bytes_per_origin'])} each after; "
            f"{origins * nbytes / 2**20:.0f} MiB with `--compression none`.") in README
