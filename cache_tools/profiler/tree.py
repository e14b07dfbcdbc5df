"""The profiled process tree: who belongs to it (psutil) and what each process is
(main program, DataLoader worker, other)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import psutil

ROLES = ("main", "worker", "other")


class Proc(NamedTuple):
    """What one sample needs to know about a process (from psutil, one /proc read each)."""
    pid: int
    ppid: int
    name: str         # comm
    cmdline: str
    exe: str          # basename of the executable
    started: float    # creation time: tells a reused pid apart


@dataclass(frozen=True)
class ProcessInfo:
    """A process of the profiled tree."""
    pid: int
    ppid: int
    name: str         # comm
    cmdline: str
    role: str         # "main", "worker" or "other"
    started: float    # creation time (seconds since the epoch)


def _proc(p: psutil.Process) -> Proc | None:
    """None for a process that is gone or a zombie (nothing mapped any more)."""
    try:
        with p.oneshot():
            if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            try:
                exe = os.path.basename(p.exe())
            except (psutil.AccessDenied, psutil.ZombieProcess, OSError):
                exe = ""
            try:
                cmdline = " ".join(p.cmdline())
            except (psutil.AccessDenied, psutil.ZombieProcess):
                cmdline = ""
            return Proc(p.pid, p.ppid(), p.name(), cmdline, exe, p.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def tree_processes(root: int, followed: Iterable[tuple[int, float]] = ()) -> dict[int, Proc]:
    """``root`` and its descendants now, plus the ``followed`` (pid, started) still alive
    (processes seen before that were re-parented out of the tree, e.g. daemonized)."""
    try:
        top = psutil.Process(root)
        members = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        members = []
    seen = {p.pid for p in members}
    for pid, started in followed:
        if pid not in seen:
            try:
                p = psutil.Process(pid)
                if p.create_time() == started:
                    members.append(p)
            except psutil.NoSuchProcess:
                pass
    procs = {}
    for p in members:
        info = _proc(p)
        if info is not None:
            procs[info.pid] = info
    return procs


def _is_python(name: str, exe: str) -> bool:
    # torch renames threads (pt_main_thread, pt_data_worker), so look at the executable too
    return exe.startswith("python") or name.startswith(("python", "pt_"))


def assign_roles(root: int, procs: dict[int, Proc]) -> dict[int, str]:
    """Label the tree (``procs``: pid -> Proc).

    * main: the root -- unless the root is a non-Python launcher (``bash run.sh``,
      ``uv run``, ``srun``) with a single child chain; then the first Python
      process down that chain is main and the launchers are "other".
    * worker: torch's DataLoader workers name themselves ``pt_data_worker``; failing
      that, spawn/forkserver children (``multiprocessing`` in their cmdline), and any
      Python process forked directly by main (a forked worker has main's cmdline).
    * other: everything else, including the resource tracker and forkserver.
    """
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)

    def python(pid: int) -> bool:
        return _is_python(procs[pid].name, procs[pid].exe)

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
    for pid, p in procs.items():
        cmdline = p.cmdline
        parent = procs.get(p.ppid)
        parent_is_forkserver = parent is not None and "multiprocessing.forkserver" in parent.cmdline
        if pid == main:
            role = "main"
        elif p.name == "pt_data_worker":
            role = "worker"
        elif parent_is_forkserver and python(pid):
            role = "worker"      # forkserver children inherit the forkserver's cmdline
        elif is_helper(cmdline):
            role = "other"
        elif "multiprocessing" in cmdline and python(pid):
            role = "worker"      # spawn_main(...) --multiprocessing-fork
        elif p.ppid == main and main_is_python and python(pid):
            role = "worker"      # forked by main; torch names nothing before the worker loop
        else:
            role = "other"
        roles[pid] = role
    return roles



def process_tree(root_pid: int) -> list[ProcessInfo]:
    """``root_pid`` and all its descendants, labelled main / worker / other."""
    procs = tree_processes(root_pid)
    if root_pid not in procs:
        return []
    roles = assign_roles(root_pid, procs)
    return [ProcessInfo(p.pid, p.ppid, p.name, p.cmdline, roles[p.pid], p.started) for p in procs.values()]
