"""``cache_tools.memory``: the memory profiler's public names (it lives in :mod:`cache_tools.profiler`).

Kept so that ``from cache_tools.memory import MemoryProfiler`` and friends keep working.
``MemoryMarkCallback`` is a ``lightning.Callback`` and lives in :mod:`cache_tools.lightning`;
importing it from here imports lightning then, never before.
"""
from __future__ import annotations

from cache_tools.profiler import *  # noqa: F401,F403
from cache_tools.profiler import __all__ as _profiler_all

__all__ = [*_profiler_all, "MemoryMarkCallback"]


def __getattr__(name: str):
    if name == "MemoryMarkCallback":
        from cache_tools.lightning import MemoryMarkCallback
        return MemoryMarkCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# private names some callers (tests) reach for
from cache_tools.profiler.sampler import Timeline as _Timeline, read_samples as _read_samples  # noqa: E402,F401
