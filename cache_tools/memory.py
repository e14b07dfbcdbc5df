"""Memory profiling of a process tree that tells the truth about shared pages.

Why: ``htop``'s RES/RSS counts a page once per process that maps it.  Eight
DataLoader workers that share a 10 GB memory-mapped cache show 90 GB of RSS
while the machine uses 10 GB; and a worker that slowly copies the parent's
Python objects on read (refcount writes dirty copy-on-write pages) looks no
different from one that merely maps the cache.  ``/proc/<pid>/smaps_rollup``
(Linux >= 4.14) gives the numbers that matter:

* PSS (proportional set size): each page divided among the processes sharing it,
  so Σ PSS over the tree is what the tree really costs;
* Pss_Anon / Pss_File / Pss_Shmem (Linux >= 5.x): whether that cost is private heap
  and copy-on-write copies (not reclaimable without swap: this is what the OOM
  killer counts), file pages (reclaimable: an mmap'd cache can exceed the memory
  limit), or shared memory (tmpfs, torch shared tensors);
* USS (Private_Clean + Private_Dirty): what a process frees when it exits. It also
  counts clean file pages only this process happens to map (cache images only this
  worker has read so far): page cache, shared as soon as another process maps them;
* private anonymous (min(Private_Dirty, Anonymous), ``uss_anon``): the part of USS that
  is heap and copy-on-write copies -- the growth of a worker that no reclaim undoes.

Sampling output, written incrementally (flushed every sample, so it survives an
OOM kill of the profiled job) into ``out_dir``:

``memory.csv`` -- one row per process per sample::

    t_s,pid,ppid,role,name,rss_bytes,pss_bytes,pss_anon_bytes,pss_file_bytes,pss_shmem_bytes,
    uss_bytes,uss_anon_bytes,shared_bytes,swap_bytes

    t_s        seconds since the profiler started (3 decimals); rows of one sample share it
    pid, ppid  process id and parent process id
    role       "main" (the profiled program), "worker" (a DataLoader / multiprocessing
               worker of main) or "other" (any other descendant, launchers, helpers)
    name       the process's comm (torch names its DataLoader workers "pt_data_worker")
    rss        Rss: resident pages, shared ones counted in full (what htop shows)
    pss        Pss: resident pages, shared ones divided by the number of sharers
    pss_anon   Pss_Anon:  anonymous (heap, stacks, copy-on-write copies)
    pss_file   Pss_File:  file-backed (mmap'd files, libraries)
    pss_shmem  Pss_Shmem: shared memory / tmpfs
    uss        Private_Clean + Private_Dirty: freed when the process exits
    uss_anon   min(Private_Dirty, Anonymous): the private anonymous part of uss
    shared     Shared_Clean + Shared_Dirty: resident pages also mapped by another process
    swap       Swap: swapped-out anonymous pages of the process

All memory columns are integer bytes (hence ``_bytes`` in their names).

``marks.csv`` -- ``t_s,label``: user marks from :meth:`MemoryProfiler.mark` and the
process events ``start:<pid>:<role>`` / ``end:<pid>:<role>`` (at sample resolution).

``memory.png`` -- the plot; ``summary.json`` -- :meth:`MemoryProfiler.summary`.

Units in the text output: MiB = 2**20 bytes, the unit ``free -m`` and htop use.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import threading
import time
import weakref
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from cache_tools.cgroup import CgroupUnavailable, MemoryCap, format_cap_report, run_in_memory_cap

__all__ = [
    "CSV_COLUMNS", "MARKS_COLUMNS", "ProfilerUnavailable", "CgroupUnavailable", "MemoryCap",
    "MemoryProfiler", "MemoryMarkCallback", "ProcessInfo", "Sample", "check_available",
    "read_smaps_rollup", "private_anon", "process_tree", "parse_size", "format_summary",
    "render_profile", "run_in_memory_cap", "format_cap_report",
]

CSV_COLUMNS = ("t_s", "pid", "ppid", "role", "name", "rss_bytes", "pss_bytes", "pss_anon_bytes",
               "pss_file_bytes", "pss_shmem_bytes", "uss_bytes", "uss_anon_bytes", "shared_bytes", "swap_bytes")
_UNITLESS_CSV_COLUMNS = tuple(c.removesuffix("_bytes") for c in CSV_COLUMNS)  # memory.csv before the units
MARKS_COLUMNS = ("t_s", "label")
SMAPS_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Shared_Clean", "Shared_Dirty",
              "Private_Clean", "Private_Dirty", "Swap", "SwapPss", "Anonymous")
ROLES = ("main", "worker", "other")
MIB = 1 << 20


class ProfilerUnavailable(RuntimeError):
    """Memory profiling cannot work here (no /proc, kernel < 4.14, no such pid, ...)."""


# --------------------------------------------------------------------------------------------
# /proc readers
# --------------------------------------------------------------------------------------------
def read_smaps_rollup(pid: int) -> dict[str, int] | None:
    """The summed smaps of ``pid`` in bytes (keys of SMAPS_KEYS, missing ones 0).

    Returns None when the process is gone or is a zombie (nothing mapped any more).
    Raises PermissionError for another user's process.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if not data:
        return None      # zombie or kernel thread
    values = dict.fromkeys(SMAPS_KEYS, 0)
    for line in data.splitlines()[1:]:
        key, _, rest = line.partition(b":")
        name = key.decode()
        if name in values:
            values[name] = int(rest.split()[0]) * 1024   # always kB
    return values


def private_anon(smaps: dict[str, int]) -> int:
    """Private anonymous bytes of a process (heap, copy-on-write copies) from its smaps_rollup.

    smaps_rollup has no such line: anonymous pages still shared with the parent are in
    Anonymous but not Private_Dirty, clean private file pages are in neither, so the
    smaller of the two is the private anonymous part of USS.
    """
    return min(smaps["Private_Dirty"], smaps["Anonymous"])


class _Stat(NamedTuple):
    ppid: int
    comm: str
    state: str
    starttime: int     # clock ticks since boot: tells a reused pid apart


def _read_stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm is in parentheses and may itself contain spaces and parentheses
    left, right = data.index(b"("), data.rindex(b")")
    fields = data[right + 2:].split()
    return _Stat(int(fields[1]), data[left + 1:right].decode(errors="replace"),
                 fields[0].decode(), int(fields[19]))


def _read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def _all_stats() -> dict[int, _Stat]:
    """ppid & co. of every process, by scanning /proc/*/stat (no CONFIG_PROC_CHILDREN needed)."""
    stats: dict[int, _Stat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                stats[int(entry)] = stat
    return stats


def check_available(pid: int | None = None) -> None:
    """Raise ProfilerUnavailable with a one-line reason if we cannot profile (``pid``)."""
    if not os.path.isdir("/proc/self"):
        raise ProfilerUnavailable(f"no /proc filesystem (platform {sys.platform}): "
                                  "memory profiling needs Linux")
    if not os.path.exists("/proc/self/smaps_rollup"):
        raise ProfilerUnavailable("/proc/self/smaps_rollup is missing: memory profiling needs "
                                  "Linux >= 4.14")
    if pid is None:
        return
    if pid <= 0 or _read_stat(pid) is None:
        raise ProfilerUnavailable(f"no process with pid {pid}")
    try:
        read_smaps_rollup(pid)
    except PermissionError:
        raise ProfilerUnavailable(f"cannot read /proc/{pid}/smaps_rollup: permission denied "
                                  "(the process belongs to another user; run as that user or root)"
                                  ) from None


# --------------------------------------------------------------------------------------------
# process tree and roles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessInfo:
    """A process of the profiled tree."""
    pid: int
    ppid: int
    name: str         # comm
    cmdline: str
    role: str         # "main", "worker" or "other"
    starttime: int


def _is_python(name: str, exe: str) -> bool:
    # torch renames threads (pt_main_thread, pt_data_worker), so look at the executable too
    return exe.startswith("python") or name.startswith(("python", "pt_"))


def _descendants(root: int, stats: dict[int, _Stat]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    order, todo = [], [root]
    while todo:
        pid = todo.pop()
        order.append(pid)
        todo.extend(sorted(children.get(pid, ()), reverse=True))
    return order


def _assign_roles(root: int, procs: dict[int, tuple[_Stat, str, str]]) -> dict[int, str]:
    """Label the tree: procs maps pid -> (stat, cmdline, exe name).

    * main: the root -- unless the root is a non-Python launcher (``bash run.sh``,
      ``uv run``, ``srun``) with a single child chain; then the first Python
      process down that chain is main and the launchers are "other".
    * worker: torch's DataLoader workers name themselves ``pt_data_worker``; failing
      that, spawn/forkserver children (``multiprocessing`` in their cmdline), and any
      Python process forked directly by main (a forked worker has main's cmdline).
    * other: everything else, including the resource tracker and forkserver.
    """
    children: dict[int, list[int]] = {}
    for pid, (stat, _, _) in procs.items():
        children.setdefault(stat.ppid, []).append(pid)

    def python(pid: int) -> bool:
        stat, _, exe = procs[pid]
        return _is_python(stat.comm, exe)

    main = root
    if root in procs and not python(root):
        node = root
        while len(children.get(node, ())) == 1 and not python(node):
            node = children[node][0]
        if python(node):
            main = node

    def is_helper(cmdline: str) -> bool:
        return ("multiprocessing.resource_tracker" in cmdline
                or "multiprocessing.forkserver" in cmdline)

    main_is_python = main in procs and python(main)
    roles: dict[int, str] = {}
    for pid, (stat, cmdline, _) in procs.items():
        parent = procs.get(stat.ppid)
        parent_is_forkserver = parent is not None and "multiprocessing.forkserver" in parent[1]
        if pid == main:
            role = "main"
        elif stat.comm == "pt_data_worker":
            role = "worker"
        elif parent_is_forkserver and python(pid):
            role = "worker"      # forkserver children inherit the forkserver's cmdline
        elif is_helper(cmdline):
            role = "other"
        elif "multiprocessing" in cmdline and python(pid):
            role = "worker"      # spawn_main(...) --multiprocessing-fork
        elif stat.ppid == main and main_is_python and python(pid):
            role = "worker"      # forked by main; torch names nothing before the worker loop
        else:
            role = "other"
        roles[pid] = role
    return roles


def process_tree(root_pid: int) -> list[ProcessInfo]:
    """``root_pid`` and all its descendants, labelled main / worker / other."""
    stats = _all_stats()
    if root_pid not in stats:
        return []
    procs = {pid: (stats[pid], _read_cmdline(pid), _read_exe_name(pid))
             for pid in _descendants(root_pid, stats)}
    roles = _assign_roles(root_pid, procs)
    return [ProcessInfo(pid, st.ppid, st.comm, cmd, roles[pid], st.starttime)
            for pid, (st, cmd, _) in procs.items()]


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from "600M", "1.5G", "512KiB", "16GB" or "1048576".

    Binary multiples throughout, as SLURM's ``--mem`` reads them: K/KB/KiB = 1024.
    """
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    if unit.endswith("IB"):
        unit = unit[:-2]
    elif unit.endswith("B") and len(unit) == 2:
        unit = unit[:-1]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not number or value < 0 or not math.isfinite(value):
        raise ValueError(f"invalid size {text!r} (expected e.g. 600M, 16G, 512KiB or bytes)")
    return int(value * _UNITS[unit])


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


# --------------------------------------------------------------------------------------------
# timeline: compact aggregates, fed live or from a CSV
# --------------------------------------------------------------------------------------------
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


class _Timeline:
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
        self._timeline = _Timeline()
        self._lock = threading.Lock()            # guards the files and the timeline
        self._stop = threading.Event()
        self.root_exited = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._alive: dict[tuple[int, int], str] = {}   # (pid, starttime) -> role
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
        stats = _all_stats()
        members = set(_descendants(self.root_pid, stats)) if self.root_pid in stats else set()
        # keep following processes seen before that were re-parented away from the tree
        for pid, starttime in self._alive:
            st = stats.get(pid)
            if st is not None and st.starttime == starttime:
                members.add(pid)
        procs = {pid: (stats[pid], _read_cmdline(pid), _read_exe_name(pid))
                 for pid in members if stats[pid].state not in ("Z", "X")}
        roles = _assign_roles(self.root_pid, procs)

        rows: list[tuple[tuple[int, int], Sample]] = []
        for pid in sorted(procs):
            stat = procs[pid][0]
            try:
                sm = read_smaps_rollup(pid)
            except OSError:          # another user's process, or it vanished mid-read
                sm = None
            if sm is None:
                continue
            rows.append(((pid, stat.starttime), Sample(
                0.0, pid, stat.ppid, roles[pid], stat.comm, sm["Rss"], sm["Pss"], sm["Pss_Anon"],
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
            return list(_read_samples(self.csv_path))

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


def _read_samples(csv_path: str | os.PathLike) -> Iterable[Sample]:
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if tuple(header or ()) not in (CSV_COLUMNS, _UNITLESS_CSV_COLUMNS):
            raise ValueError(f"{csv_path}: not a cache-tools memory.csv (header {header})")
        for r in reader:
            yield Sample(float(r[0]), int(r[1]), int(r[2]), r[3], r[4], *map(int, r[5:]))


def render_profile(out_dir: str | os.PathLike, memory_cap: int | None = None) -> dict[str, Any]:
    """Rebuild memory.png and the summary from memory.csv + marks.csv.

    For a run whose process died before the profiler could finish (an OOM kill of
    a job profiled in-process): the CSVs are flushed every sample and survive.
    """
    out = Path(out_dir)
    timeline = _Timeline()
    for s in _read_samples(out / "memory.csv"):
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


# --------------------------------------------------------------------------------------------
# output: text and plot
# --------------------------------------------------------------------------------------------
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


def plot_memory(timeline: _Timeline, png_path: str | os.PathLike, memory_cap: int | None = None,
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


def __getattr__(name: str):
    # MemoryMarkCallback is a lightning.Callback and lives with the DataModule; importing it
    # from here still works, and only then imports lightning.
    if name == "MemoryMarkCallback":
        from cache_tools.lightning import MemoryMarkCallback
        return MemoryMarkCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
