"""The profiler's data: a sample row (memory.csv), reading the CSV back, and the compact
per-process timeline the summary and the plot are made from."""
from __future__ import annotations

import csv
import os
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

from cache_tools.profiler.tree import ROLES

CSV_COLUMNS = ("t_s", "pid", "ppid", "role", "name", "rss_bytes", "pss_bytes", "pss_anon_bytes",
               "pss_file_bytes", "pss_shmem_bytes", "uss_bytes", "uss_anon_bytes", "shared_bytes", "swap_bytes")
_UNITLESS_CSV_COLUMNS = tuple(c.removesuffix("_bytes") for c in CSV_COLUMNS)  # memory.csv before the units
MARKS_COLUMNS = ("t_s", "label")


class Sample(NamedTuple):
    """One row of memory.csv."""
    t_s: float
    pid: int
    ppid: int
    role: str
    name: str
    rss: int
    pss: int
    pss_anon: int
    pss_file: int
    pss_shmem: int
    uss: int
    uss_anon: int
    shared: int
    swap: int


@dataclass
class _Track:
    """Per-process series, kept as two float arrays (16 bytes per sample)."""
    pid: int
    ppid: int
    role: str
    name: str
    t: array = field(default_factory=lambda: array("d"))
    uss: array = field(default_factory=lambda: array("d"))
    uss_anon: array = field(default_factory=lambda: array("d"))
    peak_uss: int = 0
    peak_uss_t: float = 0.0
    peak_pss: int = 0
    peak_rss: int = 0
    final_uss: int = 0
    peak_uss_anon: int = 0
    final_uss_anon: int = 0
    first_t: float = 0.0
    last_t: float = 0.0


class Timeline:
    """Σ-over-tree series per sample and per-process USS series.

    Kept compact (arrays of doubles) because in library mode the profiler lives in
    the very process it measures: a day of 1 s samples costs a few MB, not the
    hundreds a list of row objects would.
    """

    SUMS = ("rss", "pss", "pss_anon", "pss_file", "pss_shmem", "swap")

    def __init__(self) -> None:
        self.t = array("d")
        self.sums = {k: array("d") for k in self.SUMS}
        self.nproc = array("l")
        self.tracks: dict[tuple[int, int], _Track] = {}
        self.marks: list[tuple[float, str]] = []
        self.events: list[tuple[float, str]] = []
        self.breakdown_seen = False

    def add(self, s: Sample, key: tuple[int, int] | None = None) -> None:
        if not self.t or self.t[-1] != s.t_s:
            self.t.append(s.t_s)
            for arr in self.sums.values():
                arr.append(0.0)
            self.nproc.append(0)
        for k in self.SUMS:
            self.sums[k][-1] += getattr(s, k)
        self.nproc[-1] += 1
        if s.pss_anon or s.pss_file or s.pss_shmem:
            self.breakdown_seen = True
        key = key or (s.pid, 0)
        tr = self.tracks.get(key)
        if tr is None:
            tr = self.tracks[key] = _Track(s.pid, s.ppid, s.role, s.name, first_t=s.t_s)
        tr.ppid, tr.role, tr.name, tr.last_t, tr.final_uss = s.ppid, s.role, s.name, s.t_s, s.uss
        tr.t.append(s.t_s)
        tr.uss.append(s.uss)
        tr.uss_anon.append(s.uss_anon)
        tr.final_uss_anon = s.uss_anon
        tr.peak_uss_anon = max(tr.peak_uss_anon, s.uss_anon)
        if s.uss > tr.peak_uss:
            tr.peak_uss, tr.peak_uss_t = s.uss, s.t_s
        tr.peak_pss = max(tr.peak_pss, s.pss)
        tr.peak_rss = max(tr.peak_rss, s.rss)

    def summary(self) -> dict[str, Any]:
        def peak(name: str) -> tuple[int, float]:
            arr = self.sums[name]
            if not arr:
                return 0, 0.0
            i = max(range(len(arr)), key=arr.__getitem__)
            return int(arr[i]), self.t[i]

        peak_pss, peak_pss_t = peak("pss")
        peak_rss, peak_rss_t = peak("rss")
        role_order = {r: i for i, r in enumerate(ROLES)}
        procs = sorted(self.tracks.values(), key=lambda tr: (role_order.get(tr.role, 9), tr.first_t, tr.pid))
        ended = {int(label.split(":")[1]): t for t, label in self.events if label.startswith("end:")}

        def ended_t(tr: _Track) -> float | None:
            t = ended.get(tr.pid)
            return t if t is not None and t >= tr.last_t else None   # not an earlier holder of the pid
        i_peak = max(range(len(self.t)), key=self.sums["pss"].__getitem__) if self.t else None
        return {
            "duration_s": self.t[-1] if self.t else 0.0,
            "samples": len(self.t),
            "processes_seen": len(self.tracks),
            "max_processes": max(self.nproc, default=0),
            "peak_pss": peak_pss, "peak_pss_t": peak_pss_t,
            "final_pss": int(self.sums["pss"][-1]) if self.t else 0,
            "peak_rss": peak_rss, "peak_rss_t": peak_rss_t,
            "rss_at_peak_pss": int(self.sums["rss"][i_peak]) if i_peak is not None else 0,
            "final_rss": int(self.sums["rss"][-1]) if self.t else 0,
            "peak_pss_anon": peak("pss_anon")[0],
            "peak_pss_file": peak("pss_file")[0],
            "peak_pss_shmem": peak("pss_shmem")[0],
            "peak_swap": peak("swap")[0],
            "pss_breakdown_available": self.breakdown_seen or not self.t,
            "processes": [
                {"pid": tr.pid, "ppid": tr.ppid, "role": tr.role, "name": tr.name,
                 "first_t": tr.first_t, "last_t": tr.last_t,
                 "ended_t": ended_t(tr),
                 "peak_uss": tr.peak_uss, "peak_uss_t": tr.peak_uss_t, "final_uss": tr.final_uss,
                 "peak_uss_anon": tr.peak_uss_anon, "final_uss_anon": tr.final_uss_anon,
                 "peak_pss": tr.peak_pss, "peak_rss": tr.peak_rss}
                for tr in procs],
            "marks": [[t, label] for t, label in self.marks],
        }


def read_samples(csv_path: str | os.PathLike) -> Iterable[Sample]:
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if tuple(header or ()) not in (CSV_COLUMNS, _UNITLESS_CSV_COLUMNS):
            raise ValueError(f"{csv_path}: not a cache-tools memory.csv (header {header})")
        for r in reader:
            yield Sample(float(r[0]), int(r[1]), int(r[2]), r[3], r[4], *map(int, r[5:]))

