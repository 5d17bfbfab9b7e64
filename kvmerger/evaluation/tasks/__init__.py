"""Evaluation tasks, one file each. Importing this package registers every task by name."""

import importlib
import pkgutil

from kvmerger.evaluation.tasks.base import TASKS, Sample, Task, get_task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TASKS", "Sample", "Task", "get_task"]
