"""A sampler that trades a little randomness for read locality.

``BlockShuffleSampler`` cuts the index range into blocks of ``block_size``
consecutive samples (consecutive origin ids: neighbouring regions of one
structure, adjacent bytes of one shard), shuffles the order of the blocks every
epoch and the samples inside each block. Every sample is still seen exactly once
per epoch; what changes is that a batch of B holds B / block_size blocks, so
samples in a batch are correlated in groups of ``block_size`` (often the same
structure). Keep ``block_size`` well below the batch size (e.g. 8 for B = 64);
``block_size=1`` is an ordinary random permutation.
"""
from __future__ import annotations

from typing import Iterator, Sized

import numpy as np
from torch.utils.data import Sampler


class BlockShuffleSampler(Sampler[int]):
    def __init__(self, data_source: Sized | int, block_size: int = 8, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        self.n = data_source if isinstance(data_source, int) else len(data_source)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.block_size, self.seed = block_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _blocks(self) -> np.ndarray:
        n_blocks = -(-self.n // self.block_size)
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.permutation(n_blocks)[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 1 + self.rank])
        for block in self._blocks():
            start = int(block) * self.block_size
            members = np.arange(start, min(start + self.block_size, self.n))
            yield from rng.permutation(members).tolist()

    def __len__(self) -> int:
        blocks = self._blocks()
        full = blocks[blocks < self.n // self.block_size]
        tail = self.n % self.block_size if len(full) < len(blocks) else 0
        return len(full) * self.block_size + tail
