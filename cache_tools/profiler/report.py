"""Reporting a profile: the text summary, the plot, and both rebuilt from the CSVs."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from cache_tools.profiler.proc import MIB
from cache_tools.profiler.timeline import Timeline, read_samples
from cache_tools.profiler.tree import ROLES


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def render_profile(out_dir: str | os.PathLike, memory_cap: int | None = None) -> dict[str, Any]:
    """Rebuild memory.png and the summary from memory.csv + marks.csv.

    For a run whose process died before the profiler could finish (an OOM kill of
    a job profiled in-process): the CSVs are flushed every sample and survive.
    """
    out = Path(out_dir)
    timeline = Timeline()
    for s in read_samples(out / "memory.csv"):
        timeline.add(s)
    if (out / "marks.csv").exists():
        with open(out / "marks.csv", newline="") as f:
            for t, label in list(csv.reader(f))[1:]:
                is_event = label.startswith(("start:", "end:")) and label.count(":") == 2
                (timeline.events if is_event else timeline.marks).append((float(t), label))
    plot_memory(timeline, out / "memory.png", memory_cap=memory_cap, title=f"memory profile {out.name}")
    summary = timeline.summary()
    summary.update(out_dir=str(out), memory_cap=memory_cap)
    return summary



def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report printed at the end of a run."""
    s = summary
    plural = "process" if s["processes_seen"] == 1 else "processes"
    lines = [f"memory profile: {s['processes_seen']} {plural} (at most {s['max_processes']} at once), "
             f"{s['samples']} samples over {s['duration_s']:.1f} s"]
    if not s["samples"]:
        lines.append("  no samples (the process exited before the first sample)")
        return "\n".join(lines)
    lines += [
        f"  Σ PSS peak   {_mib(s['peak_pss']):>12} at {s['peak_pss_t']:.1f} s   final {_mib(s['final_pss'])}"
        "   <- what the process tree really uses",
        f"  Σ RSS peak   {_mib(s['peak_rss']):>12} at {s['peak_rss_t']:.1f} s   (Σ RSS at the PSS peak: "
        f"{_mib(s['rss_at_peak_pss'])})",
        "               RSS (htop) counts a page shared by N processes N times; PSS splits it N ways.",
    ]
    if s.get("pss_breakdown_available", True):
        lines += [
            f"  Σ Pss_Anon peak  {_mib(s['peak_pss_anon']):>12}   heap + copy-on-write copies: not "
            "reclaimable, what gets OOM-killed",
            f"  Σ Pss_File peak  {_mib(s['peak_pss_file']):>12}   mmap'd files (e.g. the cache): "
            "reclaimable page cache",
        ]
        if s["peak_pss_shmem"]:
            lines.append(f"  Σ Pss_Shmem peak {_mib(s['peak_pss_shmem']):>12}   shared memory / tmpfs")
    else:
        lines.append("  (no Pss_Anon/Pss_File breakdown: this kernel's smaps_rollup lacks it)")
    if s.get("peak_swap"):
        lines.append(f"  Σ Swap peak      {_mib(s['peak_swap']):>12}")
    lines.append("  per process, peak -> final: private anon = its own growth (heap, copy-on-write copies);")
    lines.append("  USS = that plus clean file pages only it maps (cache pages, reclaimable)")
    for role in ROLES:
        procs = [p for p in s["processes"] if p["role"] == role]
        for p in procs:
            status = f"ended at {p['ended_t']:.1f} s" if p.get("ended_t") is not None else "alive at end"
            lines.append(f"    {role:<6} {p['pid']:<7} {p['name'][:14]:<14} private anon "
                         f"{p.get('peak_uss_anon', 0) / MIB:7.1f} -> {p.get('final_uss_anon', 0) / MIB:7.1f}"
                         f"   USS {p['peak_uss'] / MIB:7.1f} -> {p['final_uss'] / MIB:7.1f} MiB  ({status})")
        if role == "worker" and len(procs) > 1:
            anon = sum(p.get("peak_uss_anon", 0) for p in procs)
            lines.append(f"    Σ of {len(procs)} worker peaks: private anon {_mib(anon)}, "
                         f"USS {_mib(sum(p['peak_uss'] for p in procs))}")
    if s.get("marks"):
        lines.append("  marks: " + ", ".join(f"{label} @ {t:.1f} s" for t, label in s["marks"][:20])
                     + (" ..." if len(s["marks"]) > 20 else ""))
    if s.get("out_dir"):
        lines.append(f"  outputs: {s['out_dir']}/memory.csv, marks.csv, memory.png, summary.json")
    return "\n".join(lines)


def _time_unit(duration_s: float) -> tuple[float, str]:
    if duration_s > 3 * 3600:
        return 3600.0, "h"
    if duration_s > 600:
        return 60.0, "min"
    return 1.0, "s"


SHARED_WITH_WORKERS_NOTE = (
    "While forked workers live, pages main shares with them are not private to anyone, so main's\n"
    "private anon drops (to ~0) and returns when they exit: copy-on-write sharing, not memory freed.")


def plot_memory(timeline: Timeline, png_path: str | os.PathLike, memory_cap: int | None = None,
                title: str = "memory profile"):
    """Two panels: Σ PSS stacked by anon/file/shmem with Σ RSS dashed; USS per process.

    Returns the matplotlib Figure (after saving it), e.g. to check what it says.
    """
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in the
    # user's process (which may be a notebook using another backend).
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.5, 7.5))
    FigureCanvasAgg(fig)
    ax_top, ax_bot = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    t_all = np.asarray(timeline.t)
    scale, unit = _time_unit(float(t_all[-1]) if t_all.size else 0.0)
    t = t_all / scale
    if t.size:
        sums = {k: np.asarray(v) / MIB for k, v in timeline.sums.items()}
        if timeline.breakdown_seen:
            other = np.clip(sums["pss"] - sums["pss_anon"] - sums["pss_file"] - sums["pss_shmem"], 0, None)
            layers = [(sums["pss_anon"], "Σ PSS anon (heap, CoW copies)", "#d62728"),
                      (sums["pss_file"], "Σ PSS file (mmap'd files)", "#1f77b4")]
            if sums["pss_shmem"].max() >= 1:      # MiB; below that it is noise in the legend
                layers.append((sums["pss_shmem"], "Σ PSS shmem", "#9467bd"))
            if other.max() > 1:
                layers.append((other, "Σ PSS unclassified", "#7f7f7f"))
            ax_top.stackplot(t, *[l[0] for l in layers], labels=[l[1] for l in layers],
                             colors=[l[2] for l in layers], alpha=0.75, step=None)
        else:
            ax_top.fill_between(t, sums["pss"], color="#2ca02c", alpha=0.6, label="Σ PSS")
        ax_top.plot(t, sums["rss"], "k--", lw=1.4, label='Σ RSS ("what htop shows")')
        if memory_cap:
            ax_top.axhline(memory_cap / MIB, color="#ff7f0e", lw=1.5, label="memory cap")
    ax_top.set_ylabel("MiB")
    ax_top.set_title(title)
    ax_top.set_ylim(bottom=0)
    ax_top.grid(alpha=0.3)

    role_colors = {"main": "black", "other": "#7f7f7f"}
    worker_cmap = _worker_colors()
    tracks = sorted(timeline.tracks.values(), key=lambda tr: (ROLES.index(tr.role) if tr.role in ROLES else 9,
                                                              tr.first_t, tr.pid))
    n_workers = 0
    max_legend = 12
    for i, tr in enumerate(tracks):
        if tr.role == "worker":
            color = worker_cmap[n_workers % len(worker_cmap)]
            n_workers += 1
        else:
            color = role_colors.get(tr.role, "#7f7f7f")
        label = f"{tr.role} {tr.pid} ({tr.name})" if i < max_legend else None
        ax_bot.plot(np.asarray(tr.t) / scale, np.asarray(tr.uss_anon) / MIB, color=color,
                    lw=1.6 if tr.role == "main" else 1.1, label=label,
                    marker="." if len(tr.t) < 3 else None)
        ax_bot.plot(np.asarray(tr.t) / scale, np.asarray(tr.uss) / MIB, color=color, lw=0.8, ls=":")
    if len(tracks) > max_legend:
        ax_bot.plot([], [], " ", label=f"+ {len(tracks) - max_legend} more")
    ax_bot.plot([], [], color="#555555", lw=0.8, ls=":", label="dotted: USS (with file pages)")
    ax_bot.set_ylabel("private anon per process (MiB)")
    ax_bot.set_xlabel(f"time since start ({unit})")
    ax_bot.set_ylim(bottom=0)
    ax_bot.grid(alpha=0.3)

    for when, label in timeline.events:
        color = "#2ca02c" if label.startswith("start:") else "#d62728"
        ax_bot.axvline(when / scale, ymin=0, ymax=0.06, color=color, alpha=0.6, lw=1)
    for when, label in _merge_close_marks(timeline.marks, scale, float(t[-1]) if t.size else 0.0):
        for ax in (ax_top, ax_bot):
            ax.axvline(when, color="#555555", ls=":", lw=1.2)
        ax_top.annotate(label, xy=(when, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -4), textcoords="offset points", rotation=90, va="top",
                        fontsize=8, color="#333333")
    if not t.size:
        ax_top.text(0.5, 0.5, "no samples", transform=ax_top.transAxes, ha="center")
    for ax in (ax_top, ax_bot):
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.text(0.99, 0.005, "ticks at the bottom: process start (green) / end (red)", ha="right",
             va="bottom", fontsize=7, color="#666666")
    roles = {tr.role for tr in tracks}
    if "main" in roles and "worker" in roles:  # the drop of main's private memory needs saying
        ax_bot.text(0.01, 0.97, SHARED_WITH_WORKERS_NOTE, transform=ax_bot.transAxes, va="top",
                    ha="left", fontsize=7.5, color="#333333",
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return fig


def _merge_close_marks(marks: list[tuple[float, str]], scale: float, x_end: float) -> list[tuple[float, str]]:
    """Marks within 1% of the time axis of each other share one line ("validation end / epoch 1")."""
    merged: list[tuple[float, str]] = []
    for when, label in sorted(marks):
        x = when / scale
        if merged and x - merged[-1][0] <= 0.01 * max(x_end, 1e-9):
            merged[-1] = (merged[-1][0], f"{merged[-1][1]} / {label}")
        else:
            merged.append((x, label))
    return merged


def _worker_colors() -> list[str]:
    return ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a"]

