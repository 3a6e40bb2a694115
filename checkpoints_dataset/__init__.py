"""checkpoints_dataset: build, store and sample datasets of neural-network checkpoints.

Stands alone (never imports gpt_params); only the recorder callback imports Lightning, on first use.
"""
import importlib

from .params import LayerShapes, float_layer_shapes, state_dict_to_vector, vector_to_state_dict
from .permute import (PermGroup, PermutationSpec, apply_permutations, infer_permutation_spec, permute_params,
                      random_permutations, weight_matching)
from .info import DataInfo
from .population import PopulationConfig, build_population, ensure_store
from .store import CheckpointStore, StoreError, create_store, finalize_store, open_store, shard_exists, write_shard
from .tasks import BUILTIN_TASKS, ClassificationTask, Task, TaskRef, UntrustedTaskError, get_task

_LAZY = {"PairDataset": ".pairs", "PairBatches": ".pairs", "CheckpointRecorder": ".recorder"}  # the recorder imports Lightning


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LayerShapes", "float_layer_shapes", "state_dict_to_vector", "vector_to_state_dict", "PermGroup",
           "PermutationSpec", "apply_permutations", "infer_permutation_spec", "permute_params", "random_permutations",
           "weight_matching", "PopulationConfig", "build_population", "CheckpointStore", "StoreError",
           "create_store", "finalize_store", "open_store", "shard_exists", "write_shard", "ClassificationTask",
           "Task", "get_task", "PairDataset", "CheckpointRecorder", "BUILTIN_TASKS", "DataInfo", "PairBatches",
           "TaskRef", "UntrustedTaskError", "ensure_store"]
