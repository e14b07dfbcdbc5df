"""How much memory this process may use: the machine's RAM or the tightest cgroup limit.

The read path asks it once (``VoxelCacheDataset(prefetch=None)`` prefetches when the cache
cannot stay in the page cache); the build checks an image size against it; the profiler's
memory caps reuse its reading of the cgroup hierarchy. Standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    version: int          # 1 or 2
    mountpoint: Path      # where the hierarchy is mounted
    root: str             # which cgroup path the mount exposes (not "/" inside some containers)


def cgroup_mounts() -> list[Mount]:
    """cgroup2 mounts and cgroup v1 mounts carrying the memory controller."""
    mounts: list[Mount] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, superopts = tail[0], tail[2].split(",")
        mountpoint = Path(fields[4].replace("\\040", " "))
        if fstype == "cgroup2":
            mounts.append(Mount(2, mountpoint, fields[3]))
        elif fstype == "cgroup" and "memory" in superopts:
            mounts.append(Mount(1, mountpoint, fields[3]))
    return mounts


def own_cgroup(version: int) -> str | None:
    """Our cgroup path in the v2 hierarchy or the v1 memory hierarchy."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy_id, controllers, path = line.split(":", 2)
        if version == 2 and hierarchy_id == "0" and controllers == "":
            return path
        if version == 1 and "memory" in controllers.split(","):
            return path
    return None


def cgroup_dir(mount: Mount, cgroup_path: str) -> Path:
    rel = cgroup_path
    if mount.root != "/" and rel.startswith(mount.root):
        rel = rel[len(mount.root):]
    return mount.mountpoint / rel.lstrip("/")


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    text = read_text(path)
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def read_keyed(path: Path) -> dict[str, int]:
    """Parse 'key value' lines (memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in (read_text(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def memory_budget() -> int:
    """Bytes this process may fill with anonymous memory and page cache together.

    The smallest of the machine's RAM and the memory limits of our cgroup and its
    ancestors (what SLURM's ``--mem`` sets), v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``; unlimited levels are skipped.
    """
    budget = None
    for line in (read_text(Path("/proc/meminfo")) or "").splitlines():
        if line.startswith("MemTotal:"):
            budget = int(line.split()[1]) * 1024
    for mount in cgroup_mounts():
        own = own_cgroup(mount.version)
        if own is None:
            continue
        directory = cgroup_dir(mount, own)
        limit_file = "memory.max" if mount.version == 2 else "memory.limit_in_bytes"
        while True:
            limit = read_int(directory / limit_file)  # "max" (v2) reads as None
            if limit is not None and limit < 1 << 60:  # v1 spells "no limit" as ~2**63
                budget = limit if budget is None else min(budget, limit)
            if directory == mount.mountpoint or directory.parent == directory:
                break
            directory = directory.parent
    return budget if budget is not None else 1 << 62
