"""voxel-cache's read side and tools: ``import cache_tools`` imports nothing heavy; the read path
needs numpy, torch and numba (its compiled kernels).

Four rooms, imports running one way (ARCHITECTURE.md):

- ``cache_tools.format``: the on-disk format, shared with the writer (``pipeline``);
- ``cache_tools.read``: the training read path (reader, Dataset, selections, Lightning);
- ``cache_tools.profiler``: the memory profiler;
- ``cache_tools.commands``: the ``cache-tools`` command line.

The public names below are imported on first use, so that ``import cache_tools`` stays
light and pulls in nothing a DataLoader worker would have to copy.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> defining module.
_EXPORTS = {
    "VoxelCacheDataset": "cache_tools.read.dataset",
    "NeighborPairs": "cache_tools.read.pairs",
    "SampleBatch": "cache_tools.read.batch",
    "batch_collate": "cache_tools.read.batch",
    "BlockShuffleSampler": "cache_tools.read.sampling",
    "RandomCubeRotation": "cache_tools.read.rotations",
    "ContinuousRotation": "cache_tools.read.augment",
    "CacheError": "cache_tools.format",
    "CacheAttrs": "cache_tools.format",
    "read_attrs": "cache_tools.format",
    "compute_splits": "cache_tools.commands.split",
    "origin_projections": "cache_tools.commands.show",
    "MemoryProfiler": "cache_tools.profiler",
    # optional extra: these import lightning, on first use only
    "VoxelCacheDataModule": "cache_tools.read.lightning",
    "MemoryMarkCallback": "cache_tools.profiler.callback",
}
# Public modules by their short names: ``cache_tools.rotations.CUBE_ROTATION_MATRICES``.
_MODULES = {"rotations": "cache_tools.read.rotations"}

__all__ = [*_EXPORTS, *_MODULES, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'cache_tools' has no attribute {name!r}")
