"""NeighborPairs: the neighbor-location task's pairs, cut from a lattice cache at training time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_tools import NeighborPairs
from cache_tools import format as fmt
from cache_tools.read.rotations import CUBE_ROTATION_MATRICES, FACE_DIRECTIONS, rotate_tensor
from pipeline.parse import parse_atoms, parse_channels
from pipeline.voxelize import ImageSpec, Storage, voxelize

from conftest import DATA

CHANNELS = parse_channels("C,N,O,*")


@pytest.fixture(scope="module")
def lattice(lattice_factory):
    return lattice_factory()


def test_the_neighbor_sits_on_the_labels_face_at_the_distance(lattice):
    pairs = NeighborPairs(lattice, jitter_voxels=5, noise_voxels=1, seed=3)
    assert pairs.distance_voxels == 22  # the view's 21 voxels + 1 Å, as macromol_gym_pretrain
    batch = pairs[list(range(len(pairs)))]
    assert batch["image"].shape == (len(pairs), 2, 4, 21, 21, 21)
    offsets = (batch["center_A"][:, 1] - batch["center_A"][:, 0]).double().numpy()
    turned = np.einsum("nij,nj->ni", CUBE_ROTATION_MATRICES[batch["cube_rotation"].numpy()], offsets)
    faces = FACE_DIRECTIONS[batch["label"].numpy()]
    along = (turned * faces).sum(axis=1)
    assert np.all((along >= 21) & (along <= 23))  # 22 ± the noise of 1 voxel
    assert np.abs(turned - along[:, None] * faces).max() <= 1.0  # across: the noise only
    counts = np.bincount(batch["label"].numpy(), minlength=6)
    assert counts.min() > 0.08 * len(pairs), counts  # the label is uniform (88 pairs: ~15 each), whatever the structure
    assert len(np.unique(batch["cube_rotation"])) >= 20  # 24 possible, 88 draws


def test_both_views_are_the_voxelizer_at_the_reported_centres(lattice):
    pairs = NeighborPairs(lattice, jitter_voxels=4, seed=1, dequantize=False)
    atoms = {}
    batch = pairs[list(range(0, len(pairs), 11))]
    for k in range(len(batch["label"])):
        name = pairs.structure_id(pairs.local_structure(int(batch["structure_index"][k])))
        if name not in atoms:
            atoms[name] = parse_atoms(next(DATA.glob(name + ".cif*")), CHANNELS)
        for view in (0, 1):
            center = batch["center_A"][k, view].double().numpy()
            image = voxelize(atoms[name].xyz, atoms[name].channel, center, ImageSpec(21, 1.0, 4, 0.5))
            want = torch.from_numpy(Storage("uint8").encode(image)[0])
            assert torch.equal(batch["image"][k, view], rotate_tensor(want, int(batch["cube_rotation"][k])))
        assert (batch["image"][k, 1] > 0).float().mean() > 0.02  # the neighbor holds atoms
    item = pairs[22]
    assert torch.equal(item["image"], batch["image"][2]) and item["label"] == int(batch["label"][2])


def test_choices_follow_seed_epoch_and_index(lattice):
    a, b = NeighborPairs(lattice, seed=7), NeighborPairs(lattice, seed=7)
    ids = list(range(40))
    first = a[ids]
    assert torch.equal(first["label"], b[ids]["label"]) and torch.equal(first["image"], b[ids]["image"])
    a.set_epoch(1)
    second = a[ids]
    assert not torch.equal(first["label"], second["label"])
    assert torch.equal(first["origin_id"][first["origin_id"] == torch.arange(40)],
                       torch.arange(40)[first["origin_id"] == torch.arange(40)])


def test_homes_without_a_neighbor_give_their_place_to_the_next_origin(lattice):
    pairs = NeighborPairs(lattice, min_neighbor_fill=0.2)
    batch = pairs._place_pairs(np.arange(len(pairs)))
    moved = int((batch["origin"] != np.arange(len(pairs))).sum())
    assert moved == pairs.homes_without_neighbor() > 0
    none = NeighborPairs(lattice, min_neighbor_fill=0.0)
    assert none.homes_without_neighbor() == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(distance_voxels=15), "the views would overlap by up to 6 voxels"),
    (dict(distance_voxels=22, noise_voxels=3), "the views would overlap by up to 2 voxels"),
    (dict(noise_voxels=-1), "noise_voxels must be an integer >= 0, got -1"),
    (dict(distance_voxels=500), "distance_voxels 500 is more than 8 view widths"),
    (dict(min_neighbor_fill=1.5), r"min_neighbor_fill must be in \[0, 1\), got 1.5"),
])
def test_bad_pair_options_are_one_line(lattice, kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeighborPairs(lattice, **kwargs)


def test_pairs_need_a_lattice_cache(lattice_factory):
    with pytest.raises(ValueError, match="build it with `pipeline build-cache --layout lattice`"):
        NeighborPairs(lattice_factory(layout="origins"))
    assert len(NeighborPairs(lattice_factory(), distance_voxels=15, overlap_voxels=6)) > 0
    assert fmt.read_attrs(lattice_factory()).params.layout == "lattice"


def test_stream_sampler_epochs_draw_new_samples_and_cover_evenly(lattice):
    from cache_tools.read.lightning import StreamSampler

    pairs = NeighborPairs(lattice)
    n = len(pairs)
    sampler = StreamSampler(pairs, epoch_size=30, seed=2)
    epochs = []
    for epoch in range(2 * n // 30 + 1):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
        assert len(epochs[-1]) == len(sampler) == 30
    assert int(pairs._epoch) == epoch  # the dataset follows the sampler's epoch
    assert epochs[0] != epochs[1]
    counts = np.bincount(np.concatenate(epochs)[:2 * n], minlength=n)
    assert counts.min() == counts.max() == 2  # two whole passes, each a permutation
    halves = [StreamSampler(pairs, 30, num_replicas=2, rank=r, seed=2) for r in (0, 1)]
    assert sorted(list(halves[0]) + list(halves[1])) == sorted(epochs[0])


def test_datamodule_serves_pairs_with_an_epoch_size(lattice):
    from cache_tools import VoxelCacheDataModule

    dm = VoxelCacheDataModule(lattice, val_cache=lattice, neighbor_pairs={"noise_voxels": 1}, grid_voxels=15,
                              jitter_voxels=3, epoch_size=0.5, batch_size=8)
    dm.setup("fit")
    assert isinstance(dm.train_dataset, NeighborPairs) and dm.train_dataset.noise_voxels == 1
    assert dm.val_dataset.noise_voxels == 0 and dm.val_dataset.jitter_voxels == 0
    loader = dm.train_dataloader()
    assert len(loader.sampler) == round(0.5 * len(dm.train_dataset))
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 2, 4, 15, 15, 15) and batch["label"].shape == (8,)
    with pytest.raises(ValueError, match="epoch_size: a positive number"):
        VoxelCacheDataModule(lattice, epoch_size=0)
