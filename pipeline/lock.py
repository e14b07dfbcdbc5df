"""One build per cache: a lock file beside the store that names its holder.

``CACHE`` is guarded by ``.CACHE.lock`` in the same directory (beside, not inside, so
that ``--overwrite`` may replace the store and a non-cache directory is never touched).
The path is resolved first (``os.path.realpath``): a symlink to a cache and the cache
itself are one cache with one lock, whichever name each build was given.
It is created with ``O_CREAT | O_EXCL``, which is atomic on local filesystems and on the
shared ones builds with ``--scheduler`` use (NFSv3 and later, Lustre, GPFS, BeeGFS),
unlike ``flock``/``fcntl`` locks, which some NFS and Lustre mounts ignore or refuse. The
file holds the holder's host, pid, process start time and the build's start time, so a
second build refuses with a message naming the first.

A lock left by a build that died (kill -9, a node lost) is taken over when its holder is
provably gone: on the same host, when that pid is not running (or is another process,
told apart by its start time); from any host, when the holder has not refreshed the
file for ``STALE_AFTER_S`` (a live holder touches it every ``HEARTBEAT_S``). Builds that
find the same dead lock at once take it over one at a time (a second exclusive file
guards judging and removing it), so exactly one proceeds. Not
covered: filesystems without atomic exclusive create (NFSv2, some FUSE/object-store
mounts such as s3fs): there two builds started within the same instant may both proceed.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: the holder is gone (clock skew between hosts allowed)


class LockedError(Exception):
    """Another build holds the cache; str() names it."""


def lock_path(root: str | os.PathLike) -> Path:
    """The lock of the cache ``root`` names (a symlink's target: one lock per directory)."""
    root = Path(os.path.realpath(root))
    return root.parent / f".{root.name}.lock"


def _me() -> dict:
    proc = psutil.Process()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": proc.create_time(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _holder_gone(holder: dict, mtime: float) -> bool:
    if time.time() - mtime > STALE_AFTER_S:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["pid_started"])) > 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return True
    except psutil.Error:
        return False


class BuildLock:
    """``with BuildLock(root):`` holds the cache's lock, refreshing it, until the block ends."""

    def __init__(self, root: str | os.PathLike, what: str = "build"):
        self.root = Path(os.path.realpath(root))
        self.path = lock_path(self.root)
        self.what = what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "BuildLock":
        me = {**_me(), "what": self.what}
        for _ in range(100):  # retries only while another process is mid-takeover (~ms each)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # as the build would for --out
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()  # raises LockedError while the holder lives
                continue
            except OSError as exc:  # e.g. the directory is not writable: say so about the cache
                raise OSError(exc.errno, exc.strerror, str(self.root)) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="build-lock")
            self._thread.start()
            return self
        raise LockedError(f"{self.path}: cannot take the build lock (it keeps reappearing)")

    def _take_over_if_stale(self) -> None:
        """Remove a dead holder's lock (the caller retries the create), else raise LockedError.

        Judging and removing are two steps, so they run under a second exclusive file,
        ``<lock>.takeover``: otherwise a racer that judged the dead holder's file could
        delete the fresh lock of the racer that removed it first.
        """
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # someone else is taking over; a guard this old lost its owner
            try:
                if time.time() - guard.stat().st_mtime > HEARTBEAT_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        try:
            self._judge_and_remove()
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def _judge_and_remove(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
            holder = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):  # being written this instant, or garbage: judged by its age
            holder = {}
        if not isinstance(holder, dict):
            holder = {}
        if _holder_gone(holder, mtime) if holder else time.time() - mtime > HEARTBEAT_S:
            self.path.unlink(missing_ok=True)
            return
        raise LockedError(
            f"{self.root}: another {holder.get('what', 'build')} is writing this "
            f"cache (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
            f"{holder.get('started', '?')}); wait for it to finish, then rerun this command (it resumes). "
            f"If that process is gone, delete {self.path}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if json.loads(self.path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        return False
