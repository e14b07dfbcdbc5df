"""The training read path: everything a DataLoader worker runs.

``reader`` turns origin ids into image bytes (bounded open files, zero-copy views or
one decode), ``dataset`` is the ``VoxelCacheDataset``, ``selection`` decides which
structures it holds (splits, subsets, rows), ``structure_meta`` and ``where`` read and
select by per-structure metadata, ``rotations`` and ``sampling`` augment and order,
``budget`` knows the memory limit, ``lightning`` wraps it all in a DataModule.
Imports only ``cache_tools.format`` of the project (numpy, torch and numba otherwise;
``kernel`` holds every compiled function, ``native`` finds the C functions they call).
"""
