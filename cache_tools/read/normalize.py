"""Dequantization and per-channel normalization as one affine map, ``image = a * stored + b``,
which the read kernels apply in the same pass as the copy or decode."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def affine_of(scale: float, n_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None,
            dequantize: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-channel (a, b) with image = a * stored + b: the dequantization scale, and with
    ``normalize_mean``/``normalize_std`` the normalization (v - mean) / std folded in
    (a = scale / std, b = -mean / std). (None, None) when it is the identity."""
    if (mean is None) != (std is None):
        raise ValueError("normalize_mean and normalize_std go together: give both or neither")
    if mean is None:
        return (None, None) if scale == 1.0 else (np.full(n_channels, scale, np.float32), None)
    if not dequantize:
        raise ValueError("normalize_mean/normalize_std need float32 images: not with dequantize=False")
    values = {}
    for name, given in (("normalize_mean", mean), ("normalize_std", std)):
        array = np.broadcast_to(np.asarray(given, np.float64), (n_channels,)) if np.ndim(given) == 0 \
            else np.asarray(given, np.float64)
        if array.shape != (n_channels,) or not np.all(np.isfinite(array)):
            raise ValueError(f"{name}: expected {n_channels} finite numbers (one per channel), got {given!r}")
        values[name] = array
    if np.any(values["normalize_std"] <= 0):
        raise ValueError(f"normalize_std: every value must be positive, got {std!r}")
    a = (scale / values["normalize_std"]).astype(np.float32)
    b = (-values["normalize_mean"] / values["normalize_std"]).astype(np.float32)
    return a, b
