"""End-to-end build speed against the bare voxelizer, worker scaling, bytes per origin.

One run, ratios only:
  bare voxelizer  macromol_voxelize.image_from_atoms on the same origins, one core,
                  atoms already parsed (the floor of any pipeline)
  build, 1 worker pipeline build-cache end to end (parse, origins, voxelize, write, dask)
  build, 2 workers
and the bytes per origin and on-disk size for each storage dtype.

    python benchmarks/build_throughput.py [--inputs DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "tests" / "data" / "mmcif"


def bare_voxelizer_rate(cache: str) -> float:
    """Origins/s of macromol_voxelize's public API alone, on the cache's own origins."""
    import macromol_voxelize as mmvox
    import polars as pl

    from cache_tools import format as fmt
    from pipeline.parse import parse_atoms

    attrs = fmt.read_attrs(cache)
    image, channels = attrs["params"]["image"], attrs["params"]["channels"]
    centers = fmt.read_array(cache, fmt.CENTER)
    ranges = fmt.read_array(cache, fmt.STRUCTURE_ORIGIN_RANGE)
    paths = fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH)
    frames = []
    for k in range(len(ranges)):
        atoms = parse_atoms(fmt.ragged_item(*paths, k), channels)
        frames.append(pl.DataFrame({"x": atoms.xyz[:, 0], "y": atoms.xyz[:, 1], "z": atoms.xyz[:, 2],
                                    "channels": [[int(c)] for c in atoms.channel]}).with_columns(
            radius_A=image["atom_radius_A"]))
    t = time.perf_counter()
    n = 0
    for k, (start, stop) in enumerate(ranges):
        for origin in range(start, stop):
            grid = mmvox.Grid(image["grid_voxels"], image["resolution_A"], centers[origin].astype(np.float64))
            mmvox.image_from_atoms(frames[k], mmvox.ImageParams(channels=len(channels), grid=grid))
            n += 1
    return n / (time.perf_counter() - t)


def timed_build(inputs: str, out: str, dtype: str, workers: int) -> dict:
    from pipeline.build import BuildParams, build_cache
    from pipeline.origins import OriginRule
    from pipeline.parse import parse_channels
    from pipeline.voxelize import ImageSpec, Storage

    channels = parse_channels("C,N,O,*")
    params = BuildParams(channels, ImageSpec(), Storage(dtype), OriginRule())
    t = time.perf_counter()
    summary = build_cache([inputs], out, params, workers=workers, progress=False)
    elapsed = time.perf_counter() - t
    return {"dtype": dtype, "workers": workers, "origins": summary.origins, "elapsed_s": elapsed,
            "origins_per_s": summary.origins / elapsed, "bytes_on_disk": summary.bytes_on_disk}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", default=str(SAMPLES))
    p.add_argument("--json")
    args = p.parse_args(argv)
    from cache_tools import format as fmt

    with tempfile.TemporaryDirectory() as tmp:
        one = timed_build(args.inputs, f"{tmp}/w1.zarr", "float32", 1)
        two = timed_build(args.inputs, f"{tmp}/w2.zarr", "float32", 2)
        bare = bare_voxelizer_rate(f"{tmp}/w1.zarr")
        per_dtype = {"float32": {**two, "bytes_per_origin": fmt.VoxelLayout(f"{tmp}/w2.zarr").origin_nbytes}}
        for dtype in ("float16", "uint8"):
            r = timed_build(args.inputs, f"{tmp}/{dtype}.zarr", dtype, 2)
            per_dtype[dtype] = {**r, "bytes_per_origin": fmt.VoxelLayout(f"{tmp}/{dtype}.zarr").origin_nbytes}
    results = {"origins": one["origins"], "bare_voxelizer_origins_per_s": bare,
               "build_1_worker_origins_per_s": one["origins_per_s"],
               "build_2_workers_origins_per_s": two["origins_per_s"],
               "ratio_build1_vs_bare": one["origins_per_s"] / bare,
               "speedup_2_vs_1_workers": two["origins_per_s"] / one["origins_per_s"],
               "per_dtype": per_dtype}
    print(f"{results['origins']} origins from {args.inputs}")
    print(f"bare voxelizer (1 core, atoms pre-parsed): {bare:8.1f} origins/s")
    print(f"build-cache, 1 worker (end to end):        {one['origins_per_s']:8.1f} origins/s "
          f"= {results['ratio_build1_vs_bare']:.2f}x bare (goal >= 0.9)")
    print(f"build-cache, 2 workers (end to end):       {two['origins_per_s']:8.1f} origins/s "
          f"= {results['speedup_2_vs_1_workers']:.2f}x one worker (goal >= 1.8)")
    for dtype, r in per_dtype.items():
        print(f"{dtype:>8}: {r['bytes_per_origin']:>7} bytes/origin, {r['bytes_on_disk'] / 2**20:7.1f} MiB on disk")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
