"""The demo's tasks by name: `"shapes"` (`llada_v.demo.task`, the earlier model's: one to three distinct shapes)
and `"scenes"` (`llada_v.demo.scenes`, the shipped model's: one to five shapes with sizes, descriptions of up to
23 words). Both modules have the same interface, so training, evaluation and the demo take either."""

from __future__ import annotations

from types import ModuleType

from . import scenes, task

TASKS = {task.NAME: task, scenes.NAME: scenes}
DEFAULT_TASK = task.NAME  # the training command's and `build_demo_tokenizer`'s default
# The task of the model in `demo/checkpoint/` (tests/test_demo_shipped.py checks its tokenizer against it).
SHIPPED_TASK = scenes.NAME


def get_task(name: str) -> ModuleType:
    """The task module called `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}; expected one of {tuple(TASKS)}")
    return TASKS[name]


__all__ = ["DEFAULT_TASK", "SHIPPED_TASK", "TASKS", "get_task"]
