#!/usr/bin/env python3
"""Train a small 3-D CNN from a voxel cache with PyTorch Lightning (VoxelCacheDataModule).

The toy task of workflows/train_example.py (predict the element group of the atom at
the image centre, the centre 3x3x3 voxels blanked), with Lightning doing the loop:
train and val loaders alive together, rotations advancing every epoch, DDP on CPU.

    pipeline build-cache tests/data/mmcif --out sample.zarr
    python workflows/train_lightning.py --cache sample.zarr            # 3 epochs: 8 min on 2 busy cores
    python workflows/train_lightning.py --cache sample.zarr --devices 2  # DDP, 2 CPU processes

Validation uses the cache's "val" split, or --val-cache; a cache with neither (the
sample), or with an empty "val", is validated on its training data, and the script says
so: it never writes into your cache. Under ``cache-tools profile-memory -- python workflows/train_lightning.py``
you see the whole tree; ``--loader seed`` (pandas origins, parse + voxelize per item,
benchmarks/seed_loaders.py) and ``--loader constant`` (a Dataset of one constant tensor:
the floor) run the same Trainer for comparison (benchmarks/lightning_memory.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, too

import lightning as L  # noqa: E402

from cache_tools import CacheError, VoxelCacheDataModule  # noqa: E402
from cache_tools import format as fmt  # noqa: E402
from cache_tools.read.selection import split_counts  # noqa: E402


class CentreTask(L.LightningModule):
    """A tiny 3-D CNN; records what it saw (origin ids, cube rotations) when asked."""

    def __init__(self, channels: int, record: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(channels, 8, 3, padding=1), nn.ReLU(),
            nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, channels))
        self.loss = nn.CrossEntropyLoss()
        self.record = record
        self.seen: dict[str, list] = {}

    @staticmethod
    def task(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = images.shape[-1] // 2
        labels = images[:, :, c, c, c].argmax(dim=1)
        inputs = images.clone()
        inputs[:, :, c - 1:c + 2, c - 1:c + 2, c - 1:c + 2] = 0
        return inputs, labels

    def _note(self, key: str, batch: dict) -> None:
        if self.record:
            cube = batch.get("cube_rotation", torch.zeros_like(batch["origin_id"]))
            self.seen.setdefault(key, []).extend(zip(batch["origin_id"].tolist(), cube.tolist()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._note(f"train/{self.current_epoch}", batch)
        inputs, labels = self.task(batch["image"])
        loss = self.loss(self.net(inputs), labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._note(f"val/{self.current_epoch}", batch)
        inputs, labels = self.task(batch["image"])
        accuracy = (self.net(inputs).argmax(1) == labels).float().mean()
        self.log("val_accuracy", accuracy, prog_bar=True, batch_size=len(labels), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def comparison_datamodule(kind: str, cache: str, args: argparse.Namespace) -> L.LightningDataModule:
    """--loader seed / constant: the same loaders' shape without the cache (memory comparison)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from torch.utils.data import DataLoader

    layout = fmt.VoxelLayout(cache)
    shape = tuple(layout.image_shape[-4:])

    class Constant(torch.utils.data.Dataset):
        """The floor: a worker that returns one constant tensor and holds nothing per origin."""

        def __len__(self) -> int:
            return layout.n_origins

        def __getitem__(self, i: int) -> dict:
            return {"image": torch.zeros(shape), "origin_id": i}

    if kind == "seed":
        from seed_loaders import SeedInitialDataset
        train, val = SeedInitialDataset(cache), SeedInitialDataset(cache)
    else:
        train, val = Constant(), Constant()

    class Comparison(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              persistent_workers=args.workers > 0, drop_last=True)

        def val_dataloader(self):
            return DataLoader(val, batch_size=args.batch_size, num_workers=args.workers,
                              persistent_workers=args.workers > 0)

    return Comparison()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="sample.zarr")
    p.add_argument("--split", default=None, help="training split (default: 'train' if the cache has it, else all)")
    p.add_argument("--subset", default=None, help="training subset (cache-tools subset)")
    p.add_argument("--val-cache", default=None, help="a separate validation cache")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="per loader (default: %(default)s)")
    p.add_argument("--devices", type=int, default=1, help="CPU processes; >1 runs DDP")
    p.add_argument("--limit-batches", type=float, default=1.0, help="fraction (or number) of batches per epoch")
    p.add_argument("--loader", choices=["cache", "seed", "constant"], default="cache",
                   help="seed/constant: the memory comparison's loaders (default: cache)")
    p.add_argument("--record", metavar="DIR", help="write the origin ids and rotations each rank saw (tests)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    limits = {} if args.limit_batches == 1.0 else {
        k: int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches
        for k in ("limit_train_batches", "limit_val_batches")}
    try:
        attrs = fmt.read_attrs(args.cache)
        splits = attrs.splits
        split = args.split or ("train" if "train" in splits else None)
        val_cache = args.val_cache
        if val_cache is None and not split_counts(args.cache, attrs).get("val"):  # absent, or named but empty
            val_cache = args.cache
            print(f"train_lightning: {'no' if 'val' not in splits else 'an empty'} 'val' split in {args.cache}: "
                  "validating on the training data (run `cache-tools split CACHE --val 0.2`, or pass --val-cache)",
                  file=sys.stderr)
        if args.loader == "cache":
            dm = VoxelCacheDataModule(args.cache, split=split, subset=args.subset, val_cache=val_cache,
                                      batch_size=args.batch_size, num_workers=args.workers, drop_last=False)
            dm.setup("fit")
        else:
            dm = comparison_datamodule(args.loader, args.cache, args)
    except (CacheError, ValueError) as exc:
        print(f"train_lightning: {exc}", file=sys.stderr)
        return 2
    model = CentreTask(len(attrs.params.channels), record=args.record is not None)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        **limits,
                        enable_progress_bar=sys.stderr.isatty())
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    if args.record:
        Path(args.record).mkdir(parents=True, exist_ok=True)
        Path(args.record, f"rank{trainer.global_rank}.json").write_text(json.dumps(model.seen))
    if trainer.global_rank == 0:
        metrics = {k: round(float(v), 3) for k, v in trainer.callback_metrics.items()}
        print(f"fit: {args.epochs} epochs in {time.time() - t0:.1f} s on {args.devices} CPU process(es); {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
