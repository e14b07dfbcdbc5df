#!/usr/bin/env python3
"""Train a small 3-D CNN from a voxel cache, with a train and a val loader, and watch memory.

The task is a toy but real one: predict the element group of the atom at the image
centre from its surroundings (the centre 3x3x3 voxels are blanked). What matters is
the loading: 8 DataLoader workers per loader, both loaders alive (persistent) as
Lightning keeps them, validation every ``--val-every`` steps, and the whole run under
the memory profiler, which ends with the plot (memory.png) and a summary showing Σ
PSS vs Σ RSS and each worker's private memory.

    pipeline build-cache tests/data/mmcif --out sample.zarr
    python workflows/train_example.py --cache sample.zarr            # ~2-4 min on 2 CPU cores

The train/val split is computed in memory (``--val``, ``--balance origins|structures``,
whole structures and entries either way); the cache is never written. ``--cache-split``
uses the splits stored by ``cache-tools split`` instead.

Plain torch, no Lightning: the recipe needs nothing Lightning adds;
``workflows/train_lightning.py`` is the Lightning version (VoxelCacheDataModule).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from cache_tools import BlockShuffleSampler, CacheError, MemoryProfiler, VoxelCacheDataset, batch_collate  # noqa: E402
from cache_tools import format as fmt  # noqa: E402


def make_model(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
        nn.Conv3d(32, 64, 3, stride=2, padding=1), nn.BatchNorm3d(64), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, classes))


def centre_task(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label = channel of the centre voxel's atom; input = the image with the centre blanked."""
    c = images.shape[-1] // 2
    labels = images[:, :, c, c, c].argmax(dim=1)
    inputs = images.clone()
    inputs[:, :, c - 1:c + 2, c - 1:c + 2, c - 1:c + 2] = 0
    return inputs, labels


def in_memory_split(cache: str, val: float, balance: str) -> tuple[VoxelCacheDataset, VoxelCacheDataset]:
    """Train and val datasets from a split computed here and kept in memory: the example
    never writes into the cache (``--cache-split`` uses one stored by `cache-tools split`)."""
    from cache_tools.commands.split import compute_splits

    names, codes = compute_splits(cache, val=val, seed=0, balance=balance)
    ranges = fmt.read_array(cache, fmt.STRUCTURE_ORIGIN_RANGE)
    per = ranges[:, 1] - ranges[:, 0]
    parts = []
    for name in ("train", "val"):
        rows = np.flatnonzero(codes == names.index(name))
        parts.append(VoxelCacheDataset(cache, structures=rows, rotate=name == "train"))
        print(f"{name}: {len(rows)} structures, {int(per[rows].sum())} of {int(per.sum())} origins "
              f"(split in memory, balanced by {balance}; the cache is not changed)", file=sys.stderr)
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="sample.zarr")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=8, help="per loader (default: %(default)s)")
    p.add_argument("--out", default="train-example-profile", help="memory profile output directory")
    p.add_argument("--val", type=float, default=0.2, help="fraction held out for validation (default: %(default)s)")
    p.add_argument("--balance", choices=("origins", "structures"), default="origins",
                   help="what --val counts, whole structures either way (default: %(default)s)")
    p.add_argument("--cache-split", action="store_true",
                   help="use the 'train' and 'val' splits stored in the cache (`cache-tools split`) "
                        "instead of splitting in memory")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # leave the cores to the loader workers on small machines
    try:
        if args.cache_split:
            train = VoxelCacheDataset(args.cache, split="train", rotate=True)
            val = VoxelCacheDataset(args.cache, split="val")
        else:
            train, val = in_memory_split(args.cache, args.val, args.balance)
    except (CacheError, ValueError) as exc:
        print(f"train_example: {exc}", file=sys.stderr)
        return 2
    sampler = BlockShuffleSampler(train, block_size=4)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, collate_fn=batch_collate,
                              num_workers=args.workers, persistent_workers=True, drop_last=True)
    val_loader = DataLoader(val, batch_size=args.batch_size, collate_fn=batch_collate,
                            num_workers=args.workers, persistent_workers=True)
    channels = len(train.channels)
    model = make_model(channels, channels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    with MemoryProfiler(args.out, interval=0.5) as prof:
        step, epoch, t0 = 0, 0, time.time()
        while step < args.steps:
            train.set_epoch(epoch)
            sampler.set_epoch(epoch)
            prof.mark(f"epoch {epoch}")
            for batch in train_loader:
                inputs, labels = centre_task(batch["image"])
                model.train()
                loss = loss_fn(model(inputs), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step % args.val_every == 0 or step == args.steps:
                    prof.mark("validation")
                    model.eval()
                    correct = total = 0
                    with torch.no_grad():
                        for vb in val_loader:
                            vin, vlab = centre_task(vb["image"])
                            correct += int((model(vin).argmax(1) == vlab).sum())
                            total += len(vlab)
                    print(f"step {step:4d}  train loss {loss.item():.3f}  val accuracy {correct / total:.3f}  "
                          f"({step * args.batch_size / (time.time() - t0):.0f} train images/s)")
                if step >= args.steps:
                    break
            epoch += 1
        del train_loader, val_loader  # workers exit inside the profile
    print(f"memory plot: {Path(args.out) / 'memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
