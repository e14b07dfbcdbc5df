"""Two builds into one --out: the second refuses, naming the first; a dead holder's lock is taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cache_tools import format as fmt
from pipeline.build import InputError, build_cache
from pipeline.lock import STALE_AFTER_S, BuildLock, LockedError, lock_path

from conftest import DATA, small_params

HOLD = "import sys, time; from pipeline.lock import BuildLock\nwith BuildLock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(600)\n"


def test_second_build_refuses_naming_the_first_then_takes_over_a_dead_lock(tmp_path):
    out = tmp_path / "c.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", str(DATA / "1aa5.cif.gz"),
                              "--out", str(out), "--grid-voxels", "9", "--workers", "1", "--quiet"],
                             capture_output=True, text=True)
        assert cli.returncode == 2 and "Traceback" not in cli.stderr
        (line,) = cli.stderr.strip().splitlines()
        assert (f"another build is writing this cache (host {socket.gethostname()}, pid {holder.pid}, "
                f"started {info['started']})") in line and str(lock_path(out)) in line
        assert not out.exists()  # refused before touching anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing: its pid is gone, so the next build takes the lock over.
    assert lock_path(out).exists()
    summary = build_cache([str(DATA / "1aa5.cif.gz")], out, small_params(grid=9), workers=1, progress=False)
    assert summary.origins > 0 and fmt.read_attrs(out).complete is True
    assert not lock_path(out).exists()  # released


def test_lock_of_another_host_is_kept_until_its_heartbeat_stops(tmp_path):
    out = tmp_path / "c.zarr"
    lock_path(out).write_text(json.dumps({"host": "node-17", "pid": 4242, "pid_started": 0.0,
                                          "started": "2026-01-01T00:00:00+00:00", "what": "build"}))
    with pytest.raises(LockedError, match=r"host node-17, pid 4242, started 2026-01-01T00:00:00\+00:00"):
        BuildLock(out).__enter__()
    past = time.time() - STALE_AFTER_S - 5
    os.utime(lock_path(out), (past, past))  # no heartbeat for longer than STALE_AFTER_S: gone
    with BuildLock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            BuildLock(out).__enter__()  # the same process asking twice is refused too
    assert not lock_path(out).exists()


def test_two_cli_builds_at_once(tmp_path):
    """The issue's report: the second build died with a misleading error; now it refuses cleanly."""
    out = tmp_path / "c.zarr"
    args = [sys.executable, "-m", "pipeline.cli", "build-cache", str(DATA / "1c58.cif.gz"), "--out", str(out),
            "--grid-voxels", "11", "--workers", "1", "--quiet"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not lock_path(out).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    second = subprocess.run(args, capture_output=True, text=True)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    check = subprocess.run([sys.executable, "-m", "cache_tools.commands.cli", "check", str(out), "--quiet"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    with pytest.raises(InputError, match="another build"):
        with BuildLock(out):
            build_cache([str(DATA / "1c58.cif.gz")], out, small_params(), workers=1, progress=False)


RACE = ("import sys, time; from pipeline.lock import BuildLock, LockedError\n"
        "go = float(sys.argv[2])\n"
        "while time.time() < go: pass\n"
        "try:\n"
        "    with BuildLock(sys.argv[1]):\n"
        "        print('won', flush=True); time.sleep(1.5)\n"
        "except LockedError:\n"
        "    print('refused', flush=True)\n")


def test_racing_takeovers_of_a_dead_lock_leave_one_winner(tmp_path):
    """Six builds find the same dead holder's lock at the same instant: exactly one proceeds.
    (Removing the stale file and creating one's own is two steps: without a guard, a slower
    racer deletes the winner's fresh lock as the stale one it read.)"""
    out = tmp_path / "c.zarr"
    for round_ in range(4):
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        lock_path(out).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                              "pid_started": 0.0, "started": "then"}))
        go = time.time() + 1.0
        racers = [subprocess.Popen([sys.executable, "-c", RACE, str(out), str(go)], stdout=subprocess.PIPE,
                                   text=True) for _ in range(6)]
        outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
        assert outcomes == ["refused"] * 5 + ["won"], (round_, outcomes)
        assert not lock_path(out).exists()


def test_a_symlink_and_its_target_share_one_lock(tmp_path):
    """Issue 24, item 4: `ln -s lk2.zarr lnk`; a build into lnk while one writes lk2.zarr (or the
    other way round) refused before touching anything, instead of both running and one deleting the
    other's temporaries."""
    target, link = tmp_path / "lk2.zarr", tmp_path / "lnk"
    link.symlink_to(target.name)  # relative, as `ln -s` makes it; the target need not exist yet
    assert lock_path(link) == lock_path(target) == tmp_path / ".lk2.zarr.lock"
    for held, built in ((target, link), (link, target)):
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-cache", str(DATA / "1aa5.cif.gz"),
                                  "--out", str(built), "--grid-voxels", "9", "--workers", "1", "--quiet"],
                                 capture_output=True, text=True)
            assert cli.returncode == 2 and "Traceback" not in cli.stderr, (built, cli.stderr)
            (line,) = cli.stderr.strip().splitlines()
            assert f"{target}: another build is writing this cache" in line and f"pid {holder.pid}" in line
            assert not target.exists()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        lock_path(target).unlink()


def test_overwrite_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    """Issue 24, item 4: --overwrite with a symlinked --out failed ("Cannot call rmtree on a symbolic
    link"); it replaces the contents of the directory the link points to, and the link stays."""
    target, link = tmp_path / "lk2.zarr", tmp_path / "lnk"
    link.symlink_to(target.name)
    files = [str(DATA / "1aa5.cif.gz")]
    first = build_cache(files, link, small_params(grid=9), workers=1, progress=False)
    assert first.out == str(target) and fmt.read_attrs(target).params.image.grid_voxels == 9
    replaced = build_cache(files, link, small_params(grid=11), workers=1, progress=False, overwrite=True)
    assert replaced.out == str(target) and not replaced.resumed and replaced.origins == first.origins
    assert link.is_symlink() and os.readlink(link) == "lk2.zarr" and target.is_dir() and not target.is_symlink()
    assert fmt.read_attrs(link).complete and fmt.VoxelLayout(link).image_shape == (4, 11, 11, 11)
    assert not lock_path(target).exists()
