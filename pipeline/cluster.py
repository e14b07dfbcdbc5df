"""Running build tasks on dask: the client, a wrapper per task, waiting with a progress bar.

Tasks are plain top-level functions (they pickle by reference). A task's OSError (a full
disk) comes back as a value, so dask logs no traceback on the worker's terminal, and the
caller re-raises it for the "rerun to resume" message; any other task error aborts the
build with its message. Tasks measure the worker's peak RSS with the two helpers below.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pipeline.errors import BuildError


@dataclass(frozen=True)
class TaskOSError:
    """An OSError of a task (a full disk, a store that became unwritable), returned, not raised:
    raised, dask would log its traceback on the worker, i.e. on the terminal of a local build."""

    errno: int | None
    strerror: str
    filename: str | None


def run_task(task: Callable, *args: Any) -> Any:
    """``task(*args)``, its OSError returned as a TaskOSError (submit this, not the task)."""
    try:
        return task(*args)
    except OSError as exc:
        return TaskOSError(exc.errno, exc.strerror or str(exc),
                           None if exc.filename is None else os.fsdecode(exc.filename))


def wait_all(futures: list, *, total: int, initial: int, desc: str, unit: str, progress: bool,
             weight: Callable[[Any], int]) -> list:
    """Wait for futures with a tqdm bar; a task error aborts the build with its message."""
    from distributed import as_completed
    from tqdm import tqdm

    results = []
    with tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not progress,
              dynamic_ncols=True, smoothing=0.1) as bar:
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:
                for f in futures:
                    f.cancel()
                raise BuildError(f"{desc} task failed: {type(exc).__name__}: {exc}") from exc
            if isinstance(result, TaskOSError):  # e.g. a full disk: the caller says "rerun to resume"
                for f in futures:
                    f.cancel()
                raise OSError(result.errno, result.strerror, result.filename)
            results.append(result)
            bar.update(weight(result))
    return results


class dask_client:
    """A Client on ``scheduler`` (address or DASK_SCHEDULER_ADDRESS), else a LocalCluster."""

    def __init__(self, workers: int | None, scheduler: str | None):
        self.workers = workers
        self.scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self.cluster = None
        self.client = None

    def __enter__(self):
        from distributed import Client, LocalCluster

        if self.scheduler:
            try:
                # The connect timeout is dask's own setting (distributed.comm.timeouts.connect).
                self.client = Client(self.scheduler)
            except (OSError, TimeoutError) as exc:
                raise BuildError(f"cannot connect to dask scheduler {self.scheduler}: {exc}") from None
            return self.client
        n = self.workers or max(1, os.cpu_count() or 1)
        # No dashboard; the scheduler's small HTTP server (health, metrics) still starts, so
        # give it any free local port: its default, 8787, prints a warning when taken.
        # Ctrl-C goes to the whole process group: workers ignore it (pipeline.worker_setup, run
        # as each worker starts), so only this process stops, and it shuts the cluster down,
        # instead of each worker dying with a page of tracebacks.
        try:
            self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR,
                                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                        preload=["pipeline.worker_setup"])
            self.client = Client(self.cluster)
        except KeyboardInterrupt:
            self.__exit__(KeyboardInterrupt, None, None)
            raise
        return self.client

    def __exit__(self, exc_type, *exc):
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        if interrupted:  # closing with tasks in flight logs cancelled comms: expected, so unsaid
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
        if self.cluster is not None:  # the outcome is decided; shutdown races are not news
            with contextlib.suppress(Exception):
                self.client.run(quiet_worker_logs)
        with sigint_ignored() if interrupted else contextlib.nullcontext():  # a second Ctrl-C: still quiet
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        return False


def quiet_worker_logs() -> None:
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside (the main thread only may change handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: clear_refs 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since reset_peak_rss (the task's, on a worker)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
