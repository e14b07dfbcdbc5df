#!/usr/bin/env python3
"""Fit the neighbor-location task on a lattice cache: which of the 6 faces of the home view
does the neighbor view sit on? A small siamese 3-D CNN, PyTorch Lightning, pairs cut at
training time (cache_tools.NeighborPairs) with an epoch size off an endless stream.

    pipeline build-cache tests/data/mmcif --out lattice.zarr --layout lattice --dtype uint8
    python workflows/train_neighbors.py --cache lattice.zarr                 # 3 epochs of 2,048 pairs

Validation uses the cache's "val" split, or else pairs of the training data drawn with
another seed (the script says so; it never writes into the cache). Chance is 1/6: a model
that reads the images does better within a few epochs (the accuracy is printed per epoch).
"""
from __future__ import annotations

import argparse
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


class NeighborTask(L.LightningModule):
    """One encoder for both views; the two codes side by side decide the face."""

    def __init__(self, channels: int, width: int = 16, lr: float = 2e-3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv3d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool3d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * 4 * width * 8, 64), nn.ReLU(), nn.Linear(64, 6))
        self.loss, self.lr = nn.CrossEntropyLoss(), lr
        self.accuracy: list[float] = []
        self._right = self._seen = 0

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        b = pairs.shape[0]
        codes = self.encoder(pairs.flatten(0, 1)).view(b, -1)  # (home, neighbor) codes, side by side
        return self.head(codes)

    def training_step(self, batch, _):
        loss = self.loss(self(batch["image"]), batch["label"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch, _):
        logits = self(batch["image"])
        self._right += int((logits.argmax(1) == batch["label"]).sum())
        self._seen += len(batch["label"])
        self.log("val_loss", self.loss(logits, batch["label"]), batch_size=len(batch["label"]))

    def on_validation_epoch_end(self) -> None:
        if self._seen:
            self.accuracy.append(self._right / self._seen)
            self.log("val_accuracy", self.accuracy[-1])
        self._right = self._seen = 0

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="a lattice cache (pipeline build-cache --layout lattice)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epoch-size", type=int, default=2048, help="pairs per training epoch (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0: one process cuts ~6k pairs/s)")
    p.add_argument("--grid-voxels", type=int, default=None, help="view size (default: the build's grid)")
    p.add_argument("--jitter-voxels", type=int, default=5, help="home jitter per axis (default: %(default)s)")
    p.add_argument("--limit-val-batches", type=int, default=16, help="validation batches per epoch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    try:
        attrs = fmt.read_attrs(args.cache)
        if attrs.params.layout != "lattice":
            raise CacheError(f"{args.cache}: stores one image per origin; the neighbor task cuts views at training "
                             "time: build it with `pipeline build-cache ... --layout lattice`")
        has_val = split_counts(args.cache, attrs).get("val", 0) > 0  # named and not empty
        if not has_val:
            print(f"train_neighbors: no (or an empty) 'val' split in {args.cache}: validating on pairs of the training data "
                  "drawn with another seed (run `cache-tools split CACHE --val 0.2` for a real one)", file=sys.stderr)
        dm = VoxelCacheDataModule(args.cache, split="train" if has_val else None,
                                  val_cache=None if has_val else args.cache, batch_size=args.batch_size,
                                  num_workers=args.workers, seed=args.seed, neighbor_pairs=True,
                                  grid_voxels=args.grid_voxels, jitter_voxels=args.jitter_voxels,
                                  epoch_size=args.epoch_size)
        dm.setup("fit")
        if not has_val:
            dm.val_dataset.seed = args.seed + 1  # other pairs than the ones trained on
    except (CacheError, ValueError) as exc:
        print(f"train_neighbors: {exc}", file=sys.stderr)
        return 2
    model = NeighborTask(len(attrs.params.channels))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=args.limit_val_batches, enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    print(f"train_neighbors: {args.epochs} epochs of {args.epoch_size} pairs in {time.perf_counter() - started:.0f} s; "
          "validation accuracy per epoch " + ", ".join(f"{a:.2f}" for a in model.accuracy) + " (chance 0.17)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
