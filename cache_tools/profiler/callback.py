"""Marks on the memory plot from a PyTorch Lightning run (imports lightning)."""
from __future__ import annotations

from typing import Any

import lightning as L

from cache_tools.profiler.sampler import MemoryProfiler


class MemoryMarkCallback(L.Callback):
    """Marks epochs and validation on the memory plot of a Lightning run.

    ``Trainer(callbacks=[MemoryMarkCallback(prof)])``. Copy-on-read growth typically
    shows as a USS staircase per epoch, and validation starts extra workers; the marks
    make both visible.
    """

    def __init__(self, profiler: MemoryProfiler) -> None:
        self.profiler = profiler

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.profiler.mark(f"epoch {trainer.current_epoch}")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.profiler.mark("validation")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.profiler.mark("validation end")
