"""Continuous rotations of a batch on its own device: an approximation, for lattice caches.

Exact images exist only for the 24 cube rotations (a permutation of voxels) and for the
rotations of the lattice copies a cache was built with. :class:`ContinuousRotation` turns
each view of a batch by any rotation, by trilinear resampling (``torch.nn.functional.grid_sample``)
of a larger view: cut views of ``ContinuousRotation.source_voxels(n)`` voxels (enough for
the rotated cube of n to stay inside, n·√3) and get n-voxel images. It is *not* what
voxelizing the rotated atoms gives: resampling blurs each atom over its neighbours
(BENCHMARKS.md "Lattice" measures the error against voxelizing the rotated atoms).
A cube rotation lands every sample point on a voxel centre and is exact.
"""
from __future__ import annotations

import math

import torch


def random_rotations(count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(count, 3, 3) uniformly random proper rotations (from normalized Gaussian quaternions)."""
    q = torch.randn(count, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], 1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], 1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 1)], 1)


class ContinuousRotation:
    """``images, rotations = ContinuousRotation(n)(batch)``: (B, C, m, m, m) views (m >=
    ``source_voxels(n)``, same centre) turned by ``rotations`` (B, 3, 3; drawn uniformly when not
    given) and cropped to n voxels, trilinear. An atom at centred voxel coordinate u of the
    input shows at ``R @ u`` of the output (as ``rotation_matrix`` reports; compose with it)."""

    def __init__(self, out_voxels: int, seed: int | None = None) -> None:
        if not isinstance(out_voxels, int) or out_voxels < 1:
            raise ValueError(f"ContinuousRotation: out_voxels must be a positive integer, got {out_voxels!r}")
        self.out_voxels = out_voxels
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    @staticmethod
    def source_voxels(out_voxels: int) -> int:
        """The view size to cut so that every rotation of the n-voxel cube stays inside it
        (n·√3 plus one voxel for interpolation, of n's parity: the same centre)."""
        m = math.ceil(out_voxels * math.sqrt(3)) + 1
        return m + (m - out_voxels) % 2

    def __call__(self, images: torch.Tensor, rotations: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, m = images.shape[0], images.shape[1], images.shape[-1]
        if m < self.source_voxels(self.out_voxels) and rotations is None:
            raise ValueError(f"ContinuousRotation: views of {m} voxels are too small to turn a "
                             f"{self.out_voxels}-voxel cube freely; cut {self.source_voxels(self.out_voxels)}")
        if rotations is None:
            rotations = random_rotations(b, self.generator)
        rotations = rotations.to(device=images.device, dtype=torch.float64)
        n = self.out_voxels
        axis = torch.arange(n, device=images.device, dtype=torch.float64) - (n - 1) / 2
        u = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)      # output voxel centres
        src = torch.einsum("bji,xyzj->bxyzi", rotations, u)                          # R^T u: where each comes from
        grid = src / ((m - 1) / 2)                                                    # [-1, 1], align_corners=True
        # grid_sample's last grid coordinate indexes the input's last axis (W = our z), first the depth (our x)
        out = torch.nn.functional.grid_sample(images.float(), grid.flip(-1).to(torch.float32), mode="bilinear",
                                              padding_mode="zeros", align_corners=True)
        return out, rotations.to(torch.float32)
