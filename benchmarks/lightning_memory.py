#!/usr/bin/env python3
"""The memory proof inside a real Lightning fit: cache loaders vs the seed loader vs the floor.

Runs ``workflows/train_lightning.py`` three times under ``cache-tools profile-memory``, the
same Trainer, model, batch size, epochs and workers per loader (train and val loaders
alive together, persistent, as Lightning keeps them), changing only the loader:

- ``constant``: Datasets that return one constant tensor -- the floor of a Lightning
  process tree with that many forked workers;
- ``cache``: ``VoxelCacheDataModule`` (memory-mapped cache, batched reads);
- ``seed``: the seed-style loader (pandas origins in the main process, gemmi parse and
  macromol_voxelize per item, a per-worker structure cache; benchmarks/seed_loaders.py).

Reports peak Σ Pss_Anon (private heap and copy-on-write copies over the whole tree: what
no reclaim undoes), peak Σ PSS, and the largest worker's private anonymous memory, each
against the floor; writes results/lightning_memory.{json,md,png}.

    python benchmarks/lightning_memory.py --cache sample.zarr --workers 4 --epochs 3
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOADERS = ("constant", "cache", "seed")
MIB = 2 ** 20


def run(loader: str, args: argparse.Namespace, out: Path) -> dict:
    prof_dir = out / loader
    cmd = [sys.executable, "-m", "cache_tools.commands.cli", "profile-memory", "--out", str(prof_dir),
           "--interval", str(args.interval), "--",
           sys.executable, str(REPO / "workflows" / "train_lightning.py"), "--cache", args.cache,
           "--loader", loader, "--workers", str(args.workers), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--limit-batches", str(args.limit_batches)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"{loader}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    summary = json.loads((prof_dir / "summary.json").read_text())
    workers = [p for p in summary["processes"] if p["role"] == "worker"]
    return {"loader": loader, "elapsed_s": round(time.time() - t0, 1),
            "peak_pss_anon_mib": summary["peak_pss_anon"] / MIB, "peak_pss_mib": summary["peak_pss"] / MIB,
            "peak_rss_mib": summary["peak_rss"] / MIB, "workers": len(workers),
            "max_worker_uss_anon_mib": max((p["peak_uss_anon"] for p in workers), default=0) / MIB,
            "series": series(prof_dir / "memory.csv")}


def series(csv_path: Path) -> list[list[float]]:
    """[t, Σ pss_anon MiB] per sample."""
    sums: dict[float, int] = defaultdict(int)
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        t_col, col = 0, next(i for i, h in enumerate(header) if h.startswith("pss_anon"))
        for row in reader:
            sums[float(row[t_col])] += int(row[col])
    return [[t, sums[t] / MIB] for t in sorted(sums)]


def plot(runs: list[dict], png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        t, y = zip(*r["series"]) if r["series"] else ((), ())
        ax.plot(t, y, label=f"{r['loader']} (peak {r['peak_pss_anon_mib']:.0f} MiB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("Σ Pss_Anon of the process tree (MiB)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--workers", type=int, default=4, help="per loader (train and val)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit-batches", type=float, default=20, help="batches per epoch (train and val)")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work", default="lightning-memory-runs", help="profiles of the three runs")
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run(loader, args, work) for loader in LOADERS]
    floor = runs[0]
    lines = [f"Lightning fit, {args.epochs} epochs x {args.limit_batches:g} batches of {args.batch_size}, "
             f"{args.workers} train + {args.workers} val persistent workers; load {os.getloadavg()[0]:.1f}", "",
             "| loader | peak Σ Pss_Anon | vs floor | peak Σ PSS | vs floor | largest worker private anon | time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['loader']} | {r['peak_pss_anon_mib']:.0f} MiB | "
                     f"{r['peak_pss_anon_mib'] / floor['peak_pss_anon_mib']:.2f}x | {r['peak_pss_mib']:.0f} MiB | "
                     f"{r['peak_pss_mib'] / floor['peak_pss_mib']:.2f}x | {r['max_worker_uss_anon_mib']:.1f} MiB | "
                     f"{r['elapsed_s']:.0f} s |")
    cache = runs[1]
    excess = cache["peak_pss_anon_mib"] / floor["peak_pss_anon_mib"] - 1
    lines += ["", f"- {'met' if excess <= 0.10 else 'MISSED'}: cache loaders add <= 10% Σ Pss_Anon over the "
                  f"floor -- +{100 * excess:.1f}% (+{cache['peak_pss_anon_mib'] - floor['peak_pss_anon_mib']:.0f} MiB); "
                  f"seed: +{100 * (runs[2]['peak_pss_anon_mib'] / floor['peak_pss_anon_mib'] - 1):.0f}%"]
    text = "\n".join(lines)
    print(text)
    (out / "lightning_memory.md").write_text(text + "\n")
    (out / "lightning_memory.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    plot(runs, out / "lightning_memory.png", lines[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
