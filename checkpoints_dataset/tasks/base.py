"""The Task protocol and the generic classification task.

A Task names a network architecture (``build_model``) and how a batch of its parameter vectors is scored
(``evaluate``). ``ClassificationTask`` adds fixed data splits, batched scoring with
``torch.func.functional_call`` + ``vmap`` (chunked over networks and samples so memory stays bounded) and
``train_population``, the vectorized supervised trainer used by ``population.build_population``.

BatchNorm: during training every run normalizes with its minibatch statistics (``torch.func`` cannot
update running statistics in place under ``vmap``), and at each checkpoint the running mean / unbiased
variance of every BatchNorm layer are recomputed from a fixed training subset (the first
``bn_stats_size`` samples of ``split("train")``) in one train-mode pass, as ``momentum=None`` would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..compress import bits_metric, prunable_names, sparsity_metric
from ..optim import GroupResult, PopulationConfig
from ..params import LayerShapes, check_params, float_layer_shapes, state_dict_to_vector, vector_to_state_dict
from ..permute import PermutationSpec, infer_permutation_spec
from .supervised import cross_entropy, train_supervised

Split = Literal["train", "val", "test"]
InitScheme = Literal["default", "xavier", "kaiming", "orthogonal"]


def _reinit(model: nn.Module, scheme: InitScheme, generator: torch.Generator) -> None:
    """Re-initialize the weights of Linear/Conv layers with ``scheme`` (biases to zero)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight, generator=generator)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
            elif scheme == "orthogonal":
                nn.init.orthogonal_(m.weight, generator=generator)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}; use default, xavier, kaiming or orthogonal")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Task:
    """A network architecture plus how to score a batch of its parameter vectors.

    A subclass provides at least ``name``, ``metric_names``, ``lower_is_better``, ``metric_bounds``,
    ``default_metric``, ``build_model`` and ``evaluate``, and ``train_population`` to be built into a store
    (``ClassificationTask`` provides the last two for supervised data). The rest has working defaults.
    """

    name: str = "task"
    """The task's name: recorded in the store's manifest and its build config (a store of another task is
    refused), and how ``get_task`` finds a built-in task again (for a user task, the import path)."""

    metric_names: tuple[str, ...] = ()
    """The metrics ``evaluate`` returns, in order. Every checkpoint of a store carries each of them, and the
    generator can be conditioned on any one."""

    lower_is_better: dict[str, bool] = {}
    """Metric name -> whether lower values are better. Stored in the manifest; the generator's prompts and
    the evaluation ("best", "at least as good") read it."""

    metric_bounds: dict[str, tuple[float, float]] = {}
    """Metric name -> its valid ``(low, high)`` range (errors (0, 1), losses (0, inf), cartpole's return
    (0, 500)): which values a prompt can sensibly ask for. Declarative: nothing in checkpoints_dataset reads
    it; tools on top (prompting, evaluation) may."""

    label_metrics: tuple[str, ...] = ()   # metrics that are class indices (a field's label): embedded as labels

    default_metric: str = ""
    """The metric a generator is conditioned on when none is chosen (``"val_error"``; cartpole ``"return"``);
    one of ``metric_names``."""

    def build_model(self) -> nn.Module:
        """A freshly initialized network of the task's architecture (PyTorch's own init).

        Subclasses must provide it. The framework derives ``layer_shapes`` (the parameter vector's layout)
        and the default ``permutation_spec`` from it, initializes runs with it (``init_params``) and uses it
        as the template for ``functional_call`` when scoring and training stacked parameter vectors.
        """
        raise NotImplementedError(f"{type(self).__name__} must define build_model()")

    def evaluate(self, params: Tensor, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """Score a batch of parameter vectors ``params [K, P]`` -> ``{metric: [K]}`` (float32, CPU), every
        name of ``metric_names``; ``device`` is where to compute (default: where ``params`` are).

        Subclasses must provide it (batched, e.g. with ``torch.func``). The population trainers call it at
        every checkpoint to fill the store's metrics, and the evaluation calls it on generated networks.
        """
        raise NotImplementedError(f"{type(self).__name__} must define evaluate(params [K, P])")

    def train_population(self, hparams: list[dict], config: PopulationConfig, device: torch.device,
                         progress: Callable[[float], None] | None = None) -> GroupResult:
        """Train the R runs of ``hparams`` together -> their checkpoints (``GroupResult``).

        ``hparams[i]`` is run i's dict from ``population.draw_hparams`` (its ``seed`` seeds the run's init
        and data order; a trainer may add its own settings to it, which the manifest then records);
        ``config`` is the build's ``PopulationConfig`` (epochs, checkpoints, batch size); ``progress(f)`` is
        called with the fraction of the group's work just done (summing to 1). A task that is to be built
        into a store provides it (``ClassificationTask`` has the generic supervised trainer; cartpole its
        own). ``population.build_population`` calls it once per group and writes the result as one shard.
        """
        raise NotImplementedError(f"{type(self).__name__} has no population trainer; define train_population "
                                  f"(see ClassificationTask.train_population)")

    @functools.cached_property
    def layer_shapes(self) -> LayerShapes:
        """The layout of the task's parameter vectors (name -> shape, ``state_dict`` order, float entries).

        Derived from ``build_model()`` once; a subclass rarely overrides it. Stores record it, and every
        split of a vector into layers (scoring, training, tokenizing) goes through it.
        """
        return float_layer_shapes(self.build_model())

    @property
    def num_params(self) -> int:
        """P, the length of the task's parameter vectors (from ``layer_shapes``); not meant to be overridden.
        Inputs to ``evaluate`` and the store's rows are checked against it."""
        return self.layer_shapes.num_params

    def build_options(self) -> dict:
        """The task's own settings that change what a population build produces (JSON values, keyed by its
        constructor's argument names); ``{}`` by default.

        A subclass with such settings returns them (cartpole: its trainer's). The framework records them as
        the store's ``build_config["task_options"]``, so that resuming a build with other settings is
        refused, and passes them back to ``get_task`` when the data module resumes a build.
        """
        return {}

    @property
    def permutation_spec(self) -> PermutationSpec:
        """The neuron-permutation symmetry of the task's networks.

        Default: inferred from ``build_model()`` (MLPs and plain CNNs written as ``nn.Sequential``); a
        subclass with another architecture declares its own, or lets the ValueError say the store has
        none. Stored in the manifest; the pair dataset augments with it, the tokenizer groups units by it,
        and the evaluation aligns networks with it (weight matching).
        """
        return infer_permutation_spec(self.build_model())

    def probe_inputs(self) -> Tensor:
        """A fixed batch of the network's inputs ``[B, ...]`` on which generated networks are compared with
        their targets in function space (the generator's ``--model.function_loss``).

        ``ClassificationTask`` gives its first ``probe_size`` training inputs, cartpole fixed states inside
        its episode bounds; other tasks define it to use that loss.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no probe_inputs(), so the function-space loss "
                                  "cannot compare its networks; train with --model.function_loss 0 or define it")

    @functools.cached_property
    def _eval_model(self) -> nn.Module:
        return self.build_model().eval()

    def network_outputs(self, params: Tensor, inputs: Tensor) -> Tensor:
        """The outputs ``[K, B, ...]`` of K networks ``params [K, P]`` on ``inputs [B, ...]`` (eval mode,
        differentiable in ``params``); rarely overridden."""
        params = check_params(params, self.num_params)
        model = self._eval_model   # a template: functional_call swaps in every parameter and float buffer,
        fixed = {k: b.to(params.device) for k, b in model.named_buffers() if k not in self.layer_shapes}  # + the rest
        x = inputs.to(params.device)
        return vmap(lambda p: functional_call(model, (p, fixed), (x,)))(self.layer_shapes.split(params))

    def to_state_dict(self, vec: Tensor) -> dict[str, Tensor]:
        """One parameter vector ``[P]`` -> a ``state_dict`` that ``build_model().load_state_dict(...,
        strict=True)`` accepts (integer buffers from a fresh model). Rarely overridden; for handing a stored
        or generated network to plain PyTorch code."""
        return vector_to_state_dict(vec, self.build_model())

    def init_params(self, n: int, generator: torch.Generator | None = None, scheme: InitScheme = "default") -> Tensor:
        """``n`` freshly initialized parameter vectors ``[n, P]``.

        "default" is PyTorch's own init of ``build_model()``; the other schemes re-initialize Linear/Conv
        weights (biases zero). With a generator the result depends on its state only. Rarely overridden;
        the population trainers start their runs from it (scaled by each run's ``init_scale``), and the
        evaluation draws fresh starting points with it.
        """
        rows = []
        for _ in range(n):
            seed = int(torch.randint(2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self.build_model()
            if scheme != "default":
                _reinit(model, scheme, torch.Generator().manual_seed(seed))
            rows.append(state_dict_to_vector(model.state_dict(), self.layer_shapes))  # [P]
        return torch.stack(rows)  # [n, P]


class ClassificationTask(Task):
    """A supervised classification task with fixed train/val/test splits.

    Subclasses define ``name``, ``build_model`` and ``load_splits() -> {split: (inputs float32, labels
    int64)}``; scoring (``evaluate``) and population training (``train_population``) are provided.
    Metrics: ``{split}_loss`` (mean cross-entropy) and ``{split}_error`` (fraction of wrong argmax
    predictions) for the names listed in ``metric_names``.
    """

    split_metrics = ("train_loss", "val_loss", "val_error", "test_loss", "test_error")
    compression = False   # True (the built-in MLPs' option compression=True) adds the metrics sparsity and bits
    default_metric = "val_error"
    eval_networks_chunk = 64        # networks scored together
    eval_samples_chunk = 2048       # samples scored together
    bn_stats_size = 1024            # training samples used to recompute BatchNorm statistics
    probe_size = 256                # training inputs of the function-space loss (probe_inputs)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """``split_metrics``, plus ``sparsity`` and ``bits`` (``compress``) with ``compression``."""
        return (*self.split_metrics, *(("sparsity", "bits") if self.compression else ()))

    @property
    def lower_is_better(self) -> dict[str, bool]:
        """Every loss, error and bit width is better lower, sparsity higher (see ``Task.lower_is_better``)."""
        return {m: m != "sparsity" for m in self.metric_names}

    @property
    def metric_bounds(self) -> dict[str, tuple[float, float]]:
        """Errors and sparsity in (0, 1), losses in (0, inf), bits in (1, 32) (see ``Task.metric_bounds``)."""
        return {m: (1.0, 32.0) if m == "bits" else (0.0, 1.0) if m.endswith("_error") or m == "sparsity"
                else (0.0, float("inf")) for m in self.metric_names}

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The task's data: ``{"train" | "val" | "test" (| others): (inputs float32, labels int64)}``, the same
        on every call (fixed seeds, no shuffling left to chance).

        Subclasses must provide it. It is called once, on first use of ``split``; training batches come
        from ``"train"``, and the ``{split}_*`` metrics from ``eval_split(split)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must define load_splits()")

    @functools.cached_property
    def _splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        return self.load_splits()

    def split(self, name: Split) -> tuple[Tensor, Tensor]:
        """``(inputs float32, labels int64)`` of split "train", "val" or "test" (deterministic).

        Served from ``load_splits()`` (loaded once); rarely overridden. ``train_population`` trains on
        ``split("train")`` (and recomputes BatchNorm statistics from its first ``bn_stats_size`` samples);
        the evaluation's data-based sections read the test split through it.
        """
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; use one of {sorted(self._splits)}")
        return self._splits[name]

    def eval_split(self, name: Split) -> tuple[Tensor, Tensor]:
        """The data the ``{name}_*`` metrics are measured on: ``split(name)`` by default.

        A subclass overrides it to score on less or other data than it trains on (the Fashion tasks score
        ``train_loss`` on a fixed 2,000-image subset and cap val/test). ``evaluate`` reads it.
        """
        return self.split(name)

    def probe_inputs(self) -> Tensor:
        """The first ``probe_size`` training inputs (see ``Task.probe_inputs``)."""
        return self.split("train")[0][:self.probe_size]

    # ------------------------------------------------------------ scoring

    def _score_fn(self):
        model = self._eval_model

        def score(p: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            logits = functional_call(model, p, (x,))                               # [N, classes]
            return cross_entropy(logits, y).sum(), (logits.argmax(-1) != y).sum()

        return vmap(score, in_dims=(0, None, None))

    def evaluate(self, params: Tensor, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """Every metric of a batch of parameter vectors ``[K, P]``, each ``[K]`` (float32, on CPU)."""
        params = check_params(params, self.num_params)
        device = torch.device(device) if device is not None else params.device
        splits = sorted({m.rsplit("_", 1)[0] for m in self.metric_names if m not in ("sparsity", "bits")})
        score = self._score_fn()
        sums = {s: [] for s in splits}
        for k0 in range(0, params.shape[0], self.eval_networks_chunk):
            chunk = params[k0:k0 + self.eval_networks_chunk].to(device=device, dtype=torch.float32)  # [k, P]
            p = self.layer_shapes.split(chunk)                                     # name -> [k, *shape]
            for s in splits:
                x, y = self.eval_split(s)
                loss = torch.zeros(chunk.shape[0], dtype=torch.float64, device=device)  # [k]
                wrong = torch.zeros(chunk.shape[0], dtype=torch.int64, device=device)
                for n0 in range(0, len(y), self.eval_samples_chunk):
                    xb = x[n0:n0 + self.eval_samples_chunk].to(device)
                    yb = y[n0:n0 + self.eval_samples_chunk].to(device)
                    with torch.no_grad():
                        l, w = score(p, xb, yb)                                     # [k], [k]
                    loss += l.double()
                    wrong += w
                sums[s].append((loss / len(y), wrong.double() / len(y)))
        out = {}
        for s in splits:
            out[f"{s}_loss"] = torch.cat([a for a, _ in sums[s]]).float().cpu()   # [K]
            out[f"{s}_error"] = torch.cat([b for _, b in sums[s]]).float().cpu()
        if "sparsity" in self.metric_names or "bits" in self.metric_names:   # from the parameters alone
            names = prunable_names(self._eval_model)
            out["sparsity"] = sparsity_metric(params, self.layer_shapes, names)
            out["bits"] = bits_metric(params, self.layer_shapes, names)
        return {m: out[m] for m in self.metric_names}

    # ------------------------------------------------------------ training

    def train_population(self, hparams: list[dict], config: PopulationConfig, device: torch.device,
                         progress: Callable[[float], None] | None = None) -> GroupResult:
        """Train the runs of ``hparams`` together (see ``Task.train_population``) -> ``GroupResult``.

        Run i: init ``init_params(1, Generator(seed_i), scheme) * init_scale_i`` on trainable entries;
        each epoch a permutation of ``split("train")`` from the same generator, cut into
        ``n // batch_size`` full batches; mean cross-entropy; ``optimizer_step`` (AdamW or SGD-momentum
        per run, with the run's lr, weight decay and momentum). Runs with a ``sparsity`` or ``bits`` are
        pruned and trained quantization-aware after a dense start (``supervised.train_supervised``).
        """
        return train_supervised(self, hparams, config, device, progress)
