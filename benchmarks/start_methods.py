"""What a DataLoader worker costs under each start method: fork, spawn, forkserver.

    python benchmarks/start_methods.py --cache sample.zarr            # the README's sample cache
    python benchmarks/start_methods.py --cache sample.zarr --rows 1000000 --workers 4

For every (start method, loader), a fresh child process makes one DataLoader of
``--workers`` persistent workers, reads ``--batches`` batches, and then, with the workers
alive and idle, takes a snapshot of every process of its tree with the project's profiler
(``cache_tools.profiler.phases.take_snapshot``: /proc/<pid>/smaps_rollup). Loaders:

  bare    a Dataset returning one constant tensor, defined in this script: the floor of a
          worker under that start method (torch, and nothing of this project)
  cache   cache_tools.VoxelCacheDataset over --cache (imports numpy and torch only)
  seed    benchmarks/seed_loaders.SeedInitialDataset, metadata only (no voxelizing):
          --rows origins in a pandas DataFrame, as the loaders users have today keep them,
          and the imports such a loader needs to voxelize on the fly (pandas, polars,
          gemmi, macromol_voxelize)
  seed-1k the same with 1,000 rows: its imports alone

Start methods: fork (Linux's default), spawn (a fresh interpreter per worker: the
Dataset is pickled to it; what macromol_gym's DataModules use), forkserver (workers forked
from a clean server process), and forkserver-preload (the server imports
cache_tools.read.dataset first, so workers share torch's pages copy-on-write).

Per worker, MiB: private anonymous (heap and copy-on-write copies: what one more worker
really adds; ``uss_anon``), USS, Pss_Anon; and Σ Pss_Anon of the whole tree.
Writes ``--out``/start_methods.json and .md. The script's own module imports only the
standard library at top level, because spawn and forkserver workers import it again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1 << 20
METHODS = ("fork", "spawn", "forkserver", "forkserver-preload")
LOADERS = ("bare", "cache", "seed-1k", "seed")


class BareDataset:
    """One preallocated tensor for every index (torch is imported where it is unpickled)."""

    def __init__(self, length: int, shape: tuple[int, ...]) -> None:
        import torch

        self.length, self.image = length, torch.zeros(shape, dtype=torch.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {"image": self.image, "origin_id": int(index)}


def child(config: dict) -> dict:
    """One loader under one start method; returns the snapshot in MiB."""
    import multiprocessing

    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from cache_tools import format as fmt
    from cache_tools.profiler.phases import take_snapshot, worker_pids

    torch.set_num_threads(1)
    cache, loader, method = config["cache"], config["loader"], config["method"]
    collate = None
    if loader == "cache":
        from cache_tools import VoxelCacheDataset, batch_collate
        dataset, collate = VoxelCacheDataset(cache), batch_collate
    elif loader.startswith("seed"):
        from seed_loaders import SeedInitialDataset
        dataset = SeedInitialDataset(cache, rows=1000 if loader == "seed-1k" else config["rows"], voxelize=False)
    else:
        layout = fmt.VoxelLayout(cache)
        dataset = BareDataset(layout.n_origins, tuple(layout.image_shape))
    context = multiprocessing.get_context(method.split("-")[0])
    if method == "forkserver-preload":
        context.set_forkserver_preload(["cache_tools.read.dataset"])
    sampler = RandomSampler(dataset, num_samples=config["batches"] * config["batch_size"],
                            generator=torch.Generator().manual_seed(0))
    dl = DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler, num_workers=config["workers"],
                    persistent_workers=True, multiprocessing_context=context, collate_fn=collate)
    t0 = time.monotonic()
    iterator = iter(dl)
    images = len(next(iterator)["image"])
    started = time.monotonic() - t0  # workers started (and the Dataset unpickled) up to the first batch
    images += sum(len(batch["image"]) for batch in iterator)
    pids = worker_pids(iterator)
    time.sleep(0.5)  # let the workers settle (prefetched batches handed over)
    snap = take_snapshot("end", {pid: "worker" for pid in pids})
    workers = [snap["procs"][pid] for pid in pids if pid in snap["procs"]]
    main = next(p for p in snap["procs"].values() if p["role"] == "main")
    mib = lambda v: round(v / MIB, 1)  # noqa: E731
    return {"method": method, "loader": loader, "workers": len(workers), "images": images,
            "start_s": round(started, 2),
            "worker_private_anon": [mib(w["private_anon"]) for w in workers],
            "worker_uss": [mib(w["uss"]) for w in workers],
            "worker_pss_anon": [mib(w["pss_anon"]) for w in workers],
            "main_pss_anon": mib(main["pss_anon"]),
            "tree_pss_anon": mib(snap["sums"]["pss_anon"]),
            "other_processes": sum(1 for p in snap["procs"].values() if p["role"] == "other")}


def run(config: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{config}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 1) if values else float("nan")


def table(records: list[dict], rows: int) -> str:
    lines = ["| start method | loader | per worker: private anon | USS | Pss_Anon | Σ Pss_Anon of the tree | "
             "first batch after |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        name = {"seed": f"seed ({rows:,} rows)", "seed-1k": "seed (1,000 rows)"}.get(r["loader"], r["loader"])
        lines.append(f"| {r['method']} | {name} | {mean(r['worker_private_anon'])} | {mean(r['worker_uss'])} | "
                     f"{mean(r['worker_pss_anon'])} | {r['tree_pss_anon']} | {r['start_s']} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cache", help="a voxel cache (e.g. the README's sample.zarr)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--loaders", default=",".join(LOADERS))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batches", type=int, default=16, help="batches read before the snapshot")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=1_000_000, help="metadata rows of the seed loader")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not args.cache:
        p.error("--cache is required")
    records = []
    for method in args.methods.split(","):
        for loader in args.loaders.split(","):
            config = {"cache": str(Path(args.cache).absolute()), "loader": loader, "method": method,
                      "workers": args.workers, "batches": args.batches, "batch_size": args.batch_size,
                      "rows": args.rows}
            record = run(config)
            print(f"{method:>18} {loader:>5}: worker private anon {mean(record['worker_private_anon'])} MiB, "
                  f"USS {mean(record['worker_uss'])} MiB; tree Σ Pss_Anon {record['tree_pss_anon']} MiB",
                  flush=True)
            records.append(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "workers": args.workers,
            "batches": args.batches, "batch_size": args.batch_size, "rows": args.rows, "cache": args.cache}
    (out / "start_methods.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    text = (f"{args.workers} persistent workers, {args.batches} batches of {args.batch_size} read, then one "
            f"snapshot (MiB; mean over the workers). Load average {meta['load_average']:.1f} on "
            f"{meta['cpus']} cores.\n\n" + table(records, args.rows) + "\n")
    (out / "start_methods.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
