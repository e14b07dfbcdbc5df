"""VoxelCacheDataModule in a real lightning.Trainer on CPU: epochs, rotations, validation, DDP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cache_tools import VoxelCacheDataModule, VoxelCacheDataset, batch_collate
from cache_tools import format as fmt
from cache_tools.read.lightning import EpochSampler
from cache_tools.read.rotations import rotate_view
from cache_tools.commands.split import assign_splits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflows"))
from train_lightning import CentreTask  # noqa: E402


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


@pytest.fixture(scope="module")
def split_cache(cache_factory, tmp_path_factory):
    root = shutil.copytree(cache_factory("uint8"), tmp_path_factory.mktemp("lightning") / "c.zarr")
    assign_splits(root, val=0.4, seed=3)
    return root


def test_import_cache_tools_never_imports_lightning(split_cache):
    code = ("import sys, cache_tools; from cache_tools import VoxelCacheDataset, MemoryProfiler, rotations; "
            "from cache_tools.commands import info, subset, split, check, show; "
            "from cache_tools.read import where, structure_meta, selection; "
            "ds = VoxelCacheDataset(sys.argv[1]); ds[0]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code, str(split_cache)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_arguments_pass_through(split_cache):
    dm = VoxelCacheDataModule(split_cache, split="train", batch_size=5, val_batch_size=7, num_workers=2,
                              pin_memory=True, drop_last=True, seed=4)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (train.batch_size, train.num_workers, train.pin_memory, train.drop_last) == (5, 2, True, True)
    assert train.persistent_workers and train.collate_fn is batch_collate
    assert (val.batch_size, val.drop_last) == (7, False)
    assert isinstance(train.sampler, EpochSampler) and train.sampler.shuffle and not val.sampler.shuffle
    assert dm.train_dataset.split == "train" and dm.train_dataset.rotate and dm.train_dataset.seed == 4
    assert dm.val_dataset.split == "val" and not dm.val_dataset.rotate  # the cache's "val" split by default
    assert VoxelCacheDataModule(split_cache, "train", num_workers=0).train_dataloader().persistent_workers is False
    other = VoxelCacheDataModule(split_cache, split="train", val_cache=split_cache, val_split="train")
    assert len(other.val_dataloader().dataset) == len(other.train_dataloader().dataset)


def test_validating_on_training_data_is_refused_and_an_empty_val_warns(split_cache, tmp_path, capsys):
    with pytest.raises(ValueError, match="split and val_split are both 'train': the model would be validated on its"):
        VoxelCacheDataModule(split_cache, split="train", val_split="train")
    with pytest.raises(ValueError, match=r"val_split='val' with split=None: training reads every structure of .*, "
                                         r"split 'val' included; pass split='train'"):
        VoxelCacheDataModule(split_cache, val_split="val")
    implicit = VoxelCacheDataModule(split_cache)  # validation's default, the cache's 'val', is trained on
    with pytest.raises(ValueError, match=r"the cache's split 'val' \(validation's default\) with split=None"):
        implicit.setup("fit")
    assert implicit.train_dataset is not None and implicit.val_dataset is None
    root = shutil.copytree(split_cache, tmp_path / "c.zarr")
    assign_splits(root, test=0.4, seed=3)  # 'val' named, and empty
    dm = VoxelCacheDataModule(root, split="train")
    with pytest.warns(UserWarning, match="split 'val' holds no structure: training without validation"):
        dm.setup("fit")
    assert dm.val_dataset is None and dm.val_dataloader() == []
    with pytest.raises(fmt.CacheError, match="split 'val' holds no structure"):
        VoxelCacheDataModule(root, split="train", val_split="val").setup("fit")
    from train_lightning import main as train_lightning

    assert train_lightning(["--cache", str(root), "--epochs", "0"]) == 0
    assert capsys.readouterr().err.startswith(f"train_lightning: an empty 'val' split in {root}: validating on the "
                                              "training data")


def test_multiprocessing_context_passes_through(split_cache):
    """A spawn worker (what macromol_gym's DataModules use) reads the same batch the main process does."""
    dm = VoxelCacheDataModule(split_cache, split="train", batch_size=4, num_workers=1, shuffle=False,
                              multiprocessing_context="spawn")
    loader = dm.train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert dm.val_dataloader().multiprocessing_context.get_start_method() == "spawn"
    batch = next(iter(loader))
    expected = dm.train_dataset[[0, 1, 2, 3]]  # epoch 0, the same cube rotations
    assert batch["origin_id"].tolist() == expected["origin_id"].tolist()
    assert torch.equal(batch["image"], expected["image"])
    for context in ("fork", "forkserver"):
        assert VoxelCacheDataModule(split_cache, "train", num_workers=2, multiprocessing_context=context
                                    ).train_dataloader().multiprocessing_context.get_start_method() == context
    # without workers there is nothing to start (torch refuses a context then): not passed
    assert VoxelCacheDataModule(split_cache, "train", multiprocessing_context="spawn").train_dataloader(
    ).multiprocessing_context is None


def test_fit_two_epochs_each_origin_once_rotations_advance(split_cache):
    dm = VoxelCacheDataModule(split_cache, split="train", batch_size=8, num_workers=2, drop_last=False)
    model = CentreTask(4, record=True)
    images: dict[tuple[int, int], np.ndarray] = {}
    train_step = model.training_step

    def step(batch, batch_idx):  # keep a few images to check the rotation really applied
        for origin, cube, image in zip(batch["origin_id"].tolist(), batch["cube_rotation"].tolist(), batch["image"]):
            if origin % 7 == 0:
                images[(model.current_epoch, origin)] = (cube, image.numpy().copy())
        return train_step(batch, batch_idx)

    model.training_step = step
    trainer(max_epochs=2).fit(model, datamodule=dm)
    train = VoxelCacheDataset(split_cache, split="train")
    val = VoxelCacheDataset(split_cache, split="val")
    expected = sorted(train.origin_id(i) for i in range(len(train)))
    cubes = {}
    for epoch in (0, 1):
        seen = model.seen[f"train/{epoch}"]
        assert sorted(o for o, _ in seen) == expected  # every training origin exactly once
        cubes[epoch] = dict(seen)
        assert sorted(o for o, _ in model.seen[f"val/{epoch}"]) == [val.origin_id(i) for i in range(len(val))]
        assert {c for _, c in model.seen[f"val/{epoch}"]} == {0}  # validation is not augmented
    changed = sum(cubes[0][o] != cubes[1][o] for o in expected)
    assert changed >= 0.8 * len(expected)  # 23/24 expected to differ
    plain = VoxelCacheDataset(split_cache)  # unrotated images, by global origin id
    assert len(images) >= 4
    for (epoch, origin), (cube, image) in images.items():
        assert np.array_equal(image, rotate_view(plain[origin]["image"].numpy(), cube))


def test_ddp_two_cpu_processes_each_rank_a_disjoint_half(split_cache, tmp_path):
    record = tmp_path / "record"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(REPO / "workflows" / "train_lightning.py"), "--cache", str(split_cache),
                          "--epochs", "2", "--devices", "2", "--batch-size", "8", "--record", str(record)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fit: 2 epochs" in out.stdout and "on 2 CPU process(es)" in out.stdout
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    train = VoxelCacheDataset(split_cache, split="train")
    expected = {train.origin_id(i) for i in range(len(train))}
    per_rank = -(-len(expected) // 2)  # DistributedSampler pads an odd count with repeats
    for epoch in (0, 1):
        a, b = ([o for o, _ in ranks[r][f"train/{epoch}"]] for r in (0, 1))
        assert len(a) == len(b) == per_rank
        assert set(a) | set(b) == expected
        assert len(set(a) & set(b)) == 2 * per_rank - len(expected)  # disjoint halves when even
    assert [o for o, _ in ranks[0]["train/0"]] != [o for o, _ in ranks[0]["train/1"]]  # reshuffled per epoch
