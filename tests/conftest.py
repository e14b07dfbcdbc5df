"""Shared fixtures: small real caches built from the bundled mmCIF files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cache_tools import format as fmt
from pipeline.build import BuildParams, build_cache
from pipeline.origins import OriginRule
from pipeline.parse import parse_channels
from pipeline.voxelize import ImageSpec, Storage

DATA = Path(__file__).parent / "data" / "mmcif"
SMALL_FILES = ["1aa5.cif.gz", "171l.cif.gz", "1c58.cif.gz", "3fy3.cif.gz", "1qjg_clean.cif"]
THREE = ["1aa5.cif.gz", "171l.cif.gz", "3fy3.cif.gz"]


def small_params(dtype: str = "float32", rotations: int = 1, grid: int = 11, max_origins: int = 12,
                 **kw) -> BuildParams:
    channels = parse_channels("C,N,O,*")
    return BuildParams(channels=channels, image=ImageSpec(grid, 1.0, len(channels), 0.5),
                       storage=Storage(dtype), rule=OriginRule(max_per_structure=max_origins),
                       rotations=rotations, **kw)


def build_small(out: Path, files=SMALL_FILES, workers: int = 1, **kw):
    return build_cache([str(DATA / f) for f in files], out, small_params(**kw), workers=workers,
                       progress=False)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    """The README's sample: every bundled mmCIF, the default parameters of `pipeline build-cache`."""
    from pipeline.cli import build_parser, params_from_args

    out = tmp_path_factory.mktemp("sample") / "sample.zarr"
    args = build_parser().parse_args(["build-cache", str(DATA), "--out", str(out)])
    build_cache([str(DATA)], out, params_from_args(args), workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def cache_factory(tmp_path_factory):
    """Build (once per session) a small cache for each storage dtype / rotation count asked for."""
    built: dict[tuple, Path] = {}

    def make(dtype: str = "float32", rotations: int = 1, compression: str = "none") -> Path:
        key = (dtype, rotations, compression)
        if key not in built:
            out = tmp_path_factory.mktemp(f"cache-{dtype}-{rotations}-{compression}") / "cache.zarr"
            build_small(out, workers=2, dtype=dtype, rotations=rotations, compression=compression)
            built[key] = out
        return built[key]

    return make


@pytest.fixture()
def copy_of():
    """Copy a built cache to a scratch location so a test may damage it."""
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst
    return copy


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store, with build timestamps removed from the root attributes."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(root))
            data = path.read_bytes()
            if rel == "zarr.json":
                meta = json.loads(data)
                meta["attributes"][fmt.ATTRS_KEY].pop("build")
                data = json.dumps(meta, sort_keys=True).encode()
            files[rel] = data
    return files


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (tmpfs pages are shmem, not page cache)."""
    best, fstype = "", "?"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mountpoint = left.split()[4]
        if str(path.resolve()).startswith(mountpoint) and len(mountpoint) > len(best):
            best, fstype = mountpoint, right.split()[0]
    return fstype


@pytest.fixture(scope="session")
def lattice_factory(tmp_path_factory):
    """Lattice caches of the sample files (and their per-origin twins), built once each."""
    built: dict[tuple, Path] = {}

    def make(files=tuple(THREE), dtype="uint8", compression="zstd", layout="lattice", rotations=1,
             grid=21) -> Path:
        key = (tuple(files), dtype, compression, layout, rotations, grid)
        if key not in built:
            out = tmp_path_factory.mktemp(f"lattice-{layout}-{dtype}-{compression}-{rotations}") / "c.zarr"
            params = small_params(dtype=dtype, grid=grid, max_origins=40, compression=compression, layout=layout,
                                  rotations=rotations)
            build_cache([str(DATA / f) for f in files], out, params, workers=2, progress=False)
            built[key] = out
        return built[key]

    return make


def sigint_while_waiting_on(fifo: Path, command: list, **popen) -> tuple[int, str]:
    """Run ``command`` (which reads ``fifo``) with SIGINT ignored, as ``cmd &`` from a script
    starts it; once it has opened the FIFO, send SIGINT, then close the FIFO empty (a command
    that ignored SIGINT ends then). Returns (exit code, stderr)."""
    import os
    import signal
    import subprocess
    import time

    os.mkfifo(fifo)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), **popen)
    deadline = time.time() + 120
    while True:  # a writer can open a FIFO only once its reader has: then the command is running
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: not opened for reading yet
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
    try:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # SIGINT ignored: still waiting on the FIFO
    finally:
        os.close(writer)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr
