"""build-cache on an existing dask cluster: a real scheduler and two real workers on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_tools import format as fmt

from conftest import DATA, SMALL_FILES
from test_build import store_files

BIN = Path(sys.executable).parent
ARGS = [*[str(DATA / f) for f in SMALL_FILES], "--grid-voxels", "17", "--max-origins-per-structure", "30",
        "--origins-per-shard", "3", "--quiet"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture()
def cluster(tmp_path):
    """`dask scheduler` and two single-threaded `dask worker`s on 127.0.0.1.

    They run in their own sessions; if pytest itself is killed, the scheduler ends after
    5 idle minutes and the workers 30 s after it, instead of living on as orphans."""
    scheduler_file = tmp_path / "scheduler.json"
    procs = [start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--idle-timeout", "300s",
                    "--no-dashboard", "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")]
    wait_for(scheduler_file.exists, 60, "the scheduler file")
    for k in range(2):
        procs.append(start([str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                            "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--name", f"w{k}",
                            "--death-timeout", "30s",
                            "--local-directory", str(tmp_path / f"w{k}")], tmp_path / f"worker{k}.log"))
    address = json.loads(scheduler_file.read_text())["address"]
    from distributed import Client
    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
    try:
        yield address, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_build_on_existing_cluster_survives_a_killed_worker(tmp_path, cluster):
    address, procs = cluster
    reference = tmp_path / "local.zarr"
    subprocess.run([str(BIN / "pipeline"), "build-cache", *ARGS, "--out", str(reference), "--workers", "1"],
                   check=True, capture_output=True)
    out = tmp_path / "remote.zarr"
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": address}  # the env var is the --scheduler default
    build = subprocess.Popen([str(BIN / "pipeline"), "build-cache", *ARGS, "--out", str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = out / fmt.BUILD_DIR / "done"
    wait_for(lambda: done.exists() and len(list(done.glob("*.npz"))) >= 4, 120, "the first shards")
    os.killpg(procs[1].pid, signal.SIGKILL)  # worker w1 (nanny and worker) dies mid-build
    stdout, stderr = build.communicate(timeout=300)
    assert build.returncode == 0, stderr
    n_shards = fmt.VoxelLayout(out).n_shards
    assert n_shards > 8
    a, b = store_files(reference), store_files(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    assert procs[1].poll() is not None and procs[2].poll() is None


def test_unreachable_scheduler_is_one_line(tmp_path):
    proc = subprocess.run([str(BIN / "pipeline"), "build-cache", str(DATA / "1aa5.cif.gz"), "--out",
                           str(tmp_path / "x.zarr"), "--scheduler", "tcp://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"})
    assert proc.returncode == 1
    assert "cannot connect to dask scheduler tcp://127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
