"""Read side of the voxel cache: needs only numpy and torch at import time."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> defining module. Imported on first use so that `import cache_tools`
# stays light and pulls in nothing a forked DataLoader worker would have to copy.
_EXPORTS = {
    "VoxelCacheDataset": "cache_tools.dataset",
    "SampleBatch": "cache_tools.dataset",
    "batch_collate": "cache_tools.dataset",
    "BlockShuffleSampler": "cache_tools.sampling",
    "RandomCubeRotation": "cache_tools.rotations",
    "CacheError": "cache_tools.format",
    "MemoryProfiler": "cache_tools.profiler",
    # optional extra: these import lightning, on first use only
    "VoxelCacheDataModule": "cache_tools.lightning",
    "MemoryMarkCallback": "cache_tools.lightning",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cache_tools' has no attribute {name!r}")
