"""The neighbor-location task on a lattice cache: pairs of views cut at training time.

A sample is a *home* view near an origin and a *neighbor* view ``distance_voxels`` away along
one of the 6 lattice directions, both turned by one cube rotation so that the neighbor lies
on the face ``FACE_DIRECTIONS[label]`` of the home: the label says where the neighbor is.
Only directions whose neighbor view holds atoms are drawn (its estimated fill, from the
build's per-block counts, at least ``min_neighbor_fill``); the label is uniform over the 6
faces whatever the direction, and the rotation one of the 4 that turn the direction onto
the label's face. Every choice is a function of (seed, epoch, index).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from cache_tools.read import kernel
from cache_tools.read.batch import SampleBatch, batch_buffer
from cache_tools.read.dataset import VoxelCacheDataset
from cache_tools.read.rotations import CUBE_ROTATION_MATRICES, FACE_DIRECTIONS, TURNING
from cache_tools.read.views import mix_array

DEFAULT_MIN_FILL = 0.1  # README "Neighbor pairs": the sample's solvent views hold less than 2%, buried ones 30-50%


class NeighborPairs(VoxelCacheDataset):
    """``pairs[i]``: ``image`` (2, C, N, N, N) (home, neighbor), ``label`` 0..5, ``center_A`` (2, 3)
    the two view centres (structure frame), ``cube_rotation``, ``rotation`` (lattice copy),
    ``origin_id``, ``structure_index``; ``pairs[list]`` a batch (B, 2, C, N, N, N).

    ``distance_voxels`` (default: the view's width + 1 Å, as macromol_gym_pretrain places its
    neighbors) between the view centres along the direction, each axis moved by up to
    ``noise_voxels`` (neighbor only); the home is jittered by up to ``jitter_voxels`` per axis
    around the origin (5 Å at 1 Å voxels is their "zone" cube). ``overlap_voxels``: how far
    the two views may overlap along the direction (0: never). ``rotate=False`` keeps the lattice
    axes (the label is then the direction itself). Other arguments as VoxelCacheDataset, ``origins=NAME``
    included: homes at the centres of a stored origin set (``cache-tools origins``).

    ``rotation_matrix(sample) @ (center_A[1] - center_A[0])`` points along
    ``FACE_DIRECTIONS[label]`` (without ``--rotations``: ``CUBE_ROTATION_MATRICES[cube_rotation]``).
    A home none of whose 6 neighbors reaches ``min_neighbor_fill`` gives its place to the next
    origin of the selection; :meth:`homes_without_neighbor` counts them.
    """

    def __init__(self, cache: str | os.PathLike, distance_voxels: int | None = None, noise_voxels: int = 0,
                 overlap_voxels: int = 0, min_neighbor_fill: float = DEFAULT_MIN_FILL, rotate: bool = True,
                 **kwargs: Any):
        super().__init__(cache, rotate=rotate, **kwargs)
        if not self.lattice:
            raise ValueError(f"{self.root}: NeighborPairs cuts views at training time; this cache stores one "
                             "image per origin: build it with `pipeline build-cache --layout lattice`")
        n, res = self.view_voxels, self.geometry.resolution
        if distance_voxels is None:
            distance_voxels = n + max(1, round(1.0 / res))
        for name, value in (("distance_voxels", distance_voxels), ("noise_voxels", noise_voxels),
                            ("overlap_voxels", overlap_voxels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (1 if name == "distance_voxels" else 0):
                raise ValueError(f"NeighborPairs: {name} must be an integer >= "
                                 f"{1 if name == 'distance_voxels' else 0}, got {value!r}")
        if distance_voxels - noise_voxels < n - overlap_voxels:
            raise ValueError(f"NeighborPairs: distance_voxels {distance_voxels} - noise_voxels {noise_voxels} puts the "
                             f"neighbor within {n} voxels of its home: the views would overlap by up to "
                             f"{n - distance_voxels + noise_voxels} voxels (overlap_voxels allows {overlap_voxels})")
        if distance_voxels > 8 * n:
            raise ValueError(f"NeighborPairs: distance_voxels {distance_voxels} is more than 8 view widths: "
                             "the neighbor would not be a neighbor")
        if not 0 <= min_neighbor_fill < 1:
            raise ValueError(f"NeighborPairs: min_neighbor_fill must be in [0, 1), got {min_neighbor_fill!r}")
        self.distance_voxels, self.noise_voxels = int(distance_voxels), int(noise_voxels)
        self.overlap_voxels, self.min_neighbor_fill = int(overlap_voxels), float(min_neighbor_fill)
        self._fill = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_fill": None}

    def _block_fill(self) -> np.ndarray:
        from cache_tools import format as fmt

        if self._fill is None:
            self._fill = fmt.read_array(self.root, fmt.BLOCK_FILL)
        return self._fill

    def _neighbor_fills(self, lattices: np.ndarray, homes: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """(n, 6) estimated fill of the neighbor view in each direction."""
        corners = (homes[:, None, :] + self.distance_voxels * FACE_DIRECTIONS[None] + noise[:, None, :]).reshape(-1, 3)
        local = self.reader._local()
        fills = kernel.view_fill(np.repeat(lattices, 6), corners, self.view_voxels, local.grid, local.map_start,
                                 local.block_map, self._block_fill(), self.reader.edge)
        return fills.reshape(-1, 6)

    def _place_pairs(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Every choice of a batch of pairs: origins (after skipping homes with no neighbor),
        lattices, both corners, directions, labels, rotations."""
        state, n = self._local(), len(idx)
        epoch = int(self._epoch)
        asked, idx = idx, idx.copy()
        chosen = np.zeros(n, bool)
        out = {k: np.zeros(n, np.int64) for k in ("origin", "row", "lattice", "copy", "direction", "label", "cube")}
        out["home"], out["neighbor"] = np.zeros((n, 3), np.int64), np.zeros((n, 3), np.int64)
        for attempt in range(64):  # a home without a neighbor gives its place to the next origin
            todo = np.flatnonzero(~chosen)
            if not len(todo):
                break
            at = idx[todo] % self._len
            origins = self._origin_ids(at)
            rows = state.structure_index[origins].astype(np.int64)
            placed = self.geometry.place(self.seed, epoch, at, rows, state.center[origins], self.view_voxels,
                                         self.jitter_voxels, False, tag=0)
            noise = np.zeros((len(todo), 3), np.int64)
            if self.noise_voxels:
                for axis in range(3):
                    noise[:, axis] = (mix_array(self.seed, epoch, at, 7 + axis, 1)
                                      % np.uint64(2 * self.noise_voxels + 1)).astype(np.int64) - self.noise_voxels
            valid = self._neighbor_fills(placed.lattices, placed.corners, noise) >= self.min_neighbor_fill
            count = valid.sum(axis=1)
            ok = count > 0
            key = asked[todo]  # the sample's own draws, whichever origin it ends up on
            pick = (mix_array(self.seed, epoch, key, 10, attempt) % np.maximum(count, 1).astype(np.uint64)).astype(np.int64)
            direction = np.argmax(np.cumsum(valid, axis=1) > pick[:, None], axis=1)
            label = (mix_array(self.seed, epoch, key, 11, attempt) % np.uint64(6)).astype(np.int64)
            turn = (mix_array(self.seed, epoch, key, 12, attempt) % np.uint64(4)).astype(np.int64)
            cube = TURNING[direction, label, turn] if self.rotate else direction
            if not self.rotate:
                label = direction
            home = placed.corners
            neighbor = home + self.distance_voxels * FACE_DIRECTIONS[direction] + noise
            rows_ok = todo[ok]
            for key, value in (("origin", origins), ("row", rows), ("lattice", placed.lattices),
                               ("copy", placed.copies), ("direction", direction), ("label", label),
                               ("cube", cube if self.rotate else np.zeros(len(todo), np.int64)),
                               ("home", home), ("neighbor", neighbor)):
                out[key][rows_ok] = value[ok]
            chosen[rows_ok] = True
            idx[todo[~ok]] += 1
        if not chosen.all():
            raise ValueError(f"{self.root}: no home among 64 consecutive origins has a neighbor view with "
                             f"fill >= min_neighbor_fill {self.min_neighbor_fill}; lower it")
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        from cache_tools.read.indexing import scalar_index as _scalar_index

        scalar = _scalar_index(index)
        if scalar is None:
            if isinstance(index, slice):
                index = range(*index.indices(self._len))
            return self.__getitems__(index).data
        batch = self.__getitems__([scalar]).data
        return {key: (value[0] if key in ("image", "center_A") else int(value[0])) for key, value in batch.items()}

    def __getitems__(self, indices) -> SampleBatch:
        idx = np.asarray(indices)
        if idx.size and idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got {idx.dtype} ({type(indices).__name__})")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        self._origin_ids(idx)  # range check, IndexError naming the selection
        idx = idx % self._len if self._len else idx
        p, n, size = self._place_pairs(idx), len(idx), self.view_voxels
        if self.verify:
            for lattice, home, neighbor in zip(p["lattice"].tolist(), p["home"], p["neighbor"]):
                for corner in (home, neighbor):
                    self.reader.verify_blocks(self.reader.touched_blocks(lattice, corner, size))
        buffer = batch_buffer((n, 2, size, size, size, len(self.channels)), self.image_dtype, pin=self._pin())
        views = buffer.numpy().reshape(2 * n, size, size, size, len(self.channels))
        self.reader.read(np.repeat(p["lattice"], 2), np.stack([p["home"], p["neighbor"]], axis=1).reshape(-1, 3),
                         size, views, np.repeat(p["cube"], 2), self._a, self._b)
        from cache_tools import format as fmt
        centers = fmt.view_center(np.stack([p["home"], p["neighbor"]], axis=1).reshape(-1, 3), self.geometry.resolution, size)
        centers = self.geometry.from_copy(np.repeat(p["row"], 2), np.repeat(p["copy"], 2), centers)
        images = buffer.permute(0, 1, 5, 2, 3, 4)
        if self.transform is not None:
            images = torch.stack([self.transform(pair) for pair in images])
        return SampleBatch({"image": images, "label": torch.from_numpy(p["label"]),
                            "origin_id": torch.from_numpy(p["origin"]), "structure_index": torch.from_numpy(p["row"]),
                            "center_A": torch.from_numpy(centers.astype(np.float32).reshape(n, 2, 3)),
                            "rotation": torch.from_numpy(p["copy"]), "cube_rotation": torch.from_numpy(p["cube"])})

    def homes_without_neighbor(self) -> int:
        """Origins of this selection (at their own centre, no jitter) none of whose 6 neighbor views
        reaches ``min_neighbor_fill``: the homes a pass gives to the next origin."""
        state, total = self._local(), 0
        for start in range(0, self._len, 65536):
            at = np.arange(start, min(start + 65536, self._len))
            origins = self._origin_ids(at)
            rows = state.structure_index[origins].astype(np.int64)
            placed = self.geometry.place(self.seed, 0, at, rows, state.center[origins], self.view_voxels, 0, False)
            fills = self._neighbor_fills(placed.lattices, placed.corners, np.zeros((len(at), 3), np.int64))
            total += int((~(fills >= self.min_neighbor_fill).any(axis=1)).sum())
        return total

    def rotation_matrix(self, sample: dict[str, Any]) -> torch.Tensor:
        """As VoxelCacheDataset.rotation_matrix: ``Q @ (center_A[1] - center_A[0])`` is the label's face."""
        return super().rotation_matrix(sample)

    def __repr__(self) -> str:
        return (f"NeighborPairs({self.root!r}, origins={self.origins!r}, n={self._len}, view={self.view_voxels}, "
                f"distance={self.distance_voxels}, "
                f"noise={self.noise_voxels}, jitter={self.jitter_voxels}, min_neighbor_fill={self.min_neighbor_fill}, "
                f"rotate={self.rotate})")


__all__ = ["NeighborPairs", "FACE_DIRECTIONS", "CUBE_ROTATION_MATRICES"]
