"""Cold-page-cache reads: which madvise hint should the reader use?

Before each measurement every shard file is evicted from the page cache with
posix_fadvise(DONTNEED) (no root needed; only this cache's pages go). Then batches
of 64 are read from fresh maps with one of the kernel hints
  normal       the kernel's default readahead around each fault (what VoxelCacheDataset uses)
  MADV_RANDOM  no readahead: every 4 KiB page of an image faults on its own
  MADV_SEQUENTIAL aggressive readahead
each with or without an explicit MADV_WILLNEED over every origin of the batch
before copying (asks the kernel to read them all at once), for a shuffled order
and for BlockShuffleSampler's order (blocks of 8), per storage dtype. The
VoxelCacheDataset rows are the real reader (__getitems__), with and without its
``prefetch`` option (MADV_WILLNEED per batch), on the same cold cache.

    python benchmarks/cold_reads.py CACHE [CACHE ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 64
HINTS = {"normal": None, "MADV_RANDOM": mmap.MADV_RANDOM, "MADV_SEQUENTIAL": mmap.MADV_SEQUENTIAL}


def evict(layout) -> None:
    for s in range(layout.n_shards):
        fd = os.open(layout.shard_path(s), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rate(layout, order: np.ndarray, hint, willneed: bool) -> float:
    evict(layout)
    maps, arrays = [], []
    for s in range(layout.n_shards):
        with open(layout.shard_path(s), "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        if hint is not None:
            m.madvise(hint)
        maps.append(m)
        count = layout.origins_in_shard(s) * int(np.prod(layout.image_shape))
        arrays.append(np.frombuffer(m, dtype=layout.dtype, count=count).reshape(-1, *layout.image_shape))
    t = time.perf_counter()
    for b in range(0, len(order), BATCH):
        ids = np.sort(order[b:b + BATCH])
        if willneed:
            for i in ids:
                s, off = layout.locate(int(i))
                start = off - off % mmap.PAGESIZE
                maps[s].madvise(mmap.MADV_WILLNEED, start, off + layout.origin_nbytes - start)
        out = np.empty((len(ids), *layout.image_shape), np.float32)
        for k, i in enumerate(ids):
            s, j = divmod(int(i), layout.origins_per_shard)
            out[k] = arrays[s][j]
    rate = len(order) / (time.perf_counter() - t)
    del arrays
    for m in maps:
        m.close()
    return rate


def dataset_rate(cache: str, layout, order: np.ndarray, prefetch: bool) -> float:
    from cache_tools import VoxelCacheDataset

    evict(layout)
    ds = VoxelCacheDataset(cache, prefetch=prefetch)
    t = time.perf_counter()
    for b in range(0, len(order), BATCH):
        ds.__getitems__(order[b:b + BATCH].tolist())
    return len(order) / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("caches", nargs="+")
    p.add_argument("--json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cache_tools import format as fmt

    results = {}
    for cache in args.caches:
        layout = fmt.VoxelLayout(cache)
        if layout.codec is not None:  # the raw-read rows below read fixed-size origins by offset
            p.error(f"{cache}: compressed ({layout.codec.name}); cold_reads compares raw reads, "
                    "build it with --compression none")
        n = layout.n_origins
        orders = {"shuffled": np.random.default_rng(0).permutation(n),
                  "blocks of 8": np.concatenate([np.arange(b * 8, min(n, b * 8 + 8))
                                                 for b in np.random.default_rng(0).permutation(-(-n // 8))])}
        rows = {}
        for order_name, order in orders.items():
            for prefetch in (False, True):
                rows[f"{order_name}, VoxelCacheDataset(prefetch={prefetch})"] = dataset_rate(
                    cache, layout, order, prefetch)
            for hint_name, hint in HINTS.items():
                for willneed in (False, True):
                    key = f"{order_name}, {hint_name}{' + WILLNEED' if willneed else ''}"
                    rows[key] = read_rate(layout, order, hint, willneed)
        size = sum(layout.shard_path(s).stat().st_size for s in range(layout.n_shards))
        results[cache] = {"dtype": layout.dtype.name, "origins": n, "bytes": size, "images_per_s": rows}
        print(f"\n{cache}: {n} origins, {layout.dtype.name}, {size / 2**20:.0f} MiB, cold page cache, images/s")
        for key, value in rows.items():
            print(f"  {key:<50}{value:>10.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
