"""PyTorch Lightning for voxel caches: :class:`VoxelCacheDataModule`.

An optional extra (``pip install -e ".[lightning]"``): this module imports lightning;
``import cache_tools`` never does.

    dm = VoxelCacheDataModule("sample.zarr", split="train", val_split="val", batch_size=64)
    lightning.Trainer(max_epochs=10).fit(model, datamodule=dm)

What it does for the user:

- Batched reads: every loader uses ``__getitems__`` + :func:`batch_collate` (one buffer
  per batch, no re-stacking). ``num_workers=0`` by default: on a warm cache one process
  reads ~45k images/s and workers only add the cost of moving batches between
  processes (BENCHMARKS.md, "Batched reads"); raise it when the training step is too
  short to hide reads or the cache is cold.
- Epoch-dependent augmentation advances with no user code: the loaders use
  :class:`EpochSampler`, a ``DistributedSampler`` whose ``set_epoch`` (called by
  Lightning every epoch) also calls the dataset's ``set_epoch``, which reaches
  persistent workers through shared memory.
- DDP: the sampler is a ``DistributedSampler`` built with the trainer's world size and
  rank, so Lightning keeps it and each rank reads a disjoint part of every epoch.
  When the sample count is not divisible by the world size, ``DistributedSampler``
  pads with repeats (``drop_last=False``) as usual.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cache_tools.read.batch import batch_collate
from cache_tools.read.dataset import VoxelCacheDataset

__all__ = ["VoxelCacheDataModule", "EpochSampler"]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that also moves the dataset to the epoch it is set to.

    Lightning calls ``set_epoch`` on a loader's sampler at the start of every epoch
    (before the loader's iterator, so before any worker picks a rotation).
    """

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class VoxelCacheDataModule(L.LightningDataModule):
    """Train and validation loaders over a voxel cache.

    Training: ``cache`` restricted to ``split`` and/or ``subset`` (None: everything),
    with ``rotate`` augmentation. Validation, in this order: ``val_cache`` (a separate
    small cache, e.g. built from a hand-verified ``--origins val.csv``; ``val_split``
    and ``val_subset`` then apply to it), else split ``val_split`` of ``cache``; with
    neither, ``"val"`` when the cache has that split, otherwise no validation.

    Pass-through: ``batch_size`` (``val_batch_size`` defaults to it), ``num_workers``,
    ``pin_memory``, ``drop_last`` (training only), ``persistent_workers`` (default:
    on whenever there are workers, as Lightning keeps both loaders alive anyway),
    ``shuffle``, ``seed`` (sampler order and rotations), ``transform``, ``prefetch``
    and ``dataset_kwargs`` for :class:`VoxelCacheDataset`.
    """

    def __init__(self, cache: str | os.PathLike, split: str | None = None, subset: str | None = None, *,
                 val_cache: str | os.PathLike | None = None, val_split: str | None = None,
                 val_subset: str | None = None, batch_size: int = 64, val_batch_size: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, drop_last: bool = True,
                 persistent_workers: bool | None = None, shuffle: bool = True, rotate: bool = True,
                 seed: int = 0, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 prefetch: bool | None = None, dataset_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cache, self.split, self.subset = cache, split, subset
        self.val_cache, self.val_split, self.val_subset = val_cache, val_split, val_subset
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.shuffle, self.rotate, self.seed = shuffle, rotate, seed
        self.transform, self.prefetch = transform, prefetch
        self.dataset_kwargs = dataset_kwargs or {}
        self.train_dataset: VoxelCacheDataset | None = None
        self.val_dataset: VoxelCacheDataset | None = None

    def _dataset(self, cache, split, subset, rotate: bool) -> VoxelCacheDataset:
        return VoxelCacheDataset(cache, split=split, subset=subset, rotate=rotate, seed=self.seed,
                                 transform=self.transform, pin_memory=self.pin_memory,
                                 prefetch=self.prefetch, **self.dataset_kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = self._dataset(self.cache, self.split, self.subset, self.rotate)
        if self.val_dataset is None:
            if self.val_cache is not None:
                self.val_dataset = self._dataset(self.val_cache, self.val_split, self.val_subset, False)
            else:
                from cache_tools import format as fmt
                val_split = self.val_split
                if val_split is None and "val" in fmt.read_attrs(self.cache).splits:
                    val_split = "val"
                if val_split is not None:
                    self.val_dataset = self._dataset(self.cache, val_split, self.val_subset, False)

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: VoxelCacheDataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        world, rank = self._replicas()
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=batch_collate,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=drop_last,
                          persistent_workers=self.persistent_workers and self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size, self.shuffle, self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, False, False)
