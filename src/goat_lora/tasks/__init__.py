"""Task families, registered by name. Adding a family: one module implementing `base.Task`, plus
one line in TASKS (docs/design.md shows it)."""

from __future__ import annotations

from .base import Task
from .causal_lm import CausalLM
from .classification import Classification
from .image import ImageClassification
from .qa import QA
from .regression import Regression

TASKS: dict[str, Task] = {
    "classification": Classification(),
    "regression": Regression(),
    "image-classification": ImageClassification(),
    "qa": QA(),
    "causal-lm": CausalLM(),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task {name!r} is not a task family; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# Names --data resolves without files or network (each family's built-in data sets).
BUILTIN_DATA = frozenset(name for task in TASKS.values() for name in task.builtin_data)
