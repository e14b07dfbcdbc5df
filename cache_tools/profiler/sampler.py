"""Sampling a process tree over time: :class:`MemoryProfiler` (its rows and timeline: :mod:`.timeline`)."""
from __future__ import annotations

import csv
import json
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from cache_tools.profiler.proc import check_available, private_anon, read_smaps_rollup
from cache_tools.profiler.timeline import CSV_COLUMNS, MARKS_COLUMNS, Sample, Timeline, read_samples
from cache_tools.profiler.tree import assign_roles, tree_processes

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
