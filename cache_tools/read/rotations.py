"""The 24 proper rotations of a cube, as exact axis permutations and flips.

Rotating a voxel image by a multiple of 90° needs no resampling: it is a strided
view of the same bytes. Rotation ``k`` maps the centred voxel coordinates
``u`` of the input to ``M_k @ u`` in the output, where ``M_k`` is a signed
permutation matrix with determinant +1; index 0 is the identity.
"""
from __future__ import annotations

import itertools

import numpy as np


def _build() -> tuple[list[tuple[tuple[int, int, int], tuple[bool, bool, bool]]], np.ndarray]:
    table, mats = [], []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            m = np.zeros((3, 3), dtype=np.int64)
            for d in range(3):
                m[d, perm[d]] = -1 if flips[d] else 1
            if round(np.linalg.det(m)) == 1:
                table.append((perm, flips))
                mats.append(m)
    return table, np.stack(mats)


CUBE_ROTATIONS, CUBE_ROTATION_MATRICES = _build()
N_CUBE_ROTATIONS = len(CUBE_ROTATIONS)  # 24
# the same table as arrays, for the compiled kernels: output axis d reads input axis PERMS[k, d],
# reversed when FLIPS[k, d]
PERMS = np.array([perm for perm, _ in CUBE_ROTATIONS], np.int64)
FLIPS = np.array([flips for _, flips in CUBE_ROTATIONS], np.bool_)
assert N_CUBE_ROTATIONS == 24 and CUBE_ROTATIONS[0] == ((0, 1, 2), (False, False, False))


def rotation_index(matrix: np.ndarray) -> int:
    """Index of a signed-permutation rotation matrix in the table."""
    hits = np.flatnonzero((CUBE_ROTATION_MATRICES == np.asarray(matrix)).all(axis=(1, 2)))
    if len(hits) != 1:
        raise ValueError("not one of the 24 proper cube rotations")
    return int(hits[0])


def inverse(k: int) -> int:
    return rotation_index(CUBE_ROTATION_MATRICES[k].T)


def compose(j: int, k: int) -> int:
    """Index of "rotate by k, then by j"."""
    return rotation_index(CUBE_ROTATION_MATRICES[j] @ CUBE_ROTATION_MATRICES[k])


def rotate_view(image: np.ndarray, k: int) -> np.ndarray:
    """A view of ``image`` (..., X, Y, Z) rotated by rotation ``k``; copies nothing."""
    if k == 0:
        return image
    perm, flips = CUBE_ROTATIONS[k]
    lead = image.ndim - 3
    out = image.transpose(*range(lead), *(lead + p for p in perm))
    index = tuple([slice(None)] * lead + [slice(None, None, -1) if f else slice(None) for f in flips])
    return out[index]


def rotate_tensor(image, k: int):
    """Torch version of :func:`rotate_view` for tensors on any device (returns a view)."""
    if k == 0:
        return image
    perm, flips = CUBE_ROTATIONS[k]
    lead = image.dim() - 3
    out = image.permute(*range(lead), *(lead + p for p in perm))
    dims = [lead + d for d in range(3) if flips[d]]
    return out.flip(dims) if dims else out


def rotate_batch(images, rotations):
    """Rotate sample b of ``images`` [B, ..., X, Y, Z] by cube rotation ``rotations[b]``.

    One permute/flip per distinct rotation (at most 24 kernels), on the images' own
    device, so augmentation can run on the GPU after the batch is transferred.
    """
    import torch

    rotations = torch.as_tensor(rotations).to("cpu")
    out = torch.empty_like(images)
    for k in torch.unique(rotations).tolist():
        sel = torch.nonzero(rotations == k).squeeze(1).to(images.device)
        out[sel] = rotate_tensor(images.index_select(0, sel), k)
    return out


class RandomCubeRotation:
    """Batch transform: an independent random cube rotation per sample (seeded)."""

    def __init__(self, seed: int | None = None):
        import torch

        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __call__(self, images):
        import torch

        rotations = torch.randint(0, N_CUBE_ROTATIONS, (images.shape[0],), generator=self.generator)
        return rotate_batch(images, rotations)


# The 6 face directions of the neighbor-location task, in the order macromol_gym_pretrain's
# ``cube_faces()`` uses (label 0..5 = -y, +y, -x, +x, +z, -z of the image axes (x, y, z)), so a
# model trained on either data says the same thing by the same label.
FACE_DIRECTIONS = np.array([[0, -1, 0], [0, 1, 0], [-1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, -1]], np.int64)


def _turning() -> np.ndarray:
    """(6 directions, 6 faces, 4) cube rotations k with CUBE_ROTATION_MATRICES[k] @ direction = face."""
    table = np.empty((6, 6, 4), np.int64)
    for d, direction in enumerate(FACE_DIRECTIONS):
        for f, face in enumerate(FACE_DIRECTIONS):
            hits = [k for k in range(N_CUBE_ROTATIONS) if np.array_equal(CUBE_ROTATION_MATRICES[k] @ direction, face)]
            assert len(hits) == 4
            table[d, f] = hits
    return table


TURNING = _turning()
