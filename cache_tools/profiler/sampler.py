"""Sampling a process tree over time: MemoryProfiler, its CSV rows and its compact timeline."""
from __future__ import annotations

import csv
import json
import os
import threading
import time
import weakref
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from cache_tools.profiler.proc import check_available, private_anon, read_smaps_rollup
from cache_tools.profiler.tree import ROLES, assign_roles, tree_processes

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


# --------------------------------------------------------------------------------------------
# the profiler
# --------------------------------------------------------------------------------------------
class MemoryProfiler:
    """Sample PSS/USS of a process tree in a background thread.

    ::

        with MemoryProfiler("mem-profile", interval=1.0) as prof:   # this process + children
            trainer.fit(model)
            prof.mark("validation")
        # memory.csv, marks.csv, memory.png and summary.json are in mem-profile/

    ``pid=None`` profiles the calling process and its descendants (DataLoader
    workers); ``pid=N`` attaches to a running process.  Processes are followed as
    they come and go; one that leaves the tree by re-parenting is still followed.
    """

    def __init__(self, out_dir: str | os.PathLike, interval: float = 1.0, pid: int | None = None,
                 *, memory_cap: int | None = None, print_summary: bool = True) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.root_pid = os.getpid() if pid is None else int(pid)
        check_available(self.root_pid)
        self.out_dir = Path(out_dir)
        self.interval = float(interval)
        self.memory_cap = memory_cap
        self.print_summary = print_summary
        self.csv_path = self.out_dir / "memory.csv"
        self.marks_path = self.out_dir / "marks.csv"
        self.png_path = self.out_dir / "memory.png"
        self.summary_path = self.out_dir / "summary.json"
        self._timeline = Timeline()
        self._lock = threading.Lock()            # guards the files and the timeline
        self._stop = threading.Event()
        self.root_exited = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._alive: dict[tuple[int, float], str] = {}   # (pid, started) -> role
        self._csv_file = self._marks_file = None
        self._csv: Any = None
        self._marks: Any = None
        self._stopped = False
        # A forked child (a DataLoader worker with the fork start method) inherits this
        # object, possibly with the lock held by the sampler thread that did not survive
        # the fork: make the child's copy inert so prof.mark() there cannot deadlock.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (p := this()) is not None and p._disown())

    def _disown(self) -> None:
        self._lock = threading.Lock()
        self._stopped = True

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "MemoryProfiler":
        """Open the output files, take the first sample now, then sample in the background."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._csv_file = open(self.csv_path, "w", newline="")
        self._marks_file = open(self.marks_path, "w", newline="")
        self._csv = csv.writer(self._csv_file, lineterminator="\n")
        self._marks = csv.writer(self._marks_file, lineterminator="\n")
        self._csv.writerow(CSV_COLUMNS)
        self._marks.writerow(MARKS_COLUMNS)
        self._csv_file.flush()
        self._marks_file.flush()
        self._t0 = time.monotonic()
        self._sample_once()
        self._thread = threading.Thread(target=self._run, name="cache-tools-memory", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set() and not self.root_exited.is_set():
            # fixed rate, but if a sample took longer than the interval, do not try to catch up
            deadline = max(deadline + self.interval, time.monotonic())
            if self._stop.wait(max(0.0, deadline - time.monotonic())):
                break
            self._sample_once()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the root process exits (True) or ``timeout`` passes (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.root_exited.is_set():
            left = 0.5 if end is None else min(0.5, end - time.monotonic())
            if left <= 0:
                return False
            self.root_exited.wait(left)      # short waits keep Ctrl-C responsive
        return True

    def stop(self) -> dict[str, Any]:
        """Stop sampling (after one last sample), write memory.png and summary.json, return the summary."""
        if self._stopped or self._csv_file is None:     # already stopped, or never started
            return self.summary()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._csv_file is not None and not self.root_exited.is_set():
            self._sample_once()
        self._stopped = True
        for f in (self._csv_file, self._marks_file):
            if f is not None:
                f.close()
        summary = self.summary()
        with open(self.summary_path, "w") as f:
            json.dump(summary, f, indent=1)
        from cache_tools.profiler.report import format_summary, plot_memory  # matplotlib: only now
        plot_memory(self._timeline, self.png_path, memory_cap=self.memory_cap,
                    title=f"memory of pid {self.root_pid} and descendants")
        if self.print_summary:  # the report is the result: stdout, like the CLI's
            print(format_summary(summary))
        return summary

    def __enter__(self) -> "MemoryProfiler":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- recording ------------------------------------------------------------------------------
    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def mark(self, label: str) -> None:
        """Record a labelled moment (e.g. "validation"): a vertical line on the plot."""
        label = str(label).replace("\n", " ")
        with self._lock:
            if self._marks is None or self._stopped:
                return
            t = self._now()
            self._timeline.marks.append((t, label))
            self._marks.writerow((f"{t:.3f}", label))
            self._marks_file.flush()

    def _sample_once(self) -> None:
        procs = tree_processes(self.root_pid, self._alive)
        roles = assign_roles(self.root_pid, procs)

        rows: list[tuple[tuple[int, float], Sample]] = []
        for pid in sorted(procs):
            proc = procs[pid]
            try:
                sm = read_smaps_rollup(pid)
            except OSError:          # another user's process, or it vanished mid-read
                sm = None
            if sm is None:
                continue
            rows.append(((pid, proc.started), Sample(
                0.0, pid, proc.ppid, roles[pid], proc.name, sm["Rss"], sm["Pss"], sm["Pss_Anon"],
                sm["Pss_File"], sm["Pss_Shmem"], sm["Private_Clean"] + sm["Private_Dirty"],
                private_anon(sm), sm["Shared_Clean"] + sm["Shared_Dirty"], sm["Swap"])))

        with self._lock:
            if self._stopped:
                return
            # stamped under the lock, so samples and marks are in time order in the files
            t = self._now()
            rows = [(key, s._replace(t_s=t)) for key, s in rows]
            now_alive = {key: s.role for key, s in rows}
            events = [f"end:{pid}:{role}" for (pid, st), role in self._alive.items()
                      if (pid, st) not in now_alive]
            events += [f"start:{key[0]}:{role}" for key, role in now_alive.items()
                       if key not in self._alive]
            self._alive = now_alive
            for label in events:
                self._timeline.events.append((t, label))
                self._marks.writerow((f"{t:.3f}", label))
            for key, s in rows:
                self._timeline.add(s, key)
                self._csv.writerow((f"{t:.3f}", *s[1:]))
            self._csv_file.flush()
            if events:
                self._marks_file.flush()
        if self.root_pid not in procs:
            self.root_exited.set()

    # -- results --------------------------------------------------------------------------------
    @property
    def samples(self) -> list[Sample]:
        """All rows so far, read back from memory.csv (not kept in memory during the run)."""
        with self._lock:          # no half-written row at the end
            return list(read_samples(self.csv_path))

    @property
    def marks(self) -> list[tuple[float, str]]:
        """User marks so far as (t_s, label)."""
        with self._lock:
            return list(self._timeline.marks)

    def summary(self) -> dict[str, Any]:
        """Peaks and finals of the run so far (JSON-serialisable; also written to summary.json).

        Σ values are over the whole tree at one sample: ``peak_pss`` / ``final_pss``,
        ``peak_rss`` (htop's view, for contrast), ``rss_at_peak_pss``, ``peak_pss_anon``,
        ``peak_pss_file``, ``peak_pss_shmem``, ``peak_swap`` (bytes) with ``*_t`` times
        in seconds; ``processes`` lists each process with its role, ``peak_uss``,
        ``final_uss``, ``peak_pss``, ``first_t``/``last_t`` and ``ended_t`` (None if alive).
        """
        with self._lock:
            summary = self._timeline.summary()
        summary.update(root_pid=self.root_pid, interval_s=self.interval, out_dir=str(self.out_dir),
                       memory_cap=self.memory_cap)
        return summary


def read_samples(csv_path: str | os.PathLike) -> Iterable[Sample]:
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if tuple(header or ()) not in (CSV_COLUMNS, _UNITLESS_CSV_COLUMNS):
            raise ValueError(f"{csv_path}: not a cache-tools memory.csv (header {header})")
        for r in reader:
            yield Sample(float(r[0]), int(r[1]), int(r[2]), r[3], r[4], *map(int, r[5:]))

