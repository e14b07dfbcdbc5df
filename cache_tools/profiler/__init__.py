"""The memory profiler: a process tree's private/shared, anon/file memory over time.

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

Modules, one concern each: :mod:`~cache_tools.profiler.proc` (reading /proc: smaps_rollup),
:mod:`~cache_tools.profiler.tree` (the process tree and roles, via psutil),
:mod:`~cache_tools.profiler.timeline` (a sample row, the CSV, the compact timeline),
:mod:`~cache_tools.profiler.sampler` (:class:`MemoryProfiler`, sampling over time),
:mod:`~cache_tools.profiler.report` (summary text and plot),
:mod:`~cache_tools.profiler.cgroup` (running a command under a memory cap, as SLURM does),
:mod:`~cache_tools.profiler.phases` (the loader-memory harness: train + val loaders,
snapshots per epoch and validation), :mod:`~cache_tools.profiler.goals` (its verdicts), and
:mod:`~cache_tools.profiler.callback` (:class:`MemoryMarkCallback`, marks from a Lightning
run; it imports lightning, so it is loaded on first use). This package re-exports the
public names.

Units in the text output: MiB = 2**20 bytes, the unit ``free -m`` and htop use.
"""
from __future__ import annotations

from cache_tools.profiler.cgroup import CgroupUnavailable, MemoryCap, format_cap_report, run_in_memory_cap
from cache_tools.profiler.proc import (MIB, SMAPS_KEYS, ProfilerUnavailable, check_available, parse_size,
                                       private_anon, process_memory, read_smaps_rollup)
from cache_tools.profiler.report import SHARED_WITH_WORKERS_NOTE, format_summary, plot_memory, render_profile
from cache_tools.profiler.sampler import MemoryProfiler
from cache_tools.profiler.timeline import CSV_COLUMNS, MARKS_COLUMNS, Sample, Timeline, read_samples
from cache_tools.profiler.tree import ROLES, ProcessInfo, process_tree

__all__ = [
    "CSV_COLUMNS", "MARKS_COLUMNS", "ProfilerUnavailable", "CgroupUnavailable", "MemoryCap",
    "MemoryProfiler", "ProcessInfo", "Sample", "check_available", "read_smaps_rollup", "private_anon",
    "process_memory", "process_tree", "parse_size", "format_summary", "plot_memory", "render_profile",
    "read_samples", "SHARED_WITH_WORKERS_NOTE", "run_in_memory_cap", "format_cap_report", "MIB", "ROLES", "SMAPS_KEYS",
    "Timeline", "MemoryMarkCallback",
]


def __getattr__(name: str):
    if name == "MemoryMarkCallback":  # a lightning.Callback: lightning is imported now, never before
        from cache_tools.profiler.callback import MemoryMarkCallback
        return MemoryMarkCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
