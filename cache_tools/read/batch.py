"""A batch read in one piece: its buffer, allocated where it is going, and the collate that
hands it over untouched."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def batch_buffer(shape: tuple[int, ...], dtype: np.dtype, pin: bool) -> torch.Tensor:
    """An uninitialized batch, allocated where it is going.

    In a DataLoader worker the batch travels to the main process through shared
    memory; allocating it there directly (as torch's default collate does) saves
    the copy into shared memory and keeps big short-lived buffers out of the
    worker's malloc heap, which would otherwise keep growing by a batch at a time.
    In the main process, unpinned, numpy allocates it: malloc reuses a freed batch's
    pages, where torch's allocator maps and faults in fresh ones every time (+60 µs per
    2.4 MB batch, half a uint8 batch's copy).
    """
    if torch.utils.data.get_worker_info() is not None:
        torch_dtype = torch.from_numpy(np.zeros(0, dtype)).dtype
        numel = int(np.prod(shape))
        storage = torch.empty(0, dtype=torch_dtype)._typed_storage()._new_shared(numel, device="cpu")
        return torch.empty(0, dtype=torch_dtype).new(storage).resize_(shape)
    if pin:
        return torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, pin_memory=True)
    return torch.from_numpy(np.empty(shape, dtype))


class SampleBatch(Sequence):
    """A batch read in one piece, that still looks like a list of samples.

    ``batch_collate`` returns ``.data`` untouched; torch's default collate sees a
    sequence of per-sample dicts (views into the batch) and stacks them, so a plain
    ``DataLoader(ds, batch_size=B)`` works too, at the cost of one more copy.
    """

    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data
        self._samples: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.data["origin_id"])

    def __getitem__(self, k):
        if self._samples is None:  # built once, only when someone treats the batch as a list
            d = self.data
            self._samples = [
                {"image": image, "origin_id": origin, "structure_index": structure,
                 "center_A": center, "rotation": rotation, "cube_rotation": cube}
                for image, origin, structure, center, rotation, cube in zip(
                    d["image"].unbind(0), d["origin_id"].tolist(), d["structure_index"].tolist(),
                    d["center_A"].unbind(0), d["rotation"].tolist(), d["cube_rotation"].tolist())]
        return self._samples[k]


def batch_collate(batch):
    """``collate_fn`` for VoxelCacheDataset: a SampleBatch passes through, anything else is collated."""
    if isinstance(batch, SampleBatch):
        return batch.data
    return torch.utils.data.default_collate(batch)
