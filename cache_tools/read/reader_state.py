"""What a :class:`~cache_tools.read.reader.ShardReader` holds open in one process, and its bounds.

One :class:`ReaderState` per process (made on first use, never pickled or inherited across a
fork): numpy tables of *slots*, at most ``max_maps`` open shards (a map's address or a
descriptor, where its index starts), the objects keeping them open, a thread pool, and each
thread's scratch for the kernels (a zstd context, a frame buffer, a stage).
"""
from __future__ import annotations

import os
import resource
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


def default_max_maps() -> int:
    """Open shards (maps or descriptors) per process: an eighth of RLIMIT_NOFILE, between 8 and 256."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 256 if soft == resource.RLIM_INFINITY else max(8, min(256, soft // 8))


def default_threads() -> int:
    """Threads for a batch: up to 4 cores, 1 inside a DataLoader worker (workers are the parallelism)."""
    import torch.utils.data

    if torch.utils.data.get_worker_info() is not None:
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0))))


class Descriptor:
    """An open shard file, closed when the last reference goes."""

    fd = -1  # if the open fails, __del__ still runs

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


@dataclass
class ThreadScratch:
    """A thread's scratch for the kernels: a zstd context, a frame buffer, a stored-dtype stage."""
    dctx: object = None
    frame: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    entry: np.ndarray = field(default_factory=lambda: np.empty(2, np.uint64))
    stage: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))


@dataclass
class ReaderState:
    """What one process has opened: never pickled, never inherited across a fork."""
    pid: int
    max_maps: int
    n_shards: int
    slot_of_shard: np.ndarray = None   # (n_shards,) int32, -1 = not open
    shard_of_slot: np.ndarray = None   # (max_maps,) int64, -1 = free
    base: np.ndarray = None            # (max_maps,) uintp: the map's address (uncompressed)
    fd: np.ndarray = None              # (max_maps,) int64: the descriptor (compressed)
    data_end: np.ndarray = None        # (max_maps,) int64: where the shard's index starts
    last_used: np.ndarray = None       # (max_maps,) int64
    holders: list = None               # per slot: the mmap / Descriptor keeping it open
    images: list = None                # per slot, uncompressed: the shard's origins as an array (views)
    retired: list = field(default_factory=list)  # pushed out while a call was reading: freed after it
    calls: int = 0                     # kernel calls in flight (holders retire only when none)
    tick: int = 0
    threads: threading.local = field(default_factory=threading.local)
    crc: np.ndarray | None = None
    pool: ThreadPoolExecutor | None = None
    pool_threads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.slot_of_shard = np.full(self.n_shards, -1, np.int32)
        self.shard_of_slot = np.full(self.max_maps, -1, np.int64)
        self.base = np.zeros(self.max_maps, np.uintp)
        self.fd = np.full(self.max_maps, -1, np.int64)
        self.data_end = np.zeros(self.max_maps, np.int64)
        self.last_used = np.zeros(self.max_maps, np.int64)
        self.holders = [None] * self.max_maps
        self.images = [None] * self.max_maps

    def thread(self) -> ThreadScratch:
        scratch = getattr(self.threads, "scratch", None)
        if scratch is None:
            scratch = self.threads.scratch = ThreadScratch()
        return scratch


def runs_of_shards(shards: np.ndarray, limit: int) -> list[slice]:
    """Consecutive parts of a batch that touch at most ``limit`` distinct shards each."""
    if len(np.unique(shards)) <= limit:
        return [slice(0, len(shards))]
    parts, start, seen = [], 0, set()
    for k, shard in enumerate(shards.tolist()):
        if shard not in seen and len(seen) == limit:
            parts.append(slice(start, k))
            start, seen = k, set()
        seen.add(shard)
    parts.append(slice(start, len(shards)))
    return parts
