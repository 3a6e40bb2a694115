"""Tasks: ``get_task(name)`` for a built-in name or a user task given as ``"pkg.module:ClassName"``.

A user task subclasses ``Task`` (or ``ClassificationTask`` for supervised data: define ``build_model``
and ``load_splits``) and is built with ``get_task("my_pkg.tasks:MyTask", **kwargs)``::

    # my_pkg/tasks.py
    import torch
    from torch import nn
    from checkpoints_dataset import ClassificationTask

    class XorMLP(ClassificationTask):
        name = "xor_mlp"
        def build_model(self):
            return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        def load_splits(self):
            x = torch.randint(0, 2, (512, 2), generator=torch.Generator().manual_seed(0)).float()
            y = (x[:, 0] != x[:, 1]).long()
            return {"train": (x[:256], y[:256]), "val": (x[256:384], y[256:384]), "test": (x[384:], y[384:])}

    # python -m checkpoints_dataset build --task my_pkg.tasks:XorMLP --runs 64 --epochs 5 --out xor_store
"""

from __future__ import annotations

import importlib

from .base import ClassificationTask, Task


def _digits(**kw):
    from .digits import DigitsMLP
    return DigitsMLP(**kw)


def _fashion(arch):
    def make(**kw):
        from .fashion import FashionTask
        return FashionTask(arch=arch, **kw)
    return make


def _cartpole(**kw):
    from .cartpole import CartpoleTask
    return CartpoleTask(**kw)


BUILTIN_TASKS = {
    "digits_mlp": _digits,
    "fashion_mlp": _fashion("mlp"),
    "fashion_cnn": _fashion("cnn"),
    "fashion_cnn_bn": _fashion("cnn_bn"),
    "cartpole": _cartpole,
}


def get_task(name: str, **kwargs) -> Task:
    """A Task by built-in name (``BUILTIN_TASKS``) or import path ``"pkg.module:ClassName"``.

    ``kwargs`` go to the task's constructor (e.g. ``data_dir`` for the Fashion-MNIST tasks).
    """
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name](**kwargs)
    if ":" not in name:
        raise ValueError(f"unknown task {name!r}: use a built-in task ({', '.join(BUILTIN_TASKS)}) "
                         f"or an import path 'my_pkg.module:MyTask'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of task {name!r}: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (task {name!r})")
    task = cls(**kwargs)
    if not isinstance(task, Task):
        raise ValueError(f"{name!r} built a {type(task).__name__}, not a checkpoints_dataset.Task subclass")
    return task


__all__ = ["BUILTIN_TASKS", "ClassificationTask", "Task", "get_task"]
