"""Named tasks: a builder registered under a name, built on demand. The runner (and so
`lmforge eval --task NAME`) looks a name up here before reading it as a task file or directory.

Generic code registers nothing; a package with tasks of its own registers them, e.g. the built-in
world's (`lmforge.world.tasks.register_tasks`, which the command line calls)."""

from __future__ import annotations

from collections.abc import Callable

from lmforge.eval.tasks import Task

TaskBuilder = Callable[[], Task]

_builders: dict[str, TaskBuilder] = {}


def register_task(name: str, builder: TaskBuilder) -> None:
    """Register `builder` under `name`; registering a name again replaces its builder."""
    if not name:
        raise ValueError("a task needs a non-empty name")
    _builders[name] = builder


def registered_tasks() -> list[str]:
    """The registered task names, in registration order."""
    return list(_builders)


def is_registered(name: str) -> bool:
    return name in _builders


def build_task(name: str) -> Task:
    """The task registered under `name`, freshly built."""
    if name not in _builders:
        known = ", ".join(_builders) or "none"
        raise KeyError(f"no task registered as {name!r} (registered: {known})")
    return _builders[name]()
