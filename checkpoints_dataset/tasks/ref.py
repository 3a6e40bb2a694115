"""Naming tasks: the built-in ones, import paths a user types, and ``TaskRef`` (a task with its options).

A task is code, so where its name comes from matters:

- a name the user gives (``get_task``, ``--task``, ``--data.task``, a ``--config`` YAML) may be an import
  path ``"pkg.module:Class"``, which is imported;
- a name read from a file (a store's manifest, a checkpoint's hyperparameters, a run's saved config) is
  data: ``TaskRef.from_file`` resolves it only to a built-in task, or to the same import path given again
  by the user, and refuses anything else with a message naming the option that would allow it.

Nothing is called before the imported object is checked to be a ``Task`` subclass.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from ..params import LayerShapes
from .base import Task
from .cartpole import CartpoleTask
from .digits import DigitsMLP
from .fashion import FashionTask
from .fields import DigitsField, FashionField
from .shapes import ShapesOccupancy

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "digits_mlp": DigitsMLP,
    "fashion_mlp": functools.partial(FashionTask, arch="mlp"),
    "fashion_cnn": functools.partial(FashionTask, arch="cnn"),
    "fashion_cnn_bn": functools.partial(FashionTask, arch="cnn_bn"),
    "cartpole": CartpoleTask,
    "digits_field": DigitsField,
    "fashion_field": FashionField,
    "shapes_occupancy": ShapesOccupancy,
}


class UntrustedTaskError(ValueError):
    """A task name read from a file is an import path the user did not give: importing it would run code."""


def is_import_path(name: str) -> bool:
    return ":" in name


def import_task_class(path: str) -> type[Task]:
    """The ``Task`` subclass at ``"pkg.module:Class"`` (imports the module; calls nothing)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"task import path {path!r} must look like 'my_pkg.module:MyTask'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of task {path!r}: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (task {path!r})")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"{path!r} is a {type(cls).__name__}, not a checkpoints_dataset.Task subclass")
    return cls


def get_task(name: str, **kwargs) -> Task:
    """A task by built-in name (``BUILTIN_TASKS``) or by an import path the caller gives (``"pkg.module:Class"``).

    ``kwargs`` go to the task's constructor (e.g. ``data_dir`` for the Fashion-MNIST tasks). Never pass a name
    read from a file here: use ``TaskRef.from_file``.
    """
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name](**kwargs)
    if not is_import_path(name):
        raise ValueError(f"unknown task {name!r}: use a built-in task ({', '.join(BUILTIN_TASKS)}) "
                         f"or an import path 'my_pkg.module:MyTask'")
    return import_task_class(name)(**kwargs)


def task_id(task: Task) -> str:
    """What a store or checkpoint records to name ``task``: its built-in name, else its import path."""
    cls = type(task)
    if task.name in BUILTIN_TASKS and cls.__module__.startswith(__name__.rpartition(".")[0] + "."):
        return task.name
    return f"{cls.__module__}:{cls.__qualname__}"


def plain_json(value: Any) -> Any:
    """JSON-like plain values, as manifests and checkpoints keep them (tuples as lists, numpy scalars as numbers)."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


@dataclasses.dataclass(frozen=True)
class TaskRef:
    """A task by name with its keyword options: built once (``.task``), comparable, JSON round trip.

    ``name`` is a built-in name or an import path; build it only from a name the user gave, or through
    ``from_file`` for a name read from a file.
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in BUILTIN_TASKS and not is_import_path(self.name):
            raise ValueError(f"unknown task {self.name!r}: use a built-in task ({', '.join(BUILTIN_TASKS)}) "
                             f"or an import path 'my_pkg.module:MyTask'")
        object.__setattr__(self, "options", plain_json(dict(self.options or {})))

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.options, sort_keys=True, default=str)))

    @classmethod
    def from_file(cls, name: str | None, options: Mapping[str, Any] | None = None, *, given: str | None = None,
                  option: str = "--task", source: str = "the file") -> TaskRef:
        """A task name read from a file (``source``, e.g. "the store at DIR"): a built-in task, or the import
        path the user gave again (``given``); anything else raises ``UntrustedTaskError`` naming ``option``."""
        if name is None:
            raise ValueError(f"{source} names no task; pass {option} NAME")
        if name in BUILTIN_TASKS or (given is not None and given == name):
            return cls(name, options or {})
        if (given is not None and is_import_path(given) and not is_import_path(name)
                and getattr(import_task_class(given), "name", None) == name):
            return cls(given, options or {})   # a store of before import paths were recorded: Task.name only
        if is_import_path(name):
            raise UntrustedTaskError(
                f"{source} names the task {name!r}, which is not built in; a name read from a file is never "
                f"imported: pass {option} {name} to import and run that code")
        raise ValueError(f"{source} names the task {name!r}, which is neither built in "
                         f"({', '.join(BUILTIN_TASKS)}) nor an import path; pass {option} pkg.module:Class")

    @classmethod
    def of(cls, task: Task, options: Mapping[str, Any] | None = None) -> TaskRef:
        """The reference a store or checkpoint records for ``task`` (see ``task_id``)."""
        return cls(task_id(task), options or {})

    def with_options(self, **options: Any) -> TaskRef:
        """The same task with ``options`` updated (``None`` values are dropped)."""
        merged = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        return TaskRef(self.name, merged)

    @functools.cached_property
    def task(self) -> Task:
        """The task, built once (a task may load its data set)."""
        try:
            return get_task(self.name, **self.options)
        except TypeError as e:
            raise ValueError(f"task {self.name!r} cannot be built with the options {dict(self.options)}: {e}") from None

    def check_shapes(self, layer_shapes: Mapping[str, Any], where: str) -> Task:
        """The task, after checking that it builds networks of ``layer_shapes`` (those of ``where``)."""
        mine, theirs = LayerShapes(self.task.layer_shapes), LayerShapes(layer_shapes)
        if not mine.same_layout(theirs):
            raise ValueError(f"task {self.name} with options {dict(self.options)} builds other networks than "
                             f"{where} ({self.task.num_params} params in {len(mine)} entries vs {len(theirs)} "
                             "entries): give the task (and options) those networks were made with")
        return self.task

    def to_json(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}
