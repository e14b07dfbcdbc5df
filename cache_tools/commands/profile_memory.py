"""`cache-tools profile-memory`: what a training run really uses, per process.

    cache-tools profile-memory [--out DIR] [--interval S] [--memory-cap SIZE] -- python train.py ...
    cache-tools profile-memory [--out DIR] [--interval S] --pid PID

With a COMMAND: run it (stdio inherited), sample it and all its descendants until
it exits, then exit with its exit code.  With --pid: attach to a running process,
follow its children as they come and go, stop when it exits or on Ctrl-C.
Writes DIR/memory.csv (memory columns in bytes), marks.csv, memory.png,
summary.json; prints the summary to stdout (after the command's own output).  --memory-cap runs the command in a cgroup with that hard limit, to
rehearse a SLURM ``--mem`` before queueing the job.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROG = "cache-tools profile-memory"


class _UsageError(Exception):
    """A one-line reason to exit with status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("%(prog)s [--out DIR] [--interval SECONDS] [--memory-cap SIZE] "
                    "(--pid PID | -- COMMAND ...)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (default: profile-memory-YYYYmmdd-HHMMSS)")
    parser.add_argument("--interval", metavar="SECONDS", default="1",
                        help="seconds between samples (default 1)")
    parser.add_argument("--memory-cap", metavar="SIZE", default=None,
                        help="run COMMAND under a hard cgroup memory limit, e.g. 16G, to rehearse "
                             "a SLURM --mem (needs root or a delegated cgroup)")
    parser.add_argument("--pid", metavar="PID", default=None,
                        help="attach to this running process instead of starting COMMAND")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="the command to run and profile")


def _parse(args: argparse.Namespace) -> tuple[list[str], int | None, float, int | None, Path]:
    from cache_tools.profiler import parse_size

    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    pid = None
    if args.pid is not None:
        try:
            pid = int(args.pid)
        except ValueError:
            raise _UsageError(f"--pid expects a process id, got {args.pid!r}") from None
        if pid <= 0:
            raise _UsageError(f"no process with pid {pid}")
    if pid is not None and command:
        raise _UsageError("give either --pid or a COMMAND, not both")
    if pid is None and not command:
        raise _UsageError("missing COMMAND (usage: profile-memory [options] -- COMMAND ...) or --pid PID")
    try:
        interval = float(args.interval)
    except ValueError:
        interval = -1.0
    if not 0.01 <= interval <= 3600:
        raise _UsageError(f"--interval must be between 0.01 and 3600 seconds, got {args.interval!r}")
    cap = None
    if args.memory_cap is not None:
        try:
            cap = parse_size(args.memory_cap)
        except ValueError as exc:
            raise _UsageError(f"--memory-cap: {exc}") from None
        if cap < 1 << 20:
            raise _UsageError(f"--memory-cap {args.memory_cap} is below 1 MiB")
        if pid is not None:
            raise _UsageError("--memory-cap needs a COMMAND to start; it cannot cap a running --pid")
    out = Path(args.out) if args.out else Path(time.strftime("profile-memory-%Y%m%d-%H%M%S"))
    return command, pid, interval, cap, out


def _exit_status(returncode: int) -> int:
    """Shell convention: killed by signal N -> 128 + N (an OOM kill shows as 137)."""
    return 128 - returncode if returncode < 0 else returncode


def _report(summary: dict[str, Any], cap_report: dict[str, Any] | None, returncode: int | None) -> None:
    from cache_tools.profiler import format_cap_report, format_summary

    text = format_summary(summary)
    if cap_report is not None:
        text += "\n" + format_cap_report(cap_report)
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        text += f"\n  the command was killed by signal {-returncode} ({name})"
        if cap_report and cap_report.get("oom_kills"):
            text += ": OOM kill under the memory cap"
    print(text, flush=True)  # the report is the command's result: stdout (errors go to stderr)


def _run_command(command: list[str], interval: float, cap_bytes: int | None, out: Path) -> int:
    import json

    from cache_tools.profiler import MemoryCap, MemoryProfiler

    cap = MemoryCap(cap_bytes).create() if cap_bytes else None   # CgroupUnavailable -> exit 2
    try:
        try:
            child = subprocess.Popen(command, preexec_fn=cap.join if cap else None)
        except FileNotFoundError:
            raise _UsageError(f"command not found: {command[0]}") from None
        except PermissionError:
            raise _UsageError(f"cannot execute {command[0]}: permission denied") from None
        except subprocess.SubprocessError as exc:   # preexec_fn failed: could not join the cgroup
            raise _UsageError(f"cannot start the command in cgroup {cap.path if cap else ''}: {exc}") from None

        # Ctrl-C in a terminal reaches the command too: let it decide, and wait for it
        # (like `time`).  A SIGTERM (scancel, timeout) aimed at us is passed on.
        def forward(signum: int, _frame: Any) -> None:
            if signum == signal.SIGTERM and child.poll() is None:
                child.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                prof = MemoryProfiler(out, interval=interval, pid=child.pid, memory_cap=cap_bytes,
                                      print_summary=False).start()
            except BaseException:     # e.g. DIR not writable: do not leave the command orphaned
                child.kill()
                child.wait()
                raise
            returncode = child.wait()
            summary = prof.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        cap_report = cap.report() if cap else None
    finally:
        if cap is not None:
            leftovers = cap.remove()
            if cap_report is not None:
                cap_report["leftover_processes_killed"] = leftovers
    summary.update(command=command, returncode=returncode, cgroup=cap_report)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _report(summary, cap_report, returncode)
    return _exit_status(returncode)


def _run_attached(pid: int, interval: float, out: Path) -> int:
    from cache_tools.profiler import MemoryProfiler

    prof = MemoryProfiler(out, interval=interval, pid=pid, print_summary=False).start()
    print(f"{PROG}: sampling pid {pid} and its descendants every {interval:g} s into {out}/ "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    # Ctrl-C, or SIGTERM from `timeout`/scancel, ends the profile (not the target) and
    # writes the outputs.  Installed explicitly: a shell may start us with SIGINT ignored.
    stop_requested = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop_requested.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop_requested.is_set() and not prof.wait(timeout=0.2):
            pass
        summary = prof.stop()       # a second Ctrl-C here must not leave half-written outputs
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _report(summary, None, None)
    return 0


def run(args: argparse.Namespace) -> int:
    from cache_tools.profiler import CgroupUnavailable, ProfilerUnavailable, check_available

    out: Path | None = None
    created_out = False
    try:
        command, pid, interval, cap, out = _parse(args)
        check_available(pid)
        created_out = not out.exists()
        out.mkdir(parents=True, exist_ok=True)     # before starting anything
        if pid is not None:
            return _run_attached(pid, interval, out)
        return _run_command(command, interval, cap, out)
    except (_UsageError, ProfilerUnavailable, CgroupUnavailable, OSError) as exc:
        if isinstance(exc, OSError):
            reason = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
        else:
            reason = str(exc)
        print(f"{PROG}: {reason}", file=sys.stderr)
        if created_out and out is not None:
            try:
                out.rmdir()      # leave nothing behind when nothing ran
            except OSError:
                pass
        return 2
