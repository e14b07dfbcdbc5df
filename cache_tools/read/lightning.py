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

import multiprocessing.context
import os
from typing import Any, Callable

import lightning as L
import torch
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, Sampler

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


class StreamSampler(Sampler[int]):
    """``epoch_size`` indices an epoch, read off an endless stream of shuffled passes over the
    dataset: epoch e takes stream positions [e * size, (e + 1) * size), so successive epochs
    see new samples and every sample is drawn as often as any other in the long run (the
    infinite samplers of macromol_gym); each DDP rank takes every ``num_replicas``-th position.
    ``set_epoch`` also moves the dataset's epoch (rotations, jitter, pairs)."""

    def __init__(self, dataset, epoch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        self.dataset, self.n = dataset, len(dataset)
        self.per_rank = -(-int(epoch_size) // num_replicas)
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        total = self.per_rank * self.num_replicas
        positions = np.arange(self.epoch * total, (self.epoch + 1) * total)[self.rank::self.num_replicas]
        passes, offsets = np.divmod(positions, self.n)
        out = np.empty(len(positions), np.int64)
        for k in np.unique(passes).tolist():
            order = np.random.default_rng([self.seed, k]).permutation(self.n) if self.shuffle else np.arange(self.n)
            out[passes == k] = order[offsets[passes == k]]
        return iter(out.tolist())

    def __len__(self) -> int:
        return self.per_rank


def _refuse_validating_on_training(cache, split: str | None, val_split: str, given: bool = True) -> None:
    """ValueError when validation split ``val_split`` of ``cache`` is part of the training data
    (``given``: passed as val_split=, else the default)."""
    if split is None:
        what = f"val_split={val_split!r}" if given else f"the cache's split {val_split!r} (validation's default)"
        raise ValueError(f"{what} with split=None: training reads every structure of {cache}, split {val_split!r} "
                         "included; pass split='train' (the split to train on), or val_cache= to validate on "
                         "training data on purpose")
    if val_split == split:
        raise ValueError(f"split and val_split are both {split!r}: the model would be validated on its training "
                         "data; pass val_split='val' (another split), or val_cache= to do so on purpose")


def _default_val_split(cache, split: str | None) -> str | None:
    """``"val"`` when ``cache`` has that split with structures in it (refused with ``split=None``),
    else None: no validation (with a warning when the split is named but empty)."""
    from cache_tools.read.selection import split_counts

    counts = split_counts(cache)
    if "val" not in counts:
        return None
    if counts["val"] == 0:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{cache}: split 'val' holds no structure: training without validation (give the split "
                       "some with `cache-tools split`, or pass val_cache=)")
        return None
    _refuse_validating_on_training(cache, split, "val", given=False)
    return "val"


class VoxelCacheDataModule(L.LightningDataModule):
    """Train and validation loaders over a voxel cache.

    Training: ``cache`` restricted to ``split`` and/or ``subset`` (None: everything),
    with ``rotate`` augmentation. Validation, in this order: ``val_cache`` (a separate
    small cache, e.g. built from a hand-verified ``--origins val.csv``; ``val_split``
    and ``val_subset`` then apply to it), else split ``val_split`` of ``cache``; with
    neither, ``"val"`` when the cache has that split with structures in it, otherwise no
    validation (with a warning when ``"val"`` is there but empty). Validating on what is
    trained on is refused (ValueError): ``val_split`` equal to ``split``, or a split of
    ``cache`` (given or the default ``"val"``) while ``split=None`` trains on every structure.
    A ``val_cache`` is the way to validate on training data on purpose.

    Lattice caches: ``grid_voxels`` (any view size) and ``jitter_voxels`` (training only), and
    ``neighbor_pairs=True`` (or a dict of :class:`NeighborPairs` options; validation without
    noise) for the neighbor-location task instead of single images. ``epoch_size`` (an int, or
    a float: that fraction of the training selection) makes a training epoch that many samples
    off an endless stream of shuffled passes (:class:`StreamSampler`); validation always reads
    its whole selection. ``origins=NAME`` reads the views at a stored origin set (``cache-tools
    origins``) instead of the build's origins, in training and in validation on ``cache``;
    ``val_origins`` names another set for validation (needed with a ``val_cache`` that has sets:
    ``origins`` names a set of ``cache``, so it does not apply to ``val_cache``).

    Pass-through: ``batch_size`` (``val_batch_size`` defaults to it), ``num_workers``,
    ``pin_memory``, ``drop_last`` (training only), ``persistent_workers`` (default:
    on whenever there are workers, as Lightning keeps both loaders alive anyway),
    ``multiprocessing_context`` (``"fork"``, ``"spawn"``, ``"forkserver"`` or a context
    object; None: torch's default, fork on Linux; used only when there are workers: the
    README's memory section says what each costs), ``shuffle``, ``seed`` (sampler order and
    rotations), ``transform``, ``prefetch`` and ``dataset_kwargs`` for :class:`VoxelCacheDataset`.
    """

    def __init__(self, cache: str | os.PathLike, split: str | None = None, subset: str | None = None, *,
                 val_cache: str | os.PathLike | None = None, val_split: str | None = None,
                 val_subset: str | None = None, batch_size: int = 64, val_batch_size: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, drop_last: bool = True,
                 persistent_workers: bool | None = None,
                 multiprocessing_context: str | multiprocessing.context.BaseContext | None = None,
                 shuffle: bool = True, rotate: bool = True,
                 seed: int = 0, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 prefetch: bool | None = None, dataset_kwargs: dict[str, Any] | None = None,
                 grid_voxels: int | None = None, jitter_voxels: int = 0,
                 neighbor_pairs: bool | dict[str, Any] = False, epoch_size: int | float | None = None,
                 origins: str | None = None, val_origins: str | None = None) -> None:
        super().__init__()
        self.cache, self.split, self.subset = cache, split, subset
        self.val_cache, self.val_split, self.val_subset = val_cache, val_split, val_subset
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.multiprocessing_context = multiprocessing_context
        self.shuffle, self.rotate, self.seed = shuffle, rotate, seed
        self.transform, self.prefetch = transform, prefetch
        self.dataset_kwargs = dataset_kwargs or {}
        self.grid_voxels, self.jitter_voxels = grid_voxels, jitter_voxels
        self.neighbor_pairs = {} if neighbor_pairs is True else (neighbor_pairs or None)
        if epoch_size is not None and (isinstance(epoch_size, bool) or not isinstance(epoch_size, (int, float))
                                       or epoch_size <= 0 or (isinstance(epoch_size, float) and epoch_size > 1000)):
            raise ValueError(f"epoch_size: a positive number of samples, or a fraction of the split, got {epoch_size!r}")
        self.epoch_size = epoch_size
        self.origins, self.val_origins = origins, val_origins
        if val_cache is None and val_split is not None:
            _refuse_validating_on_training(cache, split, val_split)
        self.train_dataset: VoxelCacheDataset | None = None
        self.val_dataset: VoxelCacheDataset | None = None

    def _dataset(self, cache, split, subset, rotate: bool, train: bool = False,
                 origins: str | None = None) -> VoxelCacheDataset:
        views = {} if origins is None else {"origins": origins}
        if self.grid_voxels is not None:
            views["grid_voxels"] = self.grid_voxels
        if train and self.jitter_voxels:
            views["jitter_voxels"] = self.jitter_voxels
        kwargs = dict(split=split, subset=subset, seed=self.seed, transform=self.transform, pin_memory=self.pin_memory,
                      prefetch=self.prefetch, **views, **self.dataset_kwargs)
        if self.neighbor_pairs is not None:
            from cache_tools.read.pairs import NeighborPairs

            pairs = dict(self.neighbor_pairs)
            if not train:
                pairs["noise_voxels"] = 0
            return NeighborPairs(cache, rotate=rotate or not train, **pairs, **kwargs)
        return VoxelCacheDataset(cache, rotate=rotate, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = self._dataset(self.cache, self.split, self.subset, self.rotate, train=True,
                                               origins=self.origins)
        if self.val_dataset is None:
            if self.val_cache is not None:
                self.val_dataset = self._dataset(self.val_cache, self.val_split, self.val_subset, False,
                                                 origins=self.val_origins)
            else:
                val_split = self.val_split
                if val_split is None:
                    val_split = _default_val_split(self.cache, self.split)
                if val_split is not None:
                    self.val_dataset = self._dataset(self.cache, val_split, self.val_subset, False,
                                                     origins=self.val_origins or self.origins)

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: VoxelCacheDataset, batch_size: int, shuffle: bool, drop_last: bool,
                train: bool = False) -> DataLoader:
        world, rank = self._replicas()
        if train and self.epoch_size is not None:
            size = self.epoch_size if isinstance(self.epoch_size, int) else max(1, round(self.epoch_size * len(dataset)))
            sampler = StreamSampler(dataset, size, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        else:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=batch_collate,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=drop_last,
                          persistent_workers=self.persistent_workers and self.num_workers > 0,
                          # torch refuses a context without workers: it would have nothing to start
                          multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size, self.shuffle, self.drop_last, train=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, False, False)
