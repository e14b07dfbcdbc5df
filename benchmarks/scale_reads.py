"""Does anything grow with the cache? The same figures on a small and a huge cache, in one run.

For each cache: Dataset construction time, pickled size, per-item ds[i] and batched
ds[ids] (64 random ids) time on a warm page cache, bytes per origin on disk, and each
DataLoader worker's private anonymous memory (cache_tools.profiler.private_anon) after
each of several epochs (bounded: the same number of random batches per epoch on both
caches, so the work is equal and only the cache size differs).

    pipeline build-cache SRC10K --out big-10k.zarr --dtype uint8 --min-spacing 2 --max-origins-per-structure 1000
    pipeline build-cache SRC1M  --out big-1m.zarr  --dtype uint8 --min-spacing 2 --max-origins-per-structure 1000
    python benchmarks/scale_reads.py big-10k.zarr big-1m.zarr [--json out.json]

(SRC10K / SRC1M: the sample files of 1000+ origins at --min-spacing 2 — 1gzx, 1qjg, 1ypi,
2ypi, 3ypi, 7spt, 3v4i — copied under 10 / 1000 distinct names; ids come from file names.)
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_tools import VoxelCacheDataset, batch_collate  # noqa: E402
from cache_tools import format as fmt  # noqa: E402
from cache_tools.profiler import private_anon, read_smaps_rollup  # noqa: E402

BATCH = 64


def best(fn, repeats: int = 5) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def reads(cache: str, rng: np.random.Generator) -> dict:
    ds = VoxelCacheDataset(cache)
    n = len(ds)
    items = rng.integers(0, n, 2000).tolist()
    batches = [rng.integers(0, n, BATCH) for _ in range(50)]
    for i in items:  # warm: page cache (a random 2000 of the compressed bytes), maps
        ds[i]
    for b in batches:
        ds[b]
    item_us = best(lambda: [ds[i] for i in items], 5) / len(items) * 1e6
    batch_us = best(lambda: [ds.__getitems__(b) for b in batches], 5) / len(batches) * 1e6
    return {"item_us": item_us, "batch64_us": batch_us}


def worker_memory(cache: str, epochs: int, batches_per_epoch: int, workers: int = 2) -> list[list[int]]:
    """Private anonymous bytes of each worker after each bounded epoch."""
    ds = VoxelCacheDataset(cache)
    sampler = RandomSampler(ds, replacement=True, num_samples=batches_per_epoch * BATCH,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers, persistent_workers=True,
                        collate_fn=batch_collate)
    per_epoch = []
    it = None
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        it = iter(loader)
        for _ in it:
            pass
        pids = [w.pid for w in it._workers]
        per_epoch.append([private_anon(read_smaps_rollup(pid)) for pid in pids])
    del it, loader
    return per_epoch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("caches", nargs="+")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batches-per-epoch", type=int, default=150)
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = {}
    for cache in args.caches:
        layout = fmt.VoxelLayout(cache)
        r = {"origins": layout.n_origins, "shards": layout.n_shards,
             "bytes_per_origin": fmt.voxels_nbytes(layout) / layout.n_origins,
             "construct_ms": best(lambda: VoxelCacheDataset(cache), 40) * 1e3,  # ms: many tries on a busy machine
             "pickle_bytes": len(pickle.dumps(VoxelCacheDataset(cache)))}
        r.update(reads(cache, np.random.default_rng(0)))
        mem = worker_memory(cache, args.epochs, args.batches_per_epoch)
        r["worker_private_anon_mib_per_epoch"] = [[round(b / 2**20, 2) for b in e] for e in mem]
        r["worker_growth_mib_after_first_epoch"] = round(max(b - a for a, b in zip(mem[0], mem[-1])) / 2**20, 2)
        results[cache] = r
        print(f"{cache}: {r['origins']:,} origins, {r['shards']} shards, {r['bytes_per_origin']:.0f} B/origin; "
              f"construct {r['construct_ms']:.1f} ms, pickle {r['pickle_bytes']} B; ds[i] {r['item_us']:.1f} us, "
              f"ds[64 ids] {r['batch64_us']:.0f} us; worker private anon MiB per epoch "
              f"{r['worker_private_anon_mib_per_epoch']} (growth after epoch 1: "
              f"{r['worker_growth_mib_after_first_epoch']} MiB)")
    if len(args.caches) == 2:
        a, b = (results[c] for c in args.caches)
        ratios = {k: b[k] / a[k] for k in ("construct_ms", "pickle_bytes", "item_us", "batch64_us", "bytes_per_origin")}
        ratios["worker_private_anon_last_epoch"] = (max(b["worker_private_anon_mib_per_epoch"][-1])
                                                    / max(a["worker_private_anon_mib_per_epoch"][-1]))
        results["ratios_second_vs_first"] = ratios
        print("second / first: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"load average: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
