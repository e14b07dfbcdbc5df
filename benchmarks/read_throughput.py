"""Per-item read speed of VoxelCacheDataset against its limits and its alternatives.

One run, one machine, ratios only:
  dataset      VoxelCacheDataset[i] (warm page cache)
  raw memmap   copying the same bytes out of an np.memmap (the floor)
  zarr         zarr's per-item read of the same origin (voxels[i])
  on the fly   gemmi parse + macromol_voxelize of the same origin (what loaders do today)
  DataLoader   images/s through torch's DataLoader with 0 and 2 workers

    python benchmarks/read_throughput.py [--cache CACHE] [--items 3000] [--json out.json]

Without --cache it builds the bundled samples (default parameters) into a temp dir.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "tests" / "data" / "mmcif"


def per_call_us(fn, ids, repeats: int = 3) -> float:
    """Best of ``repeats`` passes, microseconds per call."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in ids:
            fn(i)
        best = min(best, (time.perf_counter() - t) / len(ids) * 1e6)
    return best


def interleaved_us(fns, ids, repeats: int = 7) -> list[float]:
    """Best microseconds per call of each function, passes alternating between them."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            for i in ids:
                fn(i)
            best[k] = min(best[k], (time.perf_counter() - t) / len(ids) * 1e6)
    return best


def loader_rate(ds, workers: int, batch_size: int = 64, epochs: int = 2) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: worker start-up, page cache
        pass
    t = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["image"])
    return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="an existing cache (default: build the samples into a temp dir)")
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--json", help="write results here too")
    args = p.parse_args(argv)

    from cache_tools import VoxelCacheDataset
    from cache_tools import format as fmt

    tmp = None
    cache = args.cache
    if cache is None:
        from pipeline.build import BuildParams, build_cache
        from pipeline.origins import OriginRule
        from pipeline.parse import parse_channels
        from pipeline.voxelize import ImageSpec, Storage
        tmp = tempfile.TemporaryDirectory()
        cache = str(Path(tmp.name) / "bench.zarr")
        channels = parse_channels("C,N,O,*")
        build_cache([str(SAMPLES)], cache, BuildParams(channels, ImageSpec(), Storage(), OriginRule()),
                    progress=False)

    ds = VoxelCacheDataset(cache)
    layout = fmt.VoxelLayout(cache)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(ds), size=min(args.items, 20 * len(ds))).tolist()
    for i in range(len(ds)):  # warm the page cache
        ds[i]

    from compressed_reads import single_file  # the same stored bytes in one raw file (any codec)

    single = tempfile.TemporaryDirectory(prefix="read-throughput-")
    m = single_file(cache, single.name)

    def raw(i):
        return np.array(m[i])

    import zarr
    voxels = zarr.open_group(cache, mode="r")["voxels"]

    results = {"cache": cache, "n_origins": len(ds), "image_shape": list(layout.image_shape),
               "dtype": layout.dtype.name, "bytes_per_origin": layout.origin_nbytes}
    # Interleaved passes, best of each: the machine's drift hits both sides alike.
    results["dataset_us"], results["raw_memmap_us"] = interleaved_us([ds.__getitem__, raw], ids)
    results["zarr_us"] = per_call_us(lambda i: voxels[i], ids[:200], repeats=1)
    results["on_the_fly_us"] = on_the_fly_us(cache, ids[:40])
    results["dataloader_0_workers_img_s"] = loader_rate(ds, 0)
    results["dataloader_2_workers_img_s"] = loader_rate(ds, 2)
    results["ratio_dataset_vs_raw"] = results["dataset_us"] / results["raw_memmap_us"]
    results["speedup_vs_zarr"] = results["zarr_us"] / results["dataset_us"]
    results["speedup_vs_on_the_fly"] = results["on_the_fly_us"] / results["dataset_us"]
    if tmp is not None:
        tmp.cleanup()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def on_the_fly_us(cache: str, ids: list[int]) -> float:
    """What a loader without a cache pays per sample: parse the file, voxelize the origin."""
    import macromol_voxelize as mmvox
    import polars as pl

    from cache_tools import format as fmt
    from pipeline.parse import parse_atoms

    attrs = fmt.read_attrs(cache)
    image = attrs.params.image
    channels = [list(c) for c in attrs.params.channels]
    sindex = fmt.read_array(cache, fmt.STRUCTURE_INDEX)
    centers = fmt.read_array(cache, fmt.CENTER)
    paths = fmt.read_ragged_strings(cache, fmt.STRUCTURE_SOURCE_PATH)
    times = []
    for i in ids:
        t = time.perf_counter()
        atoms = parse_atoms(fmt.ragged_item(*paths, int(sindex[i])), channels)
        df = pl.DataFrame({"x": atoms.xyz[:, 0], "y": atoms.xyz[:, 1], "z": atoms.xyz[:, 2],
                           "channels": [[int(c)] for c in atoms.channel]}).with_columns(
            radius_A=image.atom_radius_A)
        grid = mmvox.Grid(image.grid_voxels, image.resolution_A, centers[i].astype(np.float64))
        img, _ = mmvox.image_from_atoms(df, mmvox.ImageParams(channels=len(channels), grid=grid))
        torch.from_numpy(img)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def print_table(r: dict) -> None:
    print(f"cache: {r['n_origins']} origins of {r['image_shape']} {r['dtype']} "
          f"({r['bytes_per_origin'] / 1024:.1f} KiB each), warm page cache")
    print(f"{'read path':<34}{'µs/item':>10}{'vs dataset':>14}")
    for name, key in (("VoxelCacheDataset[i]", "dataset_us"), ("raw np.memmap copy", "raw_memmap_us"),
                      ("zarr voxels[i]", "zarr_us"), ("gemmi parse + macromol_voxelize", "on_the_fly_us")):
        print(f"{name:<34}{r[key]:>10.1f}{r[key] / r['dataset_us']:>13.2f}x")
    print(f"DataLoader, 0 workers: {r['dataloader_0_workers_img_s']:.0f} images/s; "
          f"2 workers: {r['dataloader_2_workers_img_s']:.0f} images/s")
    print(f"goals: dataset/raw = {r['ratio_dataset_vs_raw']:.2f} (<= 1.25), "
          f"zarr/dataset = {r['speedup_vs_zarr']:.0f}x (>= 50), "
          f"on-the-fly/dataset = {r['speedup_vs_on_the_fly']:.0f}x (>= 500)")


if __name__ == "__main__":
    main(sys.argv[1:])
