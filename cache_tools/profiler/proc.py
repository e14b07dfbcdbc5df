"""Reading /proc: one process's smaps_rollup, and the figures derived from it.

psutil gives the process tree (:mod:`cache_tools.profiler.tree`) but not the
anonymous/file split of proportional memory, which only ``smaps_rollup`` has
(Pss_Anon, Pss_File, Pss_Shmem; Linux >= 4.14, the split >= 5.x).
"""
from __future__ import annotations

import math
import os
import sys

import psutil

SMAPS_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Shared_Clean", "Shared_Dirty",
              "Private_Clean", "Private_Dirty", "Swap", "SwapPss", "Anonymous")
MIB = 1 << 20


class ProfilerUnavailable(RuntimeError):
    """Memory profiling cannot work here (no /proc, kernel < 4.14, no such pid, ...)."""


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


def process_memory(pid: int) -> dict[str, int] | None:
    """The per-process figures the loader-memory harness reports, in bytes (None if gone).

    ``uss`` (Private_Clean + Private_Dirty) is what the process frees on exit, but it also
    counts clean *file* pages only this process maps -- page cache (e.g. cache images
    only one worker happened to read), reclaimable, not heap. ``private_anon`` is
    min(Private_Dirty, Anonymous): private pages that are anonymous (heap, copy-on-write
    copies) -- the growth that the OOM killer counts. ``private_file`` is the rest of USS.
    """
    try:
        sm = read_smaps_rollup(pid)
    except OSError:
        return None
    if sm is None:
        return None
    uss = sm["Private_Clean"] + sm["Private_Dirty"]
    anon = private_anon(sm)
    return {"uss": uss, "private_anon": anon, "private_file": uss - anon,
            "anonymous": sm["Anonymous"], "private_dirty": sm["Private_Dirty"],
            "pss_anon": sm["Pss_Anon"], "pss_file": sm["Pss_File"], "pss_shmem": sm["Pss_Shmem"],
            "rss": sm["Rss"], "pss": sm["Pss"]}


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
    if pid <= 0 or not psutil.pid_exists(pid):
        raise ProfilerUnavailable(f"no process with pid {pid}")
    try:
        read_smaps_rollup(pid)
    except PermissionError:
        raise ProfilerUnavailable(f"cannot read /proc/{pid}/smaps_rollup: permission denied "
                                  "(the process belongs to another user; run as that user or root)"
                                  ) from None



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


