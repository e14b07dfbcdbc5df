"""Can one process feed training? Batched reads against per-item reads and the raw limit.

One run, ratios only, warm page cache, batch size 64:
  raw fancy-index   ONE np.memmap fancy index m[ids] over a single file holding the same
                    stored bytes in id order, cast to dequantized float32 (the limit)
  __getitems__      DataLoader(ds, batch_size=B, collate_fn=batch_collate), 0 workers
  batch sampler     DataLoader(ds, batch_size=None, sampler=BatchSampler(...)), 0 workers
  default collate   DataLoader(ds, batch_size=B) (per-sample views re-stacked), 0 workers
  per-item          __getitem__ + default collate (no __getitems__), 0 and 2 workers
  block sampler     __getitems__ with BlockShuffleSampler(block_size=8)
  prefetch          __getitems__ with prefetch=True (MADV_WILLNEED per batch): its warm-cache cost
and the memory of the whole training process with 0 workers, from the profiler.

    python benchmarks/batched_reads.py [--cache CACHE] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

HERE = Path(__file__).resolve().parent
BATCH = 64


class PerItemOnly(torch.utils.data.Dataset):
    """The same dataset with the batched hook hidden: what a plain Dataset would do."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


REPEATS = 5  # best of: a pass over the sample cache takes ~0.1 s, too short to trust once


def rate(loader, epochs: int = 3) -> float:
    for _ in loader:  # warm-up: workers, page tables
        pass
    best = 0.0
    for _ in range(REPEATS):
        n, t = 0, time.perf_counter()
        for _ in range(epochs):
            for batch in loader:
                n += len(batch["image"])
        best = max(best, n / (time.perf_counter() - t))
    return best


def raw_rate(cache: str, n_items: int, epochs: int = 3) -> float:
    """``m[ids]`` on one np.memmap of the same bytes (no per-shard loop), dequantized to float32."""
    from cache_tools import format as fmt
    from compressed_reads import single_file

    scale = np.float32(fmt.read_attrs(cache).scale)
    tmp = tempfile.TemporaryDirectory(prefix="batched-raw-")
    m = single_file(cache, tmp.name)

    def one_pass(epoch: int) -> None:
        perm = np.random.default_rng(epoch).permutation(n_items)
        for b in range(0, n_items, BATCH):
            out = m[perm[b:b + BATCH]].astype(np.float32)
            if scale != 1:
                out *= scale
            torch.from_numpy(out)

    one_pass(0)  # warm-up
    best = 0.0
    for _ in range(REPEATS):
        t = time.perf_counter()
        for epoch in range(1, epochs + 1):
            one_pass(epoch)
        best = max(best, epochs * n_items / (time.perf_counter() - t))
    tmp.cleanup()
    return best


PROFILED_LOOP = """
import sys, time
from torch.utils.data import DataLoader
from cache_tools import VoxelCacheDataset, batch_collate
ds = VoxelCacheDataset(sys.argv[1])
loader = DataLoader(ds, batch_size=64, shuffle=True, collate_fn=batch_collate)
n, t = 0, time.perf_counter()
for epoch in range(int(sys.argv[2])):
    for batch in loader:
        n += len(batch["image"])
print(n / (time.perf_counter() - t))
"""


def profiled_memory(cache: str, epochs: int, out_dir: str) -> dict:
    """Run a 0-worker training loop under the profiler; return its memory summary."""
    proc = subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "profile-memory", "--interval", "0.1",
                           "--out", out_dir, "--", sys.executable, "-c", PROFILED_LOOP, cache, str(epochs)],
                          capture_output=True, text=True, check=True)
    summary = json.loads(Path(out_dir, "summary.json").read_text())
    return {"images_per_s": float(proc.stdout.strip().splitlines()[-1]), "summary": summary}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="existing cache (default: build the bundled samples)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from cache_tools import BlockShuffleSampler, VoxelCacheDataset, batch_collate

    tmp = tempfile.TemporaryDirectory(prefix="batched-")
    cache = args.cache
    if cache is None:
        from pipeline.build import BuildParams, build_cache
        from pipeline.origins import OriginRule
        from pipeline.parse import parse_channels
        from pipeline.voxelize import ImageSpec, Storage
        cache = f"{tmp.name}/bench.zarr"
        build_cache([str(HERE.parent / "tests" / "data" / "mmcif")], cache,
                    BuildParams(parse_channels("C,N,O,*"), ImageSpec(), Storage(), OriginRule()), progress=False)
    ds = VoxelCacheDataset(cache)
    r = {"n_origins": len(ds), "image_shape": list(ds.layout.image_shape), "dtype": ds.layout.dtype.name,
         "batch_size": BATCH}
    r["raw_fancy_index"] = raw_rate(cache, len(ds))
    r["getitems_batch_collate_0w"] = rate(DataLoader(ds, batch_size=BATCH, shuffle=True, collate_fn=batch_collate))
    r["batch_sampler_0w"] = rate(DataLoader(ds, batch_size=None,
                                            sampler=BatchSampler(RandomSampler(ds), BATCH, drop_last=False)))
    r["getitems_default_collate_0w"] = rate(DataLoader(ds, batch_size=BATCH, shuffle=True))
    r["per_item_0w"] = rate(DataLoader(PerItemOnly(ds), batch_size=BATCH, shuffle=True))
    r["per_item_2w"] = rate(DataLoader(PerItemOnly(ds), batch_size=BATCH, shuffle=True, num_workers=2,
                                       persistent_workers=True))
    r["getitems_block_sampler_0w"] = rate(DataLoader(ds, batch_size=BATCH, collate_fn=batch_collate,
                                                     sampler=BlockShuffleSampler(ds, block_size=8)))
    r["getitems_prefetch_0w"] = rate(DataLoader(VoxelCacheDataset(cache, prefetch=True), batch_size=BATCH,
                                                shuffle=True, collate_fn=batch_collate))
    r["ratio_getitems_vs_raw"] = r["getitems_batch_collate_0w"] / r["raw_fancy_index"]
    r["profiled_0_workers"] = profiled_memory(cache, 5, f"{tmp.name}/profile")
    tmp.cleanup()

    mb = 2**20
    print(f"{r['n_origins']} origins of {r['image_shape']} {r['dtype']}, batch {BATCH}, warm page cache, images/s:")
    rows = [("raw memmap fancy-index copy (limit)", "raw_fancy_index"),
            ("__getitems__ + batch_collate, 0 workers", "getitems_batch_collate_0w"),
            ("__getitem__(list) + BatchSampler, 0 workers", "batch_sampler_0w"),
            ("__getitems__ + default collate, 0 workers", "getitems_default_collate_0w"),
            ("per-item __getitem__, 0 workers", "per_item_0w"),
            ("per-item __getitem__, 2 workers", "per_item_2w"),
            ("__getitems__ + BlockShuffleSampler(8), 0 workers", "getitems_block_sampler_0w"),
            ("__getitems__, prefetch=True (warm: its cost), 0 workers", "getitems_prefetch_0w")]
    for name, key in rows:
        print(f"  {name:<50}{r[key]:>10.0f}   {r[key] / r['raw_fancy_index']:.2f}x limit")
    s = r["profiled_0_workers"]["summary"]
    print(f"goal: __getitems__ >= 0.8x limit: {r['ratio_getitems_vs_raw']:.2f}; >= 10,000 images/s on one core: "
          f"{r['getitems_batch_collate_0w']:.0f}")
    print(f"0-worker training process under the profiler: {r['profiled_0_workers']['images_per_s']:.0f} images/s, "
          f"Σ PSS peak {s['peak_pss'] / mb:.0f} MiB (anon {s['peak_pss_anon'] / mb:.0f} MiB, "
          f"file {s['peak_pss_file'] / mb:.0f} MiB), 1 process")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
