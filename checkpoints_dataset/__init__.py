"""checkpoints_dataset: build, store and sample datasets of neural-network checkpoints."""
# --- parameter vectors, tasks, population builder (issue 2 part A) ---
from .params import float_layer_shapes, state_dict_to_vector, vector_to_state_dict  # noqa: E402
from .population import PopulationConfig, build_population  # noqa: E402
from .tasks import ClassificationTask, Task, get_task  # noqa: E402

__all__ = ["float_layer_shapes", "state_dict_to_vector", "vector_to_state_dict", "PopulationConfig",
           "build_population", "ClassificationTask", "Task", "get_task"]

# --- store, permutations, pairs, recorder (issue 2 part B) ---
from .permute import (PermGroup, PermutationSpec, apply_permutations, infer_permutation_spec,  # noqa: E402
                      permute_params, random_permutations, weight_matching)
from .store import (CheckpointStore, StoreError, create_store, finalize_store, open_store,  # noqa: E402
                    shard_exists, write_shard)

_LAZY = {"PairDataset": ".pairs", "CheckpointRecorder": ".recorder"}  # recorder imports Lightning: load on use


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*globals().get("__all__", []),
           "PermGroup", "PermutationSpec", "apply_permutations", "infer_permutation_spec", "permute_params",
           "random_permutations", "weight_matching", "CheckpointStore", "StoreError", "create_store",
           "finalize_store", "open_store", "shard_exists", "write_shard", "PairDataset", "CheckpointRecorder"]
