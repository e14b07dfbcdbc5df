"""Build speed against the bare per-origin voxelizer, worker scaling, memory, rotations.

One run, ratios only (default parameters: 21³ voxels of 1 Å, 4 channels, float32):
  bare voxelizer     macromol_voxelize.image_from_atoms on the build's own origins, one
                     core, atoms already parsed: what voxelizing origins one by one costs
  steady state       the write phase of a 1-worker build of the samples copied --copies
                     times (origins / seconds from the first to the last shard written)
  end to end         the whole sample build, 1 worker (parse, origins, voxelize, write, dask)
  2 vs 1 workers     end to end on the samples copied --copies times
  memory             peak RSS per worker building a 211k-atom, 290 Å assembly
  rotations          --rotations 4: the shipped per-origin rotations (canonical image from
                     the lattice) vs rotating the whole structure 3 times on the lattice
and the bytes per origin for each storage dtype. The machine's load average is recorded.

    python benchmarks/build_throughput.py [--copies 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SAMPLES = HERE.parent / "tests" / "data" / "mmcif"


def bare_voxelizer_rate(cache: str) -> dict:
    """Origins/s of macromol_voxelize's public API alone, on the cache's own origins."""
    import macromol_voxelize as mmvox
    import polars as pl

    from cache_tools import format as fmt
    from pipeline.parse import parse_atoms

    attrs = fmt.read_attrs(cache)
    image, channels = attrs.params.image, [list(c) for c in attrs.params.channels]
    centers = fmt.read_array(cache, fmt.CENTER)
    ranges = fmt.read_array(cache, fmt.STRUCTURE_ORIGIN_RANGE)
    paths = fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH)
    frames = []
    for k in range(len(ranges)):
        atoms = parse_atoms(fmt.ragged_item(*paths, k), channels)
        frames.append(pl.DataFrame({"x": atoms.xyz[:, 0], "y": atoms.xyz[:, 1], "z": atoms.xyz[:, 2],
                                    "channels": [[int(c)] for c in atoms.channel]}).with_columns(
            radius_A=image.atom_radius_A))
    t = time.perf_counter()
    n = 0
    for k, (start, stop) in enumerate(ranges):
        for origin in range(start, stop):
            grid = mmvox.Grid(image.grid_voxels, image.resolution_A, centers[origin].astype(np.float64))
            mmvox.image_from_atoms(frames[k], mmvox.ImageParams(channels=len(channels), grid=grid))
            n += 1
    elapsed = time.perf_counter() - t
    return {"origins": n, "elapsed_s": elapsed, "origins_per_s": n / elapsed}


def params(dtype: str = "float32", rotations: int = 1, exact: bool = False, keep_duplicates: bool = False):
    """The CLI's defaults (zstd level 1 included); copies of a file need keep_duplicates."""
    from cache_tools import format as fmt
    from pipeline.build import BuildParams
    from pipeline.origins import OriginRule
    from pipeline.parse import parse_channels
    from pipeline.voxelize import ImageSpec, Storage

    channels = parse_channels("C,N,O,*")
    return BuildParams(channels, ImageSpec(), Storage(dtype), OriginRule(), rotations=rotations,
                       exact_centers=exact, keep_duplicates=keep_duplicates,
                       compression=fmt.DEFAULT_COMPRESSION, compression_level=fmt.DEFAULT_COMPRESSION_LEVEL)


def timed_build(inputs: str, out: str, workers: int, **kw) -> dict:
    from cache_tools import format as fmt
    from pipeline.build import build_cache

    t = time.perf_counter()
    summary = build_cache([inputs], out, params(**kw), workers=workers, progress=False)
    elapsed = time.perf_counter() - t
    build = fmt.read_attrs(out).build
    return {"workers": workers, **kw, "origins": summary.origins, "elapsed_s": elapsed,
            "origins_per_s": summary.origins / elapsed, "bytes_on_disk": summary.bytes_on_disk,
            "phase_s": build.get("phase_s"), "peak_worker_rss_bytes": summary.peak_worker_rss_bytes,
            "origin_nbytes": fmt.VoxelLayout(out).origin_nbytes}


def copies_of_samples(dst: Path, copies: int) -> Path:
    dst.mkdir()
    for c in range(copies):
        for f in SAMPLES.iterdir():
            shutil.copyfile(f, dst / f"c{c}_{f.name}")
    return dst


def rotation_options(k: int = 4) -> dict:
    """Origins/s with K images per origin: per-origin rotations (shipped) vs whole-structure ones."""
    from cache_tools.format import file_sha256
    from pipeline.encode import LatticeEncoder, snap_centers, tile_order
    from pipeline.origins import OriginRule, pick_origins
    from pipeline.parse import parse_atoms, parse_channels
    from pipeline.voxelize import ImageSpec, Storage, origin_rotations

    spec, storage = ImageSpec(), Storage()
    per_origin_s = whole_s = 0.0
    n = 0
    for f in sorted(SAMPLES.iterdir()):
        atoms = parse_atoms(f, parse_channels("C,N,O,*"))
        picked = pick_origins(atoms.xyz, OriginRule(), file_sha256(f))
        if len(picked) == 0:
            continue
        centers = snap_centers(picked, spec).astype(np.float64)
        centers = centers[tile_order(centers, spec)]
        n += len(centers)
        mats = np.stack([origin_rotations(0, o, k) for o in range(len(centers))])
        t = time.perf_counter()
        for _ in LatticeEncoder(atoms.xyz, atoms.channel, spec, storage).encode_many(centers, mats):
            pass
        per_origin_s += time.perf_counter() - t
        t = time.perf_counter()
        shared = origin_rotations(0, n, k)  # one set of K rotations for the whole structure
        pivot = atoms.xyz.mean(axis=0)
        for r in range(k):
            xyz = (atoms.xyz - pivot) @ shared[r].T + pivot
            moved = snap_centers((centers - pivot) @ shared[r].T + pivot, spec).astype(np.float64)
            order = tile_order(moved, spec)
            for _ in LatticeEncoder(xyz, atoms.channel, spec, storage).encode_many(moved[order]):
                pass
        whole_s += time.perf_counter() - t
    return {"rotations": k, "origins": n, "per_origin_rotations_origins_per_s": n / per_origin_s,
            "whole_structure_rotations_origins_per_s": n / whole_s, "whole_vs_per_origin": per_origin_s / whole_s}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=4, help="copies of the samples for steady state and scaling")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results: dict = {"load_average_before": [round(x, 2) for x in load_before]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        many = copies_of_samples(tmp / "many", args.copies)
        sample = timed_build(str(SAMPLES), str(tmp / "sample.zarr"), 1)
        bare = bare_voxelizer_rate(str(tmp / "sample.zarr"))
        one = timed_build(str(many), str(tmp / "w1.zarr"), 1, keep_duplicates=True)
        two = timed_build(str(many), str(tmp / "w2.zarr"), 2, keep_duplicates=True)
        steady = one["origins"] / one["phase_s"]["voxelize"]
        from make_assembly import make_assembly

        made = make_assembly(tmp / "assembly.cif")
        (tmp / "big").mkdir()
        shutil.move(str(tmp / "assembly.cif"), tmp / "big" / "assembly.cif")
        big = timed_build(str(tmp / "big"), str(tmp / "big.zarr"), 1)
        dtypes = {d: timed_build(str(SAMPLES), str(tmp / f"{d}.zarr"), 2, dtype=d) for d in ("float16", "uint8")}
        rot = rotation_options()
    results.update({
        "origins_sample": sample["origins"], "bare_voxelizer": bare, "build_sample_1_worker": sample,
        "build_copies_1_worker": one, "build_copies_2_workers": two, "assembly": {**made, **big},
        "steady_state_1_worker_origins_per_s": steady,
        "ratio_steady_state_vs_bare": steady / bare["origins_per_s"],
        "ratio_sample_end_to_end_vs_one_by_one": bare["elapsed_s"] / sample["elapsed_s"] * sample["origins"] / bare["origins"],
        "speedup_2_vs_1_workers": two["origins_per_s"] / one["origins_per_s"],
        "rotations": rot, "per_dtype": {"float32": sample, **dtypes},
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    })
    MiB = 2**20
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")
    print(f"bare voxelizer (image_from_atoms, 1 core, atoms pre-parsed): {bare['origins_per_s']:8.1f} origins/s")
    print(f"steady state, 1 worker ({one['origins']} origins, write phase):  {steady:8.1f} origins/s "
          f"= {results['ratio_steady_state_vs_bare']:.1f}x bare (goal >= 8)")
    print(f"sample build end to end, 1 worker ({sample['origins']} origins): {sample['elapsed_s']:.1f} s vs "
          f"{bare['elapsed_s']:.1f} s one by one = {results['ratio_sample_end_to_end_vs_one_by_one']:.1f}x (goal >= 4)")
    print(f"{args.copies}x samples end to end: 1 worker {one['origins_per_s']:.0f}, 2 workers "
          f"{two['origins_per_s']:.0f} origins/s = {results['speedup_2_vs_1_workers']:.2f}x (goal >= 1.8)")
    peak = big["peak_worker_rss_bytes"]
    print(f"assembly {made['atoms']} atoms, {max(made['extent_A'])} A: {big['origins']} origins in "
          f"{big['elapsed_s']:.1f} s; peak RSS per worker scan {peak['scan'] / MiB:.0f} MiB, voxelize "
          f"{peak['voxelize'] / MiB:.0f} MiB")
    print(f"--rotations 4: per-origin rotations {rot['per_origin_rotations_origins_per_s']:.0f}, whole-structure "
          f"{rot['whole_structure_rotations_origins_per_s']:.0f} origins/s ({rot['whole_vs_per_origin']:.1f}x)")
    for dtype, r in results["per_dtype"].items():
        print(f"{dtype:>8}: {r['origin_nbytes']:>7} bytes/origin, {r['bytes_on_disk'] / MiB:7.1f} MiB on disk")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
