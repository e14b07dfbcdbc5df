"""The lattice layout against the per-origin layout, side by side in one run.

For the same inputs (the bundled samples, default origin rule, uint8 unless said):
  bytes        stored bytes per origin: per-origin raw/zstd, lattice raw/zstd (blocks + block maps)
  build        `pipeline build-cache` wall time on the samples x8 (8 copies under distinct ids),
               CLI defaults (float32, zstd), per-origin vs --layout lattice, interleaved runs
  item         ds[i] (stored dtype, warm page cache): per-origin zstd (the reference), lattice raw,
               lattice zstd; random origins
  batch        ds[ids] of 64 random origins, 1 and 2 threads
  pairs        NeighborPairs batches of 64 (uint8, 21³, 4 channels): pairs per second, 1 and 2 threads
  memory       DataLoader workers' private anonymous memory (MiB) over 3 epochs: lattice views and
               pairs against a bare worker (a Dataset of one constant tensor), forked workers
  directions   with --rotations K lattice copies, the fraction of uniformly random directions within
               10° and 20° of an available lattice axis (6K axes), K = 1, 6, 22, and bytes per origin

    python benchmarks/lattice.py [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLES = REPO / "tests" / "data" / "mmcif"

from cache_tools import NeighborPairs, VoxelCacheDataset  # noqa: E402
from cache_tools import format as fmt  # noqa: E402


def build(out: Path, *extra: str, inputs: Path = SAMPLES) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", str(inputs), "--out", str(out), "--quiet",
                    *extra], check=True, capture_output=True)
    return time.perf_counter() - t


def bytes_per_origin(root: Path) -> float:
    attrs = fmt.read_attrs(root)
    n = len(fmt.read_array(root, fmt.CENTER))
    if attrs.params.layout == "lattice":
        layout = fmt.VoxelLayout(root, fmt.BLOCKS)
        maps = sum(fmt.read_array(root, name).nbytes for name in
                   (fmt.LATTICE_MAP, fmt.LATTICE_GRID, fmt.LATTICE_MAP_START, fmt.LATTICE_BLOCK_START))
        return (fmt.voxels_nbytes(layout) + maps) / n
    return fmt.voxels_nbytes(fmt.VoxelLayout(root)) / n


def per_call_us(fns: dict, items, repeats: int = 7) -> dict[str, float]:
    """Median over interleaved passes of each function's µs per item."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for item in items:
                fn(item)
            times[name].append((time.perf_counter() - t) / len(items) * 1e6)
    return {name: float(np.median(v)) for name, v in times.items()}


def directions_covered(mats: np.ndarray, samples: int = 20000, seed: int = 0) -> dict[str, float]:
    """Fraction of uniform random directions within 10° / 20° of one of the 6K axes of K copies."""
    axes = np.concatenate([np.concatenate([m.T, -m.T]) for m in mats])  # the copy's axes in the structure frame
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((samples, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    best = np.degrees(np.arccos(np.clip((u @ axes.T).max(axis=1), -1, 1)))
    return {"within_10": float((best <= 10).mean()), "within_20": float((best <= 20).mean()),
            "median_gap_deg": float(np.median(best))}


def continuous_rotation_error(root: Path, count: int = 24) -> dict[str, float]:
    """ContinuousRotation (trilinear resampling of a larger view) against voxelizing the rotated
    atoms at the same centre, float32, random rotations: relative L1 error and correlation."""
    import torch

    from cache_tools import ContinuousRotation
    from cache_tools.read.augment import random_rotations
    from pipeline.parse import parse_atoms
    from pipeline.voxelize import ImageSpec, rotate_about, voxelize

    n = fmt.read_attrs(root).params.image.grid_voxels
    augment = ContinuousRotation(n)
    big = VoxelCacheDataset(root, grid_voxels=augment.source_voxels(n))
    ids = np.random.default_rng(1).choice(len(big), count, replace=False).tolist()
    batch = big[ids]
    rotations = random_rotations(count, torch.Generator().manual_seed(2))
    turned, _ = augment(batch["image"], rotations)
    errors, correlations = [], []
    paths = fmt.read_ragged_strings(root, fmt.STRUCTURE_SOURCE_PATH)
    channels = [list(c) for c in fmt.read_attrs(root).params.channels]
    for k in range(count):
        atoms = parse_atoms(fmt.ragged_item(*paths, int(batch["structure_index"][k])), channels)
        center = batch["center_A"][k].double().numpy()
        want = voxelize(rotate_about(atoms.xyz, center, rotations[k].numpy()), atoms.channel, center,
                        ImageSpec(n, 1.0, len(channels), 0.5))
        got = turned[k].numpy()
        errors.append(np.abs(got - want).sum() / np.abs(want).sum())
        correlations.append(np.corrcoef(got.ravel(), want.ravel())[0, 1])
    return {"relative_l1_error": round(float(np.median(errors)), 3),
            "correlation": round(float(np.median(correlations)), 3), "views": count}


def memory_of(dataset, workers: int = 2, epochs: int = 3, batch: int = 32, steps: int = 20) -> list[float]:
    """Each worker's private anonymous memory (MiB) at the end of every epoch and validation."""
    from cache_tools.profiler.phases import make_loaders, run_phases

    train, val = make_loaders(dataset, "cache", workers, batch, steps, 4)
    run = run_phases(train, val, epochs)
    out = []
    for snap in run["snapshots"]:
        if snap["label"].endswith("end"):
            workers_mem = [p["private_anon"] / 2**20 for p in snap["procs"].values() if p["role"].endswith("worker")]
            out.append(round(max(workers_mem), 2) if workers_mem else None)
    del train, val
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="skip the x8 build and the memory runs")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lattice-bench-"))
    results: dict = {"load_average_start": os.getloadavg()}
    caches = {}
    for name, extra in [("origins raw", ["--compression", "none"]), ("origins zstd", []),
                        ("lattice raw", ["--layout", "lattice", "--compression", "none"]),
                        ("lattice zstd", ["--layout", "lattice"])]:
        caches[name] = work / name.replace(" ", "_")
        build(caches[name], "--dtype", "uint8", *extra)
    results["bytes_per_origin_uint8"] = {name: round(bytes_per_origin(root), 1) for name, root in caches.items()}
    for name, extra in [("origins zstd float32", []), ("lattice zstd float32", ["--layout", "lattice"])]:
        root = work / name.replace(" ", "_")
        build(root, *extra)
        results.setdefault("bytes_per_origin_float32", {})[name] = round(bytes_per_origin(root), 1)

    # reads, stored dtype, warm
    datasets = {name: VoxelCacheDataset(root, dequantize=False) for name, root in caches.items()
                if name != "origins raw"}
    n = len(datasets["origins zstd"])
    for ds in datasets.values():
        for i in range(n):
            ds[i]
    rng = np.random.default_rng(0)
    items = rng.integers(0, n, 2000).tolist()
    results["item_us"] = per_call_us({name: ds.__getitem__ for name, ds in datasets.items()}, items)
    batches = [rng.integers(0, n, 64).tolist() for _ in range(30)]
    results["batch64_us"] = {}
    for threads in (1, 2):
        for name, root in caches.items():
            if name == "origins raw":
                continue
            ds = VoxelCacheDataset(root, dequantize=False, threads=threads)
            ds[batches[0]]
            results["batch64_us"][f"{name}, {threads} thread{'s' if threads > 1 else ''}"] = \
                per_call_us({"b": ds.__getitems__}, batches)["b"]
    results["pairs_per_s"] = {}
    for name in ("lattice raw", "lattice zstd"):
        for dtype_name, dq in (("uint8", False), ("float32", True)):
            for threads in (1, 2):
                pairs = NeighborPairs(caches[name], jitter_voxels=5, dequantize=dq, threads=threads)
                pairs[batches[0]]
                us = per_call_us({"b": pairs.__getitems__}, batches)["b"]
                results["pairs_per_s"][f"{name}, {dtype_name}, {threads} thread{'s' if threads > 1 else ''}"] = \
                    round(64 / us * 1e6)
    if not args.quick:
        copies = work / "x8"
        copies.mkdir()
        for k in range(8):
            for f in SAMPLES.iterdir():
                shutil.copy(f, copies / f"{f.name.split('.')[0]}_{k}{''.join(f.suffixes)}")
        times = {"origins (default)": [], "lattice": []}
        for _ in range(2):
            for name, extra in (("origins (default)", []), ("lattice", ["--layout", "lattice"])):
                out = work / f"x8_{len(times[name])}_{name[:7]}"
                times[name].append(build(out, "--keep-duplicates", *extra, inputs=copies))
                shutil.rmtree(out)
        results["build_x8_s"] = {name: round(float(np.median(v)), 2) for name, v in times.items()}
        from cache_tools.profiler.phases import ConstantDataset
        results["worker_private_anon_mib"] = {
            "bare": memory_of(ConstantDataset(n, (4, 21, 21, 21))),
            "lattice views": memory_of(VoxelCacheDataset(caches["lattice zstd"], rotate=True, jitter_voxels=3)),
            "neighbor pairs": memory_of(NeighborPairs(caches["lattice zstd"], jitter_voxels=5)),
        }
    results["continuous_rotation"] = continuous_rotation_error(work / "lattice_zstd_float32")
    results["directions"] = {}
    for k in (1, 6, 22):
        root = work / f"rot{k}"
        build(root, "--layout", "lattice", "--dtype", "uint8", "--rotations", str(k))
        mats = fmt.read_array(root, fmt.LATTICE_ROTATION) if k > 1 else np.eye(3)[None, None]
        cover = [directions_covered(m) for m in mats]
        results["directions"][f"K={k}"] = {
            "bytes_per_origin": round(bytes_per_origin(root), 1),
            **{key: round(float(np.mean([c[key] for c in cover])), 3) for key in cover[0]}}
        shutil.rmtree(root)
    results["load_average_end"] = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
