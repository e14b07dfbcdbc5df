"""The loader-memory harness: train + val loaders alive together, a snapshot of every
process's smaps at each epoch and validation start and end (benchmarks/loader_memory.py
and the tests use it)."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from cache_tools.profiler.proc import process_memory
from cache_tools.profiler.tree import process_tree

SUM_KEYS = ("pss_anon", "pss_file", "pss_shmem", "rss", "pss")


def take_snapshot(label: str, roles: dict[int, str], root: int | None = None) -> dict[str, Any]:
    """Memory of every process of the tree under ``root`` (default: this process) right now.

    ``roles`` names known pids ("train-worker", "val-worker"); the root is "main", any
    other descendant "other". Sums (Σ over the tree) are under ``sums``.
    """
    root = os.getpid() if root is None else root
    procs: dict[int, dict[str, Any]] = {}
    for p in process_tree(root):
        mem = process_memory(p.pid)
        if mem is not None:
            procs[p.pid] = {"role": "main" if p.pid == root else roles.get(p.pid, "other"), **mem}
    return {"label": label, "t": time.monotonic(), "procs": procs,
            "sums": {k: sum(v[k] for v in procs.values()) for k in SUM_KEYS}}


def worker_pids(iterator: Any) -> list[int]:
    """Pids of a multi-process DataLoader iterator's workers, in worker-id order."""
    return [w.pid for w in getattr(iterator, "_workers", [])]


def run_phases(train_loader: Any, val_loader: Any, epochs: int,
               emit: Callable[[dict], None] = lambda event: None,
               snapshot: Callable[[str, dict[int, str]], dict] = take_snapshot) -> dict[str, Any]:
    """Run ``epochs`` epochs of training batches, each followed by a validation pass.

    Takes a snapshot at the start (right after ``iter()``, which starts persistent
    workers the first time) and at the end of every epoch and validation, and emits
    ``mark`` events at epoch and validation starts and a ``progress`` event per batch.
    Snapshot time is excluded from the phase timings. Returns snapshots, phases
    (images, seconds) and the worker pids.
    """
    roles: dict[int, str] = {}
    out: dict[str, Any] = {"snapshots": [], "phases": [], "train_pids": [], "val_pids": []}
    images = 0

    def snap(label: str) -> None:
        s = snapshot(label, roles)
        out["snapshots"].append(s)
        emit({"event": "snapshot", **s})

    for epoch in range(1, epochs + 1):
        for phase, loader in (("train", train_loader), ("val", val_loader)):
            name = f"epoch {epoch}" if phase == "train" else f"validation {epoch}"
            emit({"event": "mark", "label": name})
            if phase == "train" and hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            t0 = time.monotonic()
            iterator = iter(loader)
            t_iter = time.monotonic() - t0
            pids = worker_pids(iterator)
            out[f"{phase}_pids"] = pids
            roles.update({pid: f"{phase}-worker" for pid in pids})
            snap(f"{name} start")
            t0 = time.monotonic()
            n = 0
            for batch in iterator:
                n += len(batch["image"])
                images += len(batch["image"])
                emit({"event": "progress", "images": images})
            seconds = time.monotonic() - t0 + t_iter
            out["phases"].append({"epoch": epoch, "phase": phase, "images": n, "seconds": seconds})
            snap(f"{name} end")
    return out


class ConstantDataset:
    """The "bare" baseline: every item is the same preallocated tensor."""

    def __init__(self, length: int, shape: tuple[int, ...]) -> None:
        import torch

        self.length = length
        self.image = torch.zeros(shape, dtype=torch.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.image, "origin_id": int(index)}


def make_loaders(dataset: Any, loader: str, workers: int, batch_size: int, steps: int | None,
                 val_steps: int, seed: int = 0) -> tuple[Any, Any]:
    """Train + val DataLoaders over ``dataset``: forked, persistent workers, as users run them.

    Train: a fresh random subset of ``steps`` batches each epoch (all origins if None).
    Val: a fixed, evenly spread subset of ``val_steps`` batches.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    collate = None
    if loader == "cache":
        from cache_tools.read.batch import batch_collate
        collate = batch_collate          # the recommended (batched-read) path
    n = len(dataset)
    num_samples = n if steps is None else min(n, steps * batch_size)
    train_sampler = RandomSampler(dataset, num_samples=num_samples,
                                  generator=torch.Generator().manual_seed(seed))
    val_indices = np.linspace(0, n - 1, min(n, val_steps * batch_size)).astype(int).tolist()
    common = dict(batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                  multiprocessing_context="fork" if workers > 0 else None, collate_fn=collate)
    return (DataLoader(dataset, sampler=train_sampler, **common),
            DataLoader(dataset, sampler=val_indices, **common))

