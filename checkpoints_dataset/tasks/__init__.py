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

A store or generator checkpoint records such a task by its import path; opening it later imports that
path only when the user names it again (``--data.task``, ``--task``): see ``ref.TaskRef.from_file``.
"""
from .base import ClassificationTask, Task
from .ref import BUILTIN_TASKS, TaskRef, UntrustedTaskError, get_task, import_task_class, task_id

__all__ = ["BUILTIN_TASKS", "ClassificationTask", "Task", "TaskRef", "UntrustedTaskError", "get_task",
           "import_task_class", "task_id"]
