"""Read side of the voxel cache: needs only numpy and torch at import time."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["VoxelCacheDataset", "MemoryProfiler", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import cache_tools` stays light and pulls in nothing a
    # forked DataLoader worker would have to copy.
    if name == "VoxelCacheDataset":
        from cache_tools.dataset import VoxelCacheDataset
        return VoxelCacheDataset
    if name == "MemoryProfiler":
        from cache_tools.memory import MemoryProfiler
        return MemoryProfiler
    raise AttributeError(f"module 'cache_tools' has no attribute {name!r}")
