"""What a dataset index is: one integer (a sample) or a sequence or slice (a batch)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def scalar_index(index: Any) -> int | None:
    """``index`` as an int if it is one integer (int, numpy integer, 0-d integer array or
    tensor); None if it is a sequence or slice (a batch); TypeError for anything else."""
    if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
        return int(index)
    if isinstance(index, (np.ndarray, torch.Tensor)) and index.ndim == 0:
        kind = index.dtype.kind if isinstance(index, np.ndarray) else (
            "f" if index.is_floating_point() or index.is_complex() else
            "b" if index.dtype == torch.bool else "i")
        if kind in "iu":
            return int(index)
        raise TypeError(f"dataset index must be an integer, got a 0-d {index.dtype} {type(index).__name__}")
    if isinstance(index, (slice, list, tuple, range, np.ndarray, torch.Tensor)):
        return None
    raise TypeError(f"dataset index must be an integer, a sequence of integers or a slice, "
                    f"got {type(index).__name__} {index!r}")
