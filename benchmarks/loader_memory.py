"""Loader memory, side by side: the seed loaders against the voxel cache, per metadata size.

Three loaders read the same origins, each in its own subprocess (so their memory never
mixes), sampled by ``cache_tools.MemoryProfiler`` every ``--interval`` s:

  seed-initial  origins in a pandas DataFrame, gemmi parse + macromol_voxelize per sample
  seed-sqlite   origins in SQLite (connection opened per worker), same parse + voxelize
  cache         VoxelCacheDataset over a voxel cache of exactly those origins

plus ``bare``: forked workers of a Dataset that returns one constant tensor -- the floor a
forked torch worker costs, to compare worker USS against.

Every run has a train and a val DataLoader of ``--workers`` forked, persistent workers,
both alive together as Lightning keeps them, and ``--epochs`` epochs with validation
after each. The seeds need ~20-150 ms of CPU per sample, so each epoch is bounded
(``--steps-per-epoch`` train batches of a fresh random subset, ``--val-steps`` batches
of a fixed one) rather than a full pass: what is measured is memory against the size
of the metadata, ``--sizes`` (origins = rows of the seeds' table = origins in the cache).

Inputs are built once into ``--work-dir``: the 13 sample mmCIFs copied under distinct
names until there are enough heavy atoms, an origins file with ``size`` of those atoms
(seeded), a cache per size (``pipeline.build.build_cache``; ``--grid``, ``--dtype``) and
an SQLite file per size. Each child reports a snapshot of /proc/<pid>/smaps_rollup of
every process of its tree at each epoch/validation start and end; the profiler gives
the peaks and the time series.

    python benchmarks/loader_memory.py                                   # the default run
    python benchmarks/loader_memory.py --sizes 100000 --memory-cap 600M  # needs root (cgroups)
    python benchmarks/loader_memory.py --metadata-only --sizes 100000,1000000 --grid 4  # full epochs

Outputs in ``--out`` (default benchmarks/results): loader_memory[_cap].md (the tables),
.json (all numbers) and .png (the comparison plot).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLES = REPO / "tests" / "data" / "mmcif"
MIB = 1 << 20
LOADERS = ("seed-initial", "seed-sqlite", "cache")
SUM_KEYS = ("pss_anon", "pss_file", "pss_shmem", "rss", "pss")

if str(REPO) not in sys.path:          # run from a checkout, too
    sys.path.insert(0, str(REPO))


# ============================================================================================
# measuring one process tree: the harness lives in the profiler package (tests use it too)
# ============================================================================================
from cache_tools.profiler.phases import (ConstantDataset, make_loaders, run_phases,  # noqa: E402,F401
                                         take_snapshot, worker_pids)
from cache_tools.profiler.proc import process_memory  # noqa: E402,F401
from cache_tools.profiler.goals import BARE, evaluate_goals, fmt_number, goals_text, mean_or_none, size_label  # noqa: E402


# ============================================================================================
# the child: one loader, one size
# ============================================================================================

def make_dataset(loader: str, cache: str, sqlite_path: str | None, voxelize: bool = True,
                 prefetch: bool | None = None) -> Any:
    """The Dataset of ``loader`` over the origins of ``cache`` (built in this process).

    ``voxelize=False`` (``--metadata-only``): the seeds look up each item's metadata as
    usual but return a blank image instead of parsing and voxelizing, so full epochs over
    a million rows fit in minutes and only the metadata's copy-on-read is measured.
    """
    if loader == "cache":
        from cache_tools import VoxelCacheDataset
        return VoxelCacheDataset(cache, prefetch=prefetch)
    if loader == "seed-initial":
        from seed_loaders import SeedInitialDataset
        return SeedInitialDataset(cache, voxelize=voxelize)
    if loader == "seed-sqlite":
        from seed_loaders import SeedSqliteDataset
        return SeedSqliteDataset(cache, sqlite_path, voxelize=voxelize)
    if loader == BARE:
        from cache_tools import format as fmt
        layout = fmt.VoxelLayout(cache)
        return ConstantDataset(layout.n_origins, tuple(layout.image_shape))
    raise ValueError(f"unknown loader {loader!r}")



def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def child_main(config: dict) -> int:
    """Entry point of the subprocess that runs one loader (``--child CONFIG_JSON``)."""
    import torch

    torch.set_num_threads(1)           # the cores are the loader workers'
    t0 = time.monotonic()
    dataset = make_dataset(config["loader"], config["cache"], config.get("sqlite"),
                           voxelize=not config.get("metadata_only"),
                           prefetch={"auto": None, "on": True, "off": False}[config.get("prefetch", "auto")])
    train, val = make_loaders(dataset, config["loader"], config["workers"], config["batch_size"],
                              None if config["full_epochs"] else config["steps_per_epoch"],
                              config["val_steps"], config.get("seed", 0))
    _emit({"event": "ready", "len": len(dataset), "setup_s": time.monotonic() - t0})
    log = run_phases(train, val, config["epochs"], emit=_emit)
    _emit({"event": "done", "phases": log["phases"], "train_pids": log["train_pids"],
           "val_pids": log["val_pids"]})
    return 0


# ============================================================================================
# inputs: structures, origins, caches, SQLite files
# ============================================================================================
def evict_page_cache(paths: Iterable[Path]) -> None:
    """Drop these files' pages from the page cache (posix_fadvise DONTNEED; no root needed).

    Every run starts cold; under a cap it also matters for accounting: pages already
    cached were charged to whoever read them first, not to the capped run.
    """
    for path in paths:
        for f in ([path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prepare_inputs(work: Path, sizes: list[int], grid: int, dtype: str, log: Callable[[str], None] = print
                   ) -> dict[int, dict[str, Any]]:
    """Structures, an origins file, a cache and an SQLite file per size, in ``work``.

    Origins are heavy atoms (one origin per atom, like ``OriginRule(min_neighbors=0,
    min_spacing_A=0, max_per_structure=0)``), drawn without replacement and seeded from
    all the atoms of the sample files copied under distinct names as many times as the
    largest size needs -- the same set of structure files for every size, so only the
    metadata size changes. Existing complete caches are reused.
    """
    from pipeline.build import BuildParams, build_cache
    from pipeline.origins import OriginRule
    from pipeline.parse import parse_atoms, parse_channels, structure_key
    from pipeline.voxelize import ImageSpec, Storage
    from seed_loaders import write_sqlite

    channels = parse_channels("C,N,O,*")
    sources = sorted(p for p in SAMPLES.iterdir() if p.is_file())
    atoms = {src: parse_atoms(src, channels).xyz for src in sources}
    total = sum(len(x) for x in atoms.values())
    copies = max(1, math.ceil(max(sizes) / total))
    structures = work / "structures"
    structures.mkdir(parents=True, exist_ok=True)
    candidates: list[tuple[str, np.ndarray]] = []
    for k in range(copies):
        for src in sources:
            key = structure_key(src)
            name = f"{key}_copy{k}" + src.name[len(key):]
            dst = structures / name
            if not dst.exists():
                shutil.copyfile(src, dst)
            candidates.append((structure_key(dst), atoms[src]))
    ids = np.concatenate([np.full(len(x), i) for i, (_, x) in enumerate(candidates)])
    xyz = np.concatenate([x for _, x in candidates])
    inputs: dict[int, dict[str, Any]] = {}
    params_for = lambda origins_file: BuildParams(  # noqa: E731
        channels=channels, image=ImageSpec(grid, 1.0, len(channels), 0.5), storage=Storage(dtype),
        rule=OriginRule(min_neighbors=0, min_spacing_A=0, max_per_structure=0), origins_file=str(origins_file))
    for size in sizes:
        if size > len(xyz):
            raise SystemExit(f"size {size} > {len(xyz)} candidate atoms")
        origins_file = work / f"origins-{size}.csv"
        if not origins_file.exists():
            pick = np.sort(np.random.default_rng(size).choice(len(xyz), size, replace=False))
            tmp = origins_file.with_suffix(".tmp")
            with open(tmp, "w") as fh:
                for i in pick:
                    fh.write(f"{candidates[ids[i]][0]},{xyz[i, 0]:.3f},{xyz[i, 1]:.3f},{xyz[i, 2]:.3f}\n")
            os.replace(tmp, origins_file)
        cache = work / f"cache-{size}-g{grid}-{dtype}.zarr"
        t = time.monotonic()
        summary = build_cache([str(structures)], cache, params_for(origins_file), workers=os.cpu_count(),
                              overwrite=True, progress=False, log=lambda *a, **k: None)  # reused if current
        if summary.origins != size:
            raise SystemExit(f"{cache}: {summary.origins} origins, expected {size} ({summary.failures})")
        built_s = None if summary.already_complete else time.monotonic() - t
        db = work / f"origins-{size}.sqlite"
        if not db.exists():
            write_sqlite(cache, db)
        log(f"inputs for {size} origins: {cache.name} ({summary.bytes_on_disk / MIB:.0f} MiB"
            + (f", built in {built_s:.0f} s" if built_s else ", reused") + f"), {db.name}")
        inputs[size] = {"cache": str(cache), "sqlite": str(db), "cache_bytes": summary.bytes_on_disk,
                        "build_s": built_s, "structures": len(candidates), "structure_dir": str(structures)}
    return inputs


# ============================================================================================
# the parent: run a child under the profiler (and a cap), collect
# ============================================================================================
def run_child(loader: str, size: int, inputs: dict[str, Any], config: dict, run_dir: Path,
              interval: float, cap_bytes: int | None, time_limit: float) -> dict[str, Any]:
    """Run one loader in a subprocess under MemoryProfiler (and a cgroup cap); return its record."""
    from cache_tools.profiler.cgroup import MemoryCap
    from cache_tools.profiler import MemoryProfiler, ProfilerUnavailable

    run_dir.mkdir(parents=True, exist_ok=True)
    child_config = {**config, "loader": loader, "cache": inputs["cache"], "sqlite": inputs["sqlite"]}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(child_config)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    evict_page_cache([Path(inputs["cache"]), Path(inputs["sqlite"]), Path(inputs["structure_dir"])])

    state: dict[str, Any] = {"snapshots": [], "last_progress": time.monotonic(), "images": 0,
                             "done": None, "ready": None}
    cap = MemoryCap(cap_bytes).create() if cap_bytes else None
    stderr_path = run_dir / "stderr.txt"
    proc: subprocess.Popen | None = None
    prof = summary = cap_report = None
    stalled = False
    t_start = time.monotonic()
    try:
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO,
                                    start_new_session=True, preexec_fn=cap.join if cap else None)
        try:
            prof = MemoryProfiler(run_dir, interval=interval, pid=proc.pid, memory_cap=cap_bytes,
                                  print_summary=False).start()
        except ProfilerUnavailable:
            prof = None          # exited before the first sample; the status says why

        def read_events() -> None:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                kind = event.pop("event", None)
                if kind == "mark":
                    if prof is not None:
                        prof.mark(event["label"])
                elif kind == "progress":
                    state["images"] = event["images"]
                    state["last_progress"] = time.monotonic()
                elif kind == "snapshot":
                    state["snapshots"].append(event)
                    state["last_progress"] = time.monotonic()
                elif kind in ("ready", "done"):
                    state[kind] = event
                    state["last_progress"] = time.monotonic()
                    if kind == "done" and prof is not None:
                        prof.mark("done")

        reader = threading.Thread(target=read_events, daemon=True)
        reader.start()
        while proc.poll() is None:
            time.sleep(0.2)
            if time.monotonic() - state["last_progress"] > time_limit:
                stalled = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)     # the child's own process group
                except ProcessLookupError:
                    pass
                proc.wait()
        reader.join(timeout=10)
        returncode = proc.returncode
        elapsed = time.monotonic() - t_start
        summary = prof.stop() if prof is not None else None
        if cap is not None:
            cap_report = cap.report()
    finally:
        if cap is not None:
            leftovers = cap.remove()                        # kills what is left in the cgroup
            if cap_report is not None:
                cap_report["leftover_processes_killed"] = leftovers
        elif proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)         # workers left behind by a crash
            except (ProcessLookupError, PermissionError):
                pass

    stderr_tail = [ln for ln in stderr_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
    oom = (cap_report or {}).get("oom_kills") or 0
    if stalled:
        status = f"no progress in {time_limit:.0f} s"
    elif returncode == 0 and state["done"] is not None:
        status = "completed" + (f" ({oom} OOM kills)" if oom else "")
    elif oom:
        status = "OOM-killed (main)" if returncode in (-9, 137) else "OOM-killed (a worker)"
    else:
        status = f"failed (exit {returncode})"
    return assemble(loader, size, status, returncode, elapsed, state, summary, cap_report, run_dir,
                    stderr_tail, inputs, config)


def _mib(n: float) -> float:
    return round(n / MIB, 2)


WORKER_KEYS = ("uss", "private_anon", "pss_anon", "pss_shmem")


def compact_snapshot(s: dict, t0: float) -> dict[str, Any]:
    """A snapshot in MiB: Σ over the tree, the main process, and per-worker lists by pid order."""
    procs = sorted(((int(pid), p) for pid, p in s["procs"].items()), key=lambda kv: kv[0])
    out: dict[str, Any] = {"label": s["label"], "t_s": round(s["t"] - t0, 3),
                           "sums": {k: _mib(v) for k, v in s["sums"].items()}}
    main = [p for _, p in procs if p["role"] == "main"]
    if main:
        out["main"] = {k: _mib(main[0][k]) for k in ("uss", "private_anon", "pss_anon", "pss_file")}
    for phase in ("train", "val"):
        ws = [(pid, p) for pid, p in procs if p["role"] == f"{phase}-worker"]
        if ws:
            out[phase] = {"pids": [pid for pid, _ in ws], **{k: [_mib(p[k]) for _, p in ws] for k in WORKER_KEYS}}
    return out


def _series(run_dir: Path, pids: dict[str, set[int]], max_points: int = 600) -> dict[str, list]:
    """Per-sample Σ over the tree and mean USS of train / val workers, from the profiler's memory.csv."""
    rows: dict[float, list[dict]] = {}
    path = run_dir / "memory.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(float(r["t_s"]), []).append(r)
    out: dict[str, list] = {k: [] for k in ("t_s", "pss_anon", "pss_file", "rss", "train_worker_uss",
                                            "val_worker_uss")}
    times = sorted(rows)
    step = max(1, math.ceil(len(times) / max_points))
    for t in times[::step]:
        rs = rows[t]
        out["t_s"].append(t)
        for k in ("pss_anon", "pss_file", "rss"):
            out[k].append(_mib(sum(int(r.get(f"{k}_bytes", r.get(k))) for r in rs)))
        for phase in ("train", "val"):
            uss = [int(r.get("uss_bytes", r.get("uss"))) for r in rs if int(r["pid"]) in pids.get(phase, ())]
            out[f"{phase}_worker_uss"].append(_mib(sum(uss) / len(uss)) if uss else None)
    return out


def _marks(run_dir: Path) -> list[list]:
    path = run_dir / "marks.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [[float(t), label] for t, label in list(csv.reader(f))[1:] if not label.startswith(("start:", "end:"))]


def assemble(loader: str, size: int, status: str, returncode: int | None, elapsed: float, state: dict,
             summary: dict | None, cap_report: dict | None, run_dir: Path, stderr_tail: list[str],
             inputs: dict, config: dict) -> dict[str, Any]:
    """One run's record: snapshots (per worker, Σ), rates, peaks, cap outcome, time series."""
    raw = state["snapshots"]
    t0 = raw[0]["t"] if raw else 0.0
    snapshots = [compact_snapshot(s, t0) for s in raw]
    by_label = {s["label"]: s for s in snapshots}
    phases = (state["done"] or {}).get("phases", [])
    steady = [p for p in phases if p["epoch"] > 1]

    def rate(ps: list[dict]) -> float | None:
        seconds = sum(p["seconds"] for p in ps)
        return sum(p["images"] for p in ps) / seconds if ps and seconds > 0 else None

    before, after = by_label.get("epoch 1 end"), by_label.get("validation 1 end")
    record: dict[str, Any] = {
        "loader": loader, "origins": size, "status": status, "returncode": returncode,
        "elapsed_s": round(elapsed, 1), "images": state["images"], "epochs_run": config["epochs"],
        "images_per_s": rate(phases), "images_per_s_after_epoch_1": rate(steady),
        "setup_s": (state["ready"] or {}).get("setup_s"), "phases": phases,
        "sum_pss_anon_step_at_validation_mib": (round(after["sums"]["pss_anon"] - before["sums"]["pss_anon"], 2)
                                                if before and after else None),
        "cache_bytes": inputs["cache_bytes"], "bytes_per_image_read": None,
        "stderr_tail": stderr_tail if not status.startswith("completed") else [],
        "run_dir": str(run_dir),
    }
    # Peaks: the profiler's samples and the child's own snapshots, whichever saw more.
    peak = {k: max([s["sums"][k] for s in snapshots] or [0.0]) for k in SUM_KEYS}
    if summary is not None:
        for k in SUM_KEYS:
            peak[k] = max(peak[k], _mib(summary[f"peak_{k}"]))
        record["profiler_samples"] = summary["samples"]
    record["peak"] = peak
    if snapshots:
        record["final"] = snapshots[-1]["sums"]
    if cap_report is not None:
        record["cgroup"] = {**cap_report, "peak_mib": _mib(cap_report["peak"]) if cap_report.get("peak") else None}
    record["snapshots"] = snapshots
    pids = {phase: {pid for snap in snapshots for pid in snap.get(phase, {}).get("pids", [])}
            for phase in ("train", "val")}
    record["series"] = _series(run_dir, pids)
    record["marks"] = _marks(run_dir)
    return record


# ============================================================================================
# report: tables, goals, plot
# ============================================================================================
def worker_trace(run: dict, phase: str, key: str) -> str:
    """'start→end' of each epoch (or validation) of the mean over workers: '5.1→7.9, 7.9→8.0, ...'."""
    snaps = {s["label"]: s for s in run["snapshots"]}
    name = "epoch" if phase == "train" else "validation"
    parts = []
    for e in range(1, run["epochs_run"] + 1):
        a, b = (snaps.get(f"{name} {e} {when}", {}).get(phase, {}).get(key) for when in ("start", "end"))
        if a is None and b is None:
            break
        parts.append(f"{fmt_number(mean_or_none(a))}→{fmt_number(mean_or_none(b))}")
    return ", ".join(parts) or "—"


def tables(runs: list[dict], capped: bool) -> str:
    """The Markdown tables of a run (also printed)."""
    lines = ["Per worker, MiB, mean over the workers of each loader: start→end of epochs 1, 2, 3 "
             "(train workers) and of validations 1, 2, 3 (val workers).\n",
             "| loader | origins | train-worker USS | train-worker private anon | val-worker USS "
             "| val-worker private anon |",
             "|---|---:|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['loader']} | {size_label(r['origins']) if r['loader'] != BARE else '—'} "
                     f"| {worker_trace(r, 'train', 'uss')} | {worker_trace(r, 'train', 'private_anon')} "
                     f"| {worker_trace(r, 'val', 'uss')} | {worker_trace(r, 'val', 'private_anon')} |")
    lines += ["", "Whole process tree (main + all workers), MiB. Peaks: the larger of the profiler's samples "
              "and the epoch/validation snapshots; step: Σ Pss_Anon after the first validation minus "
              "just before it.\n"]
    if capped:
        lines += ["| loader | origins | cache on disk | outcome | images done | images/s | cgroup peak "
                  "| OOM kills | Σ Pss_Anon peak | Σ Pss_File peak | Σ RSS peak |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| loader | origins | status | images/s | Σ Pss_Anon peak | Σ Pss_Anon at end "
                  "| Σ Pss_Anon step at 1st validation | Σ Pss_File peak | Σ RSS peak | Σ PSS peak |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        peak = r.get("peak", {})
        size = size_label(r["origins"]) if r["loader"] != BARE else "—"
        if capped:
            cg = r.get("cgroup") or {}
            lines.append(f"| {r['loader']} | {size} | {fmt_number(r['cache_bytes'] / MIB, 0)} | {r['status']} "
                         f"| {r['images']:,} | {fmt_number(r['images_per_s'])} | {fmt_number(cg.get('peak_mib'), 0)} "
                         f"| {cg.get('oom_kills', '—')} | {fmt_number(peak.get('pss_anon'), 0)} "
                         f"| {fmt_number(peak.get('pss_file'), 0)} | {fmt_number(peak.get('rss'), 0)} |")
        else:
            lines.append(f"| {r['loader']} | {size} | {r['status']} | {fmt_number(r['images_per_s_after_epoch_1'])} "
                         f"| {fmt_number(peak.get('pss_anon'), 0)} | {fmt_number((r.get('final') or {}).get('pss_anon'), 0)} "
                         f"| {fmt_number(r['sum_pss_anon_step_at_validation_mib'], 0)} "
                         f"| {fmt_number(peak.get('pss_file'), 0)} | {fmt_number(peak.get('rss'), 0)} "
                         f"| {fmt_number(peak.get('pss'), 0)} |")
    return "\n".join(lines)


COLORS = {"seed-initial": "#d62728", "seed-sqlite": "#ff7f0e", "cache": "#1f77b4", BARE: "#7f7f7f"}


def phase_coordinates(marks: list[list], t_end: float) -> tuple[list[float], list[float]]:
    """Knots mapping profiler time to 'progress': start-up in [-0.5, 0], then one unit per
    epoch and per validation (marks 'epoch e', 'validation e', then 'done'), so loaders of
    very different speeds line up phase by phase."""
    knots_t, knots_x = [0.0], [-0.5]
    for t, label in marks:
        if label.startswith(("epoch ", "validation ")) or label == "done":
            knots_t.append(t)
            knots_x.append(knots_x[-1] + 0.5 if len(knots_x) == 1 else knots_x[-1] + 1)
    if not marks or marks[-1][1] != "done":      # killed mid-phase: the rest of the run is that phase
        knots_t.append(max(t_end, knots_t[-1] + 1e-3))
        knots_x.append(knots_x[-1] + 1)
    return knots_t, knots_x


def snapshot_x(label: str) -> float | None:
    """Progress coordinate of a snapshot label ('epoch 2 end' -> 3.0)."""
    words = label.split()
    if len(words) != 3:
        return None
    e = int(words[1])
    base = 2 * (e - 1) + (1 if words[0] == "validation" else 0)
    return float(base + (1 if words[2] == "end" else 0))


def plot(runs: list[dict], png: Path, cap_bytes: int | None, title: str) -> None:
    """Six panels: Σ Pss_Anon, Σ Pss_File, train / val worker USS over the run's progress,
    per-worker private anon at epoch boundaries, and where Σ Pss_Anon sits at the end."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = sorted({r["origins"] for r in runs if r["loader"] != BARE})
    style = {s: ls for s, ls in zip(reversed(sizes), ["-", "--", ":", "-."])}
    fig = Figure(figsize=(13, 13))
    FigureCanvasAgg(fig)
    (a, b), (c, d), (e, f) = fig.subplots(3, 2)
    epochs = max((r["epochs_run"] for r in runs), default=1)
    for r in runs:
        s = r["series"]
        label = f"{r['loader']} {size_label(r['origins'])}" if r["loader"] != BARE else "bare worker"
        kw = dict(color=COLORS.get(r["loader"], "k"), ls=style.get(r["origins"], "-") if r["loader"] != BARE
                  else "-", lw=1.3, label=label)
        if s and s["t_s"]:
            kt, kx = phase_coordinates(r["marks"], s["t_s"][-1])
            keep = [i for i, t in enumerate(s["t_s"]) if t <= kt[-1]]
            x = np.interp([s["t_s"][i] for i in keep], kt, kx)
            pick = lambda key: np.array([np.nan if s[key][i] is None else s[key][i] for i in keep])  # noqa: E731
            a.plot(x, pick("pss_anon"), **kw)
            b.plot(x, pick("pss_file"), **kw)
            c.plot(x, pick("train_worker_uss"), **kw)
            d.plot(x, pick("val_worker_uss"), **kw)
        # exact values at the epoch / validation boundaries, from the child's own snapshots
        marker = dict(color=kw["color"], marker=".", ls="none", ms=5)
        for ax, get in ((a, lambda sn: sn["sums"]["pss_anon"]),
                        (c, lambda sn: mean_or_none(sn.get("train", {}).get("uss"))),
                        (d, lambda sn: mean_or_none(sn.get("val", {}).get("uss"))),
                        (e, lambda sn: mean_or_none(sn.get("train", {}).get("private_anon")))):
            pts = [(snapshot_x(sn["label"]), get(sn)) for sn in r["snapshots"]]
            pts = [(x_, y_) for x_, y_ in pts if x_ is not None and y_ is not None]
            if pts:
                if ax is e:
                    ax.plot(*zip(*pts), **{**kw, "marker": "."})
                else:
                    ax.plot(*zip(*pts), **marker)
    ticks = [-0.5] + [k + 0.5 for k in range(2 * epochs)]
    names = ["start-up"] + [f"{'epoch' if k % 2 == 0 else 'val'} {k // 2 + 1}" for k in range(2 * epochs)]
    for ax, what in ((a, "Σ Pss_Anon (MiB): heap + copy-on-write copies, all processes"),
                     (b, "Σ Pss_File (MiB): mapped file pages (page cache, reclaimable)"),
                     (c, "USS per train worker (MiB), mean"),
                     (d, "USS per val worker (MiB), mean"),
                     (e, "private anonymous memory per train worker (MiB), mean, at epoch boundaries")):
        ax.set_title(what, fontsize=10)
        ax.set_xticks(ticks, names, fontsize=7)
        for k in range(2 * epochs + 1):
            ax.axvline(k, color="#bbbbbb", lw=0.6)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
    if cap_bytes:
        for ax in (a, b):
            ax.axhline(cap_bytes / MIB, color="k", lw=1, ls="--", label="memory cap")
    a.legend(fontsize=7, loc="upper left")
    # where Σ Pss_Anon sits at the end of the run
    labels, parts = [], {"main": [], "train workers": [], "val workers": [], "other": []}
    for r in runs:
        last = r["snapshots"][-1] if r["snapshots"] else None
        labels.append(f"{r['loader']}\n{size_label(r['origins'])}" if r["loader"] != BARE else "bare")
        main = (last or {}).get("main", {}).get("pss_anon", 0.0)
        tr = sum((last or {}).get("train", {}).get("pss_anon", []))
        va = sum((last or {}).get("val", {}).get("pss_anon", []))
        total = (last or {}).get("sums", {}).get("pss_anon", 0.0)
        for key, v in (("main", main), ("train workers", tr), ("val workers", va),
                       ("other", max(0.0, total - main - tr - va))):
            parts[key].append(v)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for (key, values), color in zip(parts.items(), ["#555555", "#3182bd", "#9ecae1", "#dddddd"]):
        f.bar(x, values, 0.6, bottom=bottom, label=key, color=color)
        bottom += np.array(values)
    for xi, total in zip(x, bottom):
        f.text(xi, total, f"{total:.0f}", ha="center", va="bottom", fontsize=7)
    f.set_xticks(x, labels, fontsize=7)
    f.set_title("Σ Pss_Anon at the end of the run (MiB), by process", fontsize=10)
    f.legend(fontsize=7)
    f.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{title}\nx axis: each epoch and each validation stretched to one unit (the loaders run at "
                 "very different speeds); lines: profiler samples, dots: snapshots at the boundaries", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png, dpi=80)


# ============================================================================================
# main
# ============================================================================================
def _machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__,
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="metadata sizes (origins), comma-separated")
    p.add_argument("--loaders", default=",".join(LOADERS), help="which loaders to run")
    p.add_argument("--no-bare", action="store_true", help="skip the bare-worker baseline")
    p.add_argument("--workers", type=int, default=8, help="workers per loader (train and val each)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=10, help="train batches per epoch")
    p.add_argument("--val-steps", type=int, default=4, help="val batches per validation")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-full-epochs", action="store_true",
                   help="the cache loader reads every origin each epoch (default with --memory-cap)")
    p.add_argument("--metadata-only", action="store_true",
                   help="the seeds skip parse + voxelize (blank images) and every loader reads every "
                        "origin each epoch: isolates the copy-on-read of the per-origin metadata")
    p.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                   help="the cache loader's prefetch (auto: on when the cache exceeds half the memory budget)")
    p.add_argument("--grid", type=int, default=16, help="image grid (voxels per side) of the caches")
    p.add_argument("--dtype", default="uint8", choices=("float32", "float16", "uint8"), help="cache storage")
    p.add_argument("--interval", type=float, default=0.25, help="profiler sampling interval (s)")
    p.add_argument("--memory-cap", help="run each loader inside a cgroup memory limit, e.g. 600M (root)")
    p.add_argument("--time-limit", type=float, default=180.0,
                   help="a loader that makes no progress for this many seconds is stopped")
    p.add_argument("--work-dir", help="inputs and raw profiles (reused across runs; default: a temp dir, removed)")
    p.add_argument("--out", default=str(HERE / "results"), help="where the .md/.json/.png go")
    p.add_argument("--name", help="output file stem (default loader_memory, or loader_memory_cap)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from cache_tools.profiler.cgroup import CgroupUnavailable, MemoryCap
    from cache_tools.profiler import parse_size

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    loaders = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = set(loaders) - set(LOADERS)
    if unknown:
        raise SystemExit(f"unknown loaders: {', '.join(sorted(unknown))} (choose from {', '.join(LOADERS)})")
    cap_bytes = parse_size(args.memory_cap) if args.memory_cap else None
    if cap_bytes:
        try:     # fail now, with the reason, rather than after building the inputs
            MemoryCap(cap_bytes).create().remove()
        except CgroupUnavailable as exc:
            raise SystemExit(f"--memory-cap needs a cgroup with a memory limit, which needs root (or a "
                             f"delegated cgroup): {exc}") from None
    full_epochs = args.cache_full_epochs or cap_bytes is not None
    name = args.name or ("loader_memory_cap" if cap_bytes else
                         "loader_memory_metadata" if args.metadata_only else "loader_memory")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    temp_work = args.work_dir is None
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="loadermem-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        t = time.monotonic()
        inputs = prepare_inputs(work, sizes, args.grid, args.dtype)
        prepare_s = time.monotonic() - t
        base = {"workers": args.workers, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
                "val_steps": args.val_steps, "batch_size": args.batch_size, "full_epochs": False, "seed": 0}
        plan = [(loader, size) for size in sizes for loader in loaders]
        if not args.no_bare and not cap_bytes:
            plan.insert(0, (BARE, sizes[0]))
        runs = []
        for loader, size in plan:
            config = {**base, "full_epochs": args.metadata_only or (full_epochs and loader == "cache"),
                      "metadata_only": args.metadata_only, "prefetch": args.prefetch}
            run_dir = work / "runs" / f"{name}-{loader}-{size}"
            print(f"--- {loader}, {size} origins{', cap ' + args.memory_cap if cap_bytes else ''} ...",
                  file=sys.stderr, flush=True)
            run = run_child(loader, size, inputs[size], config, run_dir, args.interval, cap_bytes, args.time_limit)
            if loader == "cache":
                from cache_tools import format as fmt
                run["bytes_per_image_read"] = fmt.VoxelLayout(inputs[size]["cache"]).origin_nbytes
            print(f"    {run['status']}: {run['images']} images in {run['elapsed_s']:.0f} s"
                  + (f", peak Σ Pss_Anon {run['peak']['pss_anon']:.0f} MiB" if run.get("peak") else "")
                  + (f", cgroup peak {run['cgroup']['peak_mib']:.0f} MiB, OOM kills {run['cgroup']['oom_kills']}"
                     if run.get("cgroup") else ""), file=sys.stderr, flush=True)
            runs.append(run)
        goals = [] if cap_bytes else evaluate_goals(runs)
        command = "python benchmarks/loader_memory.py" + (f" {' '.join(argv)}" if argv else "")
        text = tables(runs, capped=cap_bytes is not None)
        report = {
            "command": command, "machine": _machine(), "elapsed_s": round(time.monotonic() - started, 1),
            "prepare_s": round(prepare_s, 1),
            "settings": {**vars(args), "sizes": sizes, "loaders": loaders, "cap_bytes": cap_bytes,
                         "cache_full_epochs": full_epochs},
            "inputs": {str(k): {kk: vv for kk, vv in v.items() if kk not in ("structure_dir",)}
                       for k, v in inputs.items()},
            "goals": goals, "runs": runs,
        }
        title = (f"loader memory: {args.workers}+{args.workers} workers, {args.epochs} epochs"
                 + (", full epochs, seeds without voxelizing" if args.metadata_only else "")
                 + (f", memory cap {args.memory_cap}" if cap_bytes else ""))
        plot(runs, out / f"{name}.png", cap_bytes, title)
        md = f"{text}\n\n" + (f"Goals:\n\n{goals_text(goals)}\n" if goals else "")
        (out / f"{name}.md").write_text(md)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        print(md)
        print(f"wrote {out / name}.md/.json/.png in {report['elapsed_s']:.0f} s", file=sys.stderr)
        return report
    finally:
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        sys.exit(child_main(json.loads(sys.argv[2])))
    main(sys.argv[1:])
