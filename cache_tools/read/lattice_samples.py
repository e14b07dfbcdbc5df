"""A lattice cache's samples: each sample's view placed (lattice copy, jitter, cube rotation,
reproducible from (seed, epoch, index)) and cut from the stored blocks.

A mixin of :class:`~cache_tools.read.dataset.VoxelCacheDataset` (kept apart: the per-origin
layout's reads live in the dataset itself). The host provides ``geometry``, ``reader`` (a
:class:`~cache_tools.read.lattice.LatticeReader`), ``view_voxels``, ``jitter_voxels``,
``rotate``, ``seed``, ``verify``, ``channels``, ``image_dtype``, ``transform``, ``_epoch``,
``_a``/``_b`` (the affine of :mod:`cache_tools.read.normalize`), ``_local()`` and ``_pin()``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cache_tools.read.batch import batch_buffer
from cache_tools.read.rotations import N_CUBE_ROTATIONS
from cache_tools.read.views import mix


class LatticeSamples:
    """``ds[i]`` and ``ds[ids]`` of a lattice cache."""

    def _view_item(self, index: int, origin: int, state: Any) -> dict[str, Any]:
        """``ds[i]`` of a lattice cache: :meth:`_read_views` for one sample, in scalars (numpy and
        torch calls cost microseconds each on one element)."""
        row, epoch, size = int(state.structure_index[origin]), int(self._epoch), self.view_voxels
        geometry, copies = self.geometry, self.geometry.copies
        copy = mix(self.seed, epoch, index, 1, 0) % copies if copies > 1 else 0
        cube = mix(self.seed, epoch, index, 2, 0) % N_CUBE_ROTATIONS if self.rotate else 0
        center = state.center[origin]
        if copies > 1:
            center = geometry.to_copy(np.array([row]), np.array([copy]), center[None])[0]
        res = geometry.resolution
        corner = [(round(2 * float(c) / res) - size + 1) // 2 for c in center.tolist()]  # format.view_corner
        if self.jitter_voxels:
            span = 2 * self.jitter_voxels + 1
            corner = [q + mix(self.seed, epoch, index, 3 + axis, 0) % span - self.jitter_voxels
                      for axis, q in enumerate(corner)]
        lattice = row * copies + copy
        if self.verify:
            self.reader.verify_blocks(self.reader.touched_blocks(lattice, np.array(corner), size))
        out = np.empty((size, size, size, len(self.channels)), self.image_dtype)
        self.reader.read_one(lattice, corner, size, out, cube, self._a, self._b)
        view_center = [(q + size / 2) * res for q in corner]
        if copies > 1:
            view_center = geometry.from_copy(np.array([row]), np.array([copy]), np.array([view_center]))[0].tolist()
        image = torch.from_numpy(out).permute(3, 0, 1, 2)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "origin_id": origin, "structure_index": row,
                "center_A": torch.from_numpy(np.array(view_center, np.float32)), "rotation": copy,
                "cube_rotation": cube}

    def _read_views(self, idx: np.ndarray, origins: np.ndarray) -> dict[str, torch.Tensor]:
        """A lattice cache's batch: each sample's view placed (copy, jitter, cube rotation from
        (seed, epoch, index)), cut, cast and rotated into one channel-last buffer, handed over as
        a (B, C, N, N, N) tensor in torch's channels_last_3d memory format (no copy)."""
        state, n, size = self._local(), len(origins), self.view_voxels
        rows = state.structure_index[origins].astype(np.int64)
        placed = self.geometry.place(self.seed, int(self._epoch), idx, rows, state.center[origins], size,
                                     self.jitter_voxels, self.rotate)
        if self.verify:
            for lattice, corner in zip(placed.lattices.tolist(), placed.corners):
                self.reader.verify_blocks(self.reader.touched_blocks(lattice, corner, size))
        buffer = batch_buffer((n, size, size, size, len(self.channels)), self.image_dtype, pin=self._pin())
        self.reader.read(placed.lattices, placed.corners, size, buffer.numpy(), placed.cube, self._a, self._b)
        return {"image": buffer.permute(0, 4, 1, 2, 3),
                "origin_id": torch.from_numpy(origins.astype(np.int64)),
                "structure_index": torch.from_numpy(rows),
                "center_A": torch.from_numpy(self.geometry.view_centers(placed, rows, size)),
                "rotation": torch.from_numpy(placed.copies),
                "cube_rotation": torch.from_numpy(placed.cube)}
