"""Run a command under a hard memory limit, the way SLURM's cgroup plugin does.

Why: a job that survives on a 64 GB workstation can be OOM-killed under
``sbatch --mem=16G``, because the cgroup counts every page the job touches,
including the page cache that ``htop`` does not show.  Rehearsing the limit
locally (``cache-tools profile-memory --memory-cap 16G -- python train.py``)
answers "will it fit?" before the job waits a day in the queue.

The cgroup is created as a child of the cgroup we already live in, so the
command stays inside whatever limits already apply to us; the new limit can only
tighten them.  cgroup v2 is preferred; cgroup v1's ``memory`` hierarchy is the
fallback (hybrid hosts often have v2 mounted with no memory controller).

Only the standard library is used.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cache_tools.read.budget import (Mount, cgroup_dir, cgroup_mounts, memory_budget, own_cgroup, read_int,
                                     read_keyed, read_text)

__all__ = ["CgroupUnavailable", "MemoryCap", "run_in_memory_cap", "format_cap_report", "memory_budget"]


_MIB = 1 << 20


class CgroupUnavailable(RuntimeError):
    """No cgroup with a memory limit can be created here; the message says why."""


def _why(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{reason} (needs root or a delegated cgroup)"
    if exc.errno == errno.EROFS:
        return f"{reason} (cgroupfs is mounted read-only, as in most containers)"
    if exc.errno == errno.EBUSY:
        return f"{reason} (cgroup v2 'no internal processes' rule)"
    return reason


_counter = 0


class MemoryCap:
    """A temporary cgroup with ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1).

    Use as a context manager; put the command in it with ``preexec_fn=cap.join``
    so it is limited from its very first allocation, read :meth:`report` after it
    exits.  Swap is disabled for the cgroup so the cap is a hard RAM limit, as on
    a cluster node without swap.
    """

    def __init__(self, cap_bytes: int, name: str | None = None) -> None:
        if cap_bytes <= 0:
            raise ValueError("memory cap must be positive")
        global _counter
        _counter += 1
        self.cap_bytes = int(cap_bytes)
        self.name = name or f"cache-tools-{os.getpid()}-{_counter}"
        self.version: int | None = None
        self.path: Path | None = None
        self._procs_file: str | None = None

    # -- creation ---------------------------------------------------------------------------
    def create(self) -> "MemoryCap":
        """Create the cgroup and set its limit; raise CgroupUnavailable saying why not."""
        mounts = cgroup_mounts()
        reasons: list[str] = []
        for mount in [m for m in mounts if m.version == 2]:
            try:
                self._create_v2(mount)
                return self
            except CgroupUnavailable as exc:
                reasons.append(str(exc))
        for mount in [m for m in mounts if m.version == 1]:
            try:
                self._create_v1(mount)
                return self
            except CgroupUnavailable as exc:
                reasons.append(str(exc))
        if not mounts:
            raise CgroupUnavailable("no cgroup filesystem is mounted (looked in /proc/self/mountinfo)")
        raise CgroupUnavailable("; ".join(reasons))

    def _create_v2(self, mount: Mount) -> None:
        if "memory" not in (read_text(mount.mountpoint / "cgroup.controllers") or "").split():
            raise CgroupUnavailable(f"cgroup v2 at {mount.mountpoint} has no memory controller")
        own = own_cgroup(2) or "/"
        # Walk up from our own cgroup: a cgroup that holds processes cannot enable
        # controllers for its children ("no internal processes"), except the root.
        candidates = [own]
        while candidates[-1] not in ("/", ""):
            candidates.append(os.path.dirname(candidates[-1].rstrip("/")) or "/")
        last_error = "no usable parent cgroup"
        for cgroup_path in candidates:
            parent = cgroup_dir(mount, cgroup_path)
            if "memory" not in (read_text(parent / "cgroup.controllers") or "").split():
                continue
            if "memory" not in (read_text(parent / "cgroup.subtree_control") or "").split():
                try:
                    (parent / "cgroup.subtree_control").write_text("+memory")
                except OSError as exc:
                    last_error = f"cannot enable the memory controller in {parent}: {_why(exc)}"
                    continue
            path = parent / self.name
            try:
                path.mkdir()
            except OSError as exc:
                last_error = f"cannot create a cgroup under {parent}: {_why(exc)}"
                continue
            try:
                (path / "memory.max").write_text(str(self.cap_bytes))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
            except OSError as exc:
                path.rmdir()
                raise CgroupUnavailable(f"cannot set memory.max in {path}: {_why(exc)}") from None
            self.version, self.path, self._procs_file = 2, path, str(path / "cgroup.procs")
            return
        raise CgroupUnavailable(last_error)

    def _create_v1(self, mount: Mount) -> None:
        parent = cgroup_dir(mount, own_cgroup(1) or "/")
        path = parent / self.name
        try:
            path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create a cgroup under {parent}: {_why(exc)}") from None
        try:
            (path / "memory.limit_in_bytes").write_text(str(self.cap_bytes))
            # memory+swap limit equal to the memory limit = no swap; absent without swap accounting
            if (path / "memory.memsw.limit_in_bytes").exists():
                (path / "memory.memsw.limit_in_bytes").write_text(str(self.cap_bytes))
        except OSError as exc:
            path.rmdir()
            raise CgroupUnavailable(f"cannot set memory.limit_in_bytes in {path}: {_why(exc)}") from None
        self.version, self.path, self._procs_file = 1, path, str(path / "cgroup.procs")

    # -- use --------------------------------------------------------------------------------
    def join(self) -> None:
        """Move the calling process into the cgroup (meant for ``preexec_fn``)."""
        assert self._procs_file is not None, "create() first"
        with open(self._procs_file, "w") as f:
            f.write(str(os.getpid()))

    def report(self) -> dict[str, Any]:
        """Peak usage and OOM counters of the cgroup, read before it is removed."""
        assert self.path is not None, "create() first"
        if self.version == 2:
            events = read_keyed(self.path / "memory.events")
            return {
                "version": 2, "path": str(self.path), "limit": self.cap_bytes,
                "peak": read_int(self.path / "memory.peak"),      # kernel >= 5.19
                "oom_kills": events.get("oom_kill"), "oom_events": events.get("oom"),
                "limit_hits": events.get("max"),
            }
        oom = read_keyed(self.path / "memory.oom_control")
        return {
            "version": 1, "path": str(self.path), "limit": self.cap_bytes,
            "peak": read_int(self.path / "memory.max_usage_in_bytes"),
            "oom_kills": oom.get("oom_kill"), "oom_events": None,   # oom_kill: kernel >= 4.13
            "limit_hits": read_int(self.path / "memory.failcnt"),
        }

    def remove(self) -> int:
        """Kill stragglers left in the cgroup (as SLURM does at job end), remove it.

        Returns how many leftover processes were killed.
        """
        killed: set[int] = set()
        if self.path is None:
            return 0
        for attempt in range(50):
            for pid in [int(p) for p in (read_text(self.path / "cgroup.procs") or "").split()]:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:          # EBUSY until the killed processes are gone
                time.sleep(0.02 * (1 + attempt // 10))
                continue
            self.path = None
            return len(killed)
        raise CgroupUnavailable(f"could not remove {self.path}; remove it by hand with rmdir")

    def __enter__(self) -> "MemoryCap":
        return self.create() if self.path is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def run_in_memory_cap(cmd: Sequence[str], cap_bytes: int,
                      on_start: Callable[[subprocess.Popen], None] | None = None,
                      **popen_kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Run ``cmd`` inside a fresh memory-capped cgroup; return (returncode, report).

    ``on_start`` is called with the Popen object right after the start (e.g. to
    attach a profiler).  Raises CgroupUnavailable when no cgroup can be made.
    """
    with MemoryCap(cap_bytes) as cap:
        proc = subprocess.Popen(list(cmd), preexec_fn=cap.join, **popen_kwargs)
        if on_start is not None:
            on_start(proc)
        returncode = proc.wait()
        return returncode, cap.report()


def format_cap_report(report: dict[str, Any]) -> str:
    """Human summary of :meth:`MemoryCap.report`."""
    def mib(n: int | None) -> str:
        return "n/a" if n is None else f"{n / _MIB:.1f} MiB"

    lines = [f"memory cap {mib(report['limit'])} (cgroup v{report['version']}, {report['path']})",
             f"  cgroup peak usage   {mib(report['peak'])}   (counts page cache too, like SLURM)"]
    if report.get("limit_hits"):
        lines.append(f"  limit reached       {report['limit_hits']} times")
    elif report["peak"] is not None and report["peak"] >= 0.98 * report["limit"]:
        lines.append("  limit reached       yes (peak usage at the cap)")
    kills = report.get("oom_kills")
    if kills:
        lines.append(f"  OOM kills           {kills}  -> the kernel OOM-killed a process: a job with this "
                     "memory limit would die the same way")
    elif kills == 0:
        lines.append("  OOM kills           0  (page cache and mmap'd file pages are reclaimed to stay "
                     "under the cap; anonymous memory cannot be)")
    else:
        lines.append("  OOM kills           unknown (kernel does not report oom_kill)")
    if report.get("leftover_processes_killed"):
        lines.append(f"  killed {report['leftover_processes_killed']} process(es) still running in the cgroup "
                     "after the command exited (as SLURM does at job end)")
    return "\n".join(lines)
