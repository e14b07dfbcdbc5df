"""Voxelize atoms around a centre with macromol_voxelize, and store images compactly.

The image is exactly ``macromol_voxelize.image_from_atoms`` of the same atoms (one
channel each, radius ``atom_radius_A``, FractionAtom fill, Sum aggregation, occupancy 1
or, with ``--occupancy weight``, each atom's occupancy: the kernel multiplies an atom's
whole contribution by it) on ``Grid(grid_voxels, resolution_A, center)``. We call the
library's kernel on a numpy box pre-filter instead of building a polars frame per
origin; atoms outside the box contribute nothing, so the result is bit-identical (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import macromol_voxelize as mmvox
from macromol_voxelize._voxelize import AggAlgorithm, FillAlgorithm, Grid, _add_atoms_to_image

from cache_tools.format import UINT8_DEFAULT_MAX, StorageParams


@dataclass(frozen=True)
class ImageSpec:
    grid_voxels: int = 21
    resolution_A: float = 1.0
    n_channels: int = 4
    atom_radius_A: float = 0.5

    @property
    def shape(self) -> tuple[int, int, int, int]:
        L = self.grid_voxels
        return (self.n_channels, L, L, L)

    def voxelizer_attrs(self, occupancy: str = "one") -> dict:
        """How the kernel is called; ``occupancy`` "weight" passes each atom's occupancy instead of 1."""
        return {"name": "macromol_voxelize", "version": mmvox.__version__,
                "fill_algorithm": "FractionAtom", "agg_algorithm": "Sum",
                "occupancy": 1.0 if occupancy == "one" else "atom"}


def image_reach_A(spec: ImageSpec) -> float:
    """Radius of the sphere around the centre holding every atom that can touch the image.

    An atom touches it only inside the box |d_i| < L*res/2 + radius (the filter of
    macromol_voxelize), whose corners lie sqrt(3) times that far away.
    """
    return (3 ** 0.5) * (spec.grid_voxels * spec.resolution_A / 2 + spec.atom_radius_A)


def voxelize(xyz: np.ndarray, channel: np.ndarray, center: np.ndarray, spec: ImageSpec,
             out: np.ndarray | None = None, occupancy: np.ndarray | None = None) -> np.ndarray:
    """float32 image (C, L, L, L) of atoms ``xyz`` (n,3 float64) centred on ``center``;
    ``occupancy`` (n,) weights each atom (None: 1)."""
    center = np.asarray(center, dtype=np.float64)
    reach = spec.grid_voxels * spec.resolution_A / 2 + spec.atom_radius_A
    inside = np.all(np.abs(xyz - center) < reach, axis=1)
    img = out if out is not None else np.empty(spec.shape, dtype=np.float32)
    img.fill(0)
    add_atoms(img, spec.grid_voxels, spec.resolution_A, center, xyz[inside], channel[inside], spec.atom_radius_A,
              None if occupancy is None else occupancy[inside])
    return img


def add_atoms(img: np.ndarray, grid_voxels: int, resolution_A: float, center: np.ndarray,
              xyz: np.ndarray, channel: np.ndarray, radius_A: float, occupancy: np.ndarray | None = None) -> None:
    """Add atoms to ``img`` (C, n, n, n) on ``Grid(n, resolution_A, center)``: the library's kernel
    (FractionAtom fill, Sum aggregation, each atom's contribution times its ``occupancy``, 1 if
    None), atoms added in their given order."""
    n = len(xyz)
    _add_atoms_to_image(
        img, Grid(grid_voxels, resolution_A, np.asarray(center, dtype=np.float64)),
        np.ascontiguousarray(xyz[:, 0]), np.ascontiguousarray(xyz[:, 1]), np.ascontiguousarray(xyz[:, 2]),
        np.full(n, radius_A), np.asarray(channel, dtype=np.int64), np.ones(n, dtype=np.uint32),
        np.ones(n) if occupancy is None else np.ascontiguousarray(occupancy, dtype=np.float64),
        FillAlgorithm.FractionAtom, AggAlgorithm.Sum,
    )


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix (from a normalized Gaussian quaternion)."""
    w, x, y, z = (q := rng.standard_normal(4)) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def origin_rotations(seed: int, origin_id: int, count: int) -> np.ndarray:
    """(count, 3, 3) rotations for one origin: the identity, then seeded random ones."""
    rng = np.random.default_rng([seed, 0x5EED, origin_id])
    mats = np.empty((count, 3, 3))
    mats[0] = np.eye(3)
    for r in range(1, count):
        mats[r] = random_rotation(rng)
    return mats


def rotate_about(xyz: np.ndarray, center: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    return (xyz - center) @ rotation.T + center


@dataclass(frozen=True)
class Storage:
    """How float32 images are stored: dtype plus the scale that dequantizes them."""

    dtype: str = "float32"
    uint8_max: float = UINT8_DEFAULT_MAX

    @property
    def scale(self) -> float:
        return self.uint8_max / 255.0 if self.dtype == "uint8" else 1.0

    @property
    def max_abs_error(self) -> float | str:
        if self.dtype == "uint8":
            return self.scale / 2  # for values <= uint8_max; larger values saturate (counted)
        if self.dtype == "float16":
            return "relative 2**-11, absolute 2**-25 below 6.1e-5 (float16 rounding)"
        return 0.0

    def encode(self, img: np.ndarray) -> tuple[np.ndarray, int]:
        """Return (stored array, number of saturated voxels)."""
        if self.dtype == "float32":
            return img, 0
        if self.dtype == "float16":
            return img.astype(np.float16), 0
        q = np.rint(img / np.float32(self.scale))
        saturated = int(np.count_nonzero(q > 255))
        return np.clip(q, 0, 255).astype(np.uint8), saturated

    def params(self) -> StorageParams:
        return StorageParams(self.dtype, self.scale, self.max_abs_error,
                             self.uint8_max if self.dtype == "uint8" else None)
