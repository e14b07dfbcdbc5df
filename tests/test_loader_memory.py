"""Loader memory, small and real: forked DataLoader workers over a real cache, real /proc.

The claims of benchmarks/loader_memory.py in miniature, with its harness
(``cache_tools.profiler.phases.run_phases``: train + val loaders with persistent workers, snapshots of every
worker's smaps_rollup at each epoch and validation start and end):

* a VoxelCacheDataset worker does not grow from epoch to epoch -- and the same check
  does catch a Dataset that leaks, so it can fail;
* under a cgroup memory cap smaller than the cache's one shard file, 4 workers read
  every origin, correctly. CI runs as root: when no cgroup can be made this test
  FAILS with the reason rather than skipping.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cache_tools import VoxelCacheDataset
from cache_tools import format as fmt
from cache_tools.profiler.cgroup import CgroupUnavailable, MemoryCap
from pipeline.build import BuildParams, build_cache
from pipeline.origins import OriginRule
from pipeline.parse import parse_channels
from pipeline.voxelize import ImageSpec, Storage

from conftest import DATA, SMALL_FILES, fs_type

from cache_tools.profiler.phases import make_loaders, run_phases

REPO = Path(__file__).resolve().parents[1]

MB = 10**6
MiB = 1 << 20
GROWTH_LIMIT = 4 * MB
CHANNELS = parse_channels("C,N,O,*")


def _build(out: Path, grid: int, resolution: float, dtype: str, per_structure: int, single_shard: bool = False):
    params = BuildParams(channels=CHANNELS, image=ImageSpec(grid, resolution, len(CHANNELS), 0.5),
                         storage=Storage(dtype), rule=OriginRule(min_neighbors=0, min_spacing_A=0,
                                                                 max_per_structure=per_structure),
                         origins_per_shard=per_structure * len(SMALL_FILES) if single_shard else 0)
    return build_cache([str(DATA / f) for f in SMALL_FILES], out, params, workers=2, progress=False)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """400 origins of 4 x 11^3 uint8: 2 MB in all, so file pages alone cannot fake 4 MB of growth."""
    out = tmp_path_factory.mktemp("loadermem") / "small.zarr"
    summary = _build(out, grid=11, resolution=1.0, dtype="uint8", per_structure=80)
    assert summary.origins == 400
    return out


class LeakyDataset(torch.utils.data.Dataset):
    """A cache Dataset that keeps every item's bytes: the growth the harness must catch."""

    def __init__(self, inner: VoxelCacheDataset) -> None:
        self.inner = inner
        self.kept: list[bytes] = []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        item = self.inner[index]
        self.kept.append(item["image"].numpy().tobytes())
        return item


def worker_growth(log: dict, phase: str) -> dict[int, int]:
    """Per worker of ``phase``: USS at the end of its last pass minus at the end of its first."""
    name = "epoch" if phase == "train" else "validation"
    snaps = [s for s in log["snapshots"] if s["label"].startswith(name) and s["label"].endswith(" end")]
    first, last = snaps[0]["procs"], snaps[-1]["procs"]
    pids = log[f"{phase}_pids"]
    missing = [pid for pid in pids if pid not in first or pid not in last]
    assert not missing, f"{phase} workers {missing} were not measured at both ends (did they restart?)"
    return {pid: last[pid]["uss"] - first[pid]["uss"] for pid in pids}


def run_and_measure(dataset, loader: str, epochs: int = 4) -> tuple[dict, dict[str, dict[int, int]]]:
    """Train (full passes) + val loaders, 2 persistent forked workers each, ``epochs`` epochs."""
    train, val = make_loaders(dataset, loader, workers=2, batch_size=16, steps=None, val_steps=4)
    log = run_phases(train, val, epochs)
    assert [s["label"] for s in log["snapshots"][:4]] == ["epoch 1 start", "epoch 1 end",
                                                          "validation 1 start", "validation 1 end"]
    assert sum(p["images"] for p in log["phases"] if p["phase"] == "train") == epochs * len(dataset)
    return log, {phase: worker_growth(log, phase) for phase in ("train", "val")}


def too_much_growth(growth: dict[str, dict[int, int]]) -> list[str]:
    return [f"{phase} worker {pid} grew {g / MB:.1f} MB" for phase, per in growth.items()
            for pid, g in per.items() if g > GROWTH_LIMIT]


def test_cache_workers_stay_flat_and_the_check_catches_a_leak(small_cache):
    log, growth = run_and_measure(VoxelCacheDataset(small_cache), "cache")
    assert len(log["train_pids"]) == 2 and len(log["val_pids"]) == 2
    assert set(log["train_pids"]).isdisjoint(log["val_pids"]), "train and val loaders must have their own workers"
    assert too_much_growth(growth) == [], (
        f"cache workers' USS grew between the end of epoch 1 and the end of epoch 4: {growth}")

    # Same harness, same check, a Dataset that keeps ~21 kB per item: ~4 MB per worker per epoch.
    _, leaky = run_and_measure(LeakyDataset(VoxelCacheDataset(small_cache)), "leaky")
    caught = too_much_growth({"train": leaky["train"]})
    assert len(caught) == 2, f"the check missed a leaking worker: {leaky['train']}"
    assert min(leaky["train"].values()) > 2 * GROWTH_LIMIT


CAPPED_CHILD = """
import sys, numpy as np, torch
from torch.utils.data import DataLoader
from cache_tools import VoxelCacheDataset, batch_collate
cache, out, check = sys.argv[1], sys.argv[2], {int(x) for x in sys.argv[3].split(",")}
ds = VoxelCacheDataset(cache)
loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=4, persistent_workers=True,
                    collate_fn=batch_collate, multiprocessing_context="fork")
seen = np.zeros(len(ds), np.int64)
kept = {}
for epoch in range(2):
    for batch in loader:
        ids = batch["origin_id"].numpy()
        seen[ids] += 1
        for k, origin in enumerate(ids.tolist()):
            if origin in check:
                kept[origin] = batch["image"][k].numpy().copy()
np.savez(out, seen=seen, ids=np.array(sorted(kept)), images=np.stack([kept[o] for o in sorted(kept)]))
print("done, prefetch", ds.prefetch, flush=True)
"""


def test_cache_loader_under_a_cap_smaller_than_its_shard_file(tmp_path):
    cap_bytes = 300 * MiB
    try:
        MemoryCap(cap_bytes).create().remove()
    except CgroupUnavailable as exc:
        pytest.fail(f"cannot create a memory-capped cgroup (needs root; CI runs as root): {exc}")
    assert fs_type(tmp_path) not in ("tmpfs", "ramfs"), (
        f"{tmp_path} is on tmpfs: its pages are shmem, not reclaimable; run pytest with --basetemp on disk")
    # 800 origins of 4 x 32^3 float32 (512 KiB each) in ONE shard file of 400 MiB > the 300 MiB cap.
    cache = tmp_path / "big.zarr"
    summary = _build(cache, grid=32, resolution=0.5, dtype="float32", per_structure=160, single_shard=True)
    layout = fmt.VoxelLayout(cache)
    assert summary.origins == 800 and layout.n_shards == 1 and layout.shard_path(0).stat().st_size > cap_bytes
    for f in (p for p in cache.rglob("*") if p.is_file()):   # pages cached now are charged to us, not the cap
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    check = [0, 1, 399, 400, 799]
    out = tmp_path / "kept.npz"
    with MemoryCap(cap_bytes) as cap:
        child = subprocess.Popen([sys.executable, "-W", "ignore", "-c", CAPPED_CHILD, str(cache), str(out),
                                  ",".join(map(str, check))], preexec_fn=cap.join, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            pytest.fail(f"no finish within 120 s under a {cap_bytes // MiB} MiB cap: {cap.report()}")
        report = cap.report()
    # prefetch=None (auto) saw a cache larger than half its cgroup's limit and turned it on
    assert child.returncode == 0 and stdout.strip() == "done, prefetch True", (
        f"the cache loader did not complete under the cap (exit {child.returncode}, cgroup {report}): "
        f"{stderr[-2000:]}")
    assert report["oom_kills"] == 0, report
    assert report["peak"] is None or report["peak"] >= 0.8 * cap_bytes, (
        f"the cap was never approached ({report}): the test did not exercise it")

    kept = np.load(out)
    assert (kept["seen"] == 2).all(), "every origin must be read once per epoch"
    assert kept["ids"].tolist() == check
    voxels = zarr.open_group(str(cache), mode="r")["voxels"]
    for origin, image in zip(kept["ids"], kept["images"]):
        expected = voxels[int(origin)]
        assert image.dtype == np.float32 and np.array_equal(image, expected), f"origin {origin} differs from zarr"
        assert image.any(), f"origin {origin} is all zeros"
