"""Scoring CartPole-v1 policies: the greedy actions of many stacked policy MLPs (``greedy_act_fn``, a lean
inference forward) and their returns, in the batched environment of ``env`` (``batched_returns``, chunked by
``policy_chunks``) or in the real gymnasium one (``gymnasium_returns``, the reference).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import gymnasium  # already loaded by env (gymnasium.utils.seeding imports the package)
import numpy as np
import torch
from torch import Tensor, nn

from ...params import vector_to_tensors
from .env import ActFn, rollout

__all__ = ["batched_returns", "chunked_returns", "greedy_act_fn", "gymnasium_returns", "policy_chunks"]


# --------------------------------------------------------------------------- policy forward

def greedy_act_fn(model: nn.Sequential, params: dict[str, Tensor]) -> ActFn:
    """An ``ActFn`` for ``rollout``: the greedy actions of K stacked policies (``params``: name -> ``[K, *shape]``;
    the MLP's first Linear takes the 4 observations, its last gives 2 logits), for feature-major ``obs``.

    The weights are laid out once for a lean inference forward, and the rows' weights are gathered only
    when the packing changes. The first Linear is 4 ``addcmul``s over its inputs when the first call's rows
    hold fewer than 4 episodes (a batched matmul's fixed cost per matrix outweighs the arithmetic of a
    [1, 4] x [4, 32] product; bench/NOTES.md), else one ``baddbmm`` (4 passes over [K'', L, 32] cost more
    than one matmul);
    the choice is kept for later calls, so every step of a rollout rounds alike. Hidden Linears are ``baddbmm``s;
    the output layer is the difference of its two rows, so the action is ``z > 0``: argmax of the two logits
    (ties -> action 0, as argmax) with one dot product instead of two. Rounding differs from the module's
    forward only in the last bits, so an action can differ only where the two logits tie to ~1e-7.
    The returned actions are a buffer that the next call overwrites.
    """
    names = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    if (len(names) < 2 or not isinstance(model[0], nn.Linear) or params[f"{names[0]}.weight"].shape[2] != 4
            or params[f"{names[-1]}.weight"].shape[1] != 2):
        raise ValueError("greedy_act_fn needs a Sequential MLP that starts with a Linear of 4 inputs and has at "
                         "least two Linears, the last with 2 outputs")
    stacked = []  # (kind, weight, bias) per Linear, other modules as they are
    for name, m in model.named_children():
        if not isinstance(m, nn.Linear):
            stacked.append(m)
            continue
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]  # [K, out, in], [K, out]
        if name == names[0]:
            stacked.append(("inputs", w.permute(2, 0, 1).contiguous(), b[:, None, :]))  # [in, K, out], [K, 1, out]
        elif name == names[-1]:
            stacked.append(("diff", (w[:, 1] - w[:, 0])[:, :, None].contiguous(),  # [K, in, 1]
                            (b[:, 1] - b[:, 0])[:, None, None]))                    # [K, 1, 1]
        else:
            stacked.append(("matmul", w.transpose(1, 2).contiguous(), b[:, None, :]))  # [K, in, out], [K, 1, out]
    cache: dict[str, object] = {"ids": None, "layers": None, "obs": None, "buffers": {}, "inputs_matmul": None}

    def plan(obs: Tensor, layers: list) -> tuple[list[Callable[[], Tensor]], Tensor]:
        """The forward's operations on ``obs`` as calls that write into fixed buffers, and the action buffer.
        A fresh tensor of a few hundred KB per operation would cost page faults every step, more than the
        operation itself; views made once save their dispatch every step."""
        K2, L = obs.shape[1], obs.shape[2]
        buffers = cache["buffers"].setdefault((K2, L), {})  # reused by any obs of this shape
        calls, h = [], obs
        for j, layer in enumerate(layers):
            if not isinstance(layer, tuple):  # an activation, in place where it can be
                calls.append(h.tanh_ if isinstance(layer, nn.Tanh) else functools.partial(
                    lambda x, m: x.copy_(m(x)), h, layer))
                continue
            kind, w, b = layer
            if j not in buffers:
                buffers[j] = obs.new_empty(K2, L, w.shape[-1])
            out = buffers[j]  # [K'', L, out]
            if kind == "inputs" and cache["inputs_matmul"]:  # [K'', L, 4] x [K'', 4, out] -> [K'', L, out]
                calls.append(functools.partial(torch.baddbmm, b, obs.permute(1, 2, 0), w.permute(1, 0, 2).contiguous(),
                                               out=out))
            elif kind == "inputs":  # sum_i obs_i * W[i]: [K'', L, 1] x [K'', 1, out] -> [K'', L, out]
                cols, rows = [obs[i][:, :, None] for i in range(4)], [w[i][:, None, :] for i in range(4)]
                calls.append(functools.partial(torch.addcmul, b, cols[0], rows[0], out=out))
                calls += [functools.partial(out.addcmul_, c, r) for c, r in zip(cols[1:], rows[1:])]
            else:
                calls.append(functools.partial(torch.baddbmm, b, h, w, out=out))  # [K'', L, out]
            h = out
        if "action" not in buffers:
            buffers["action"] = torch.empty(K2, L, dtype=torch.bool, device=obs.device)
        action = buffers["action"]
        calls.append(functools.partial(torch.gt, h[:, :, 0], h.new_zeros(()), out=action))  # logit 1 - logit 0 > 0
        return calls, action

    def act(obs: Tensor, policy_ids: Tensor) -> Tensor:  # obs [4, K'', L] float32 -> [K'', L] bool
        if cache["ids"] is not policy_ids and (cache["ids"] is None or cache["ids"].shape != policy_ids.shape
                                                or not torch.equal(cache["ids"], policy_ids)):
            cache.update(ids=policy_ids, obs=None, buffers={}, layers=[
                (layer[0], layer[1].index_select(1 if layer[0] == "inputs" else 0, policy_ids),
                 layer[2].index_select(0, policy_ids)) if isinstance(layer, tuple) else layer for layer in stacked])
        if cache["obs"] is not obs:  # a new observation tensor (rollout passes one per packing)
            cache["obs"] = obs
            if cache["inputs_matmul"] is None:
                cache["inputs_matmul"] = obs.shape[2] >= 4
            cache["calls"], cache["action"] = plan(obs, cache["layers"])
        with torch.no_grad():
            for call in cache["calls"]:
                call()
        return cache["action"]  # [K'', L] bool; overwritten by the next call
    return act


def policy_chunks(K: int, E: int, max_episodes: int = 65536) -> list[slice]:
    """Slices of K policies of E episodes each, at most ``max_episodes`` episodes (and at least one policy)
    per slice: past ~64K episodes a rollout's working set (activations, dynamics buffers) outgrows the
    caches and each step costs more per episode (bench/NOTES.md, "Chunked rollouts")."""
    per = max(1, max_episodes // max(E, 1))
    return [slice(k, min(k + per, K)) for k in range(0, K, per)]


def chunked_returns(make_act: Callable[[slice], ActFn], starts: Tensor, max_episodes: int = 65536) -> Tensor:
    """Returns ``[K, E]`` (float64) of K policies from their starts ``starts [K, E, 4]`` (float64): one ``rollout``
    per ``policy_chunks`` slice, acting with ``make_act(slice)``, the ActFn of that slice's policies."""
    K, E, _ = starts.shape
    out = []
    for part in policy_chunks(K, E, max_episodes):
        n = part.stop - part.start
        owner = torch.arange(n, device=starts.device).repeat_interleave(E)  # [n*E]
        out.append(rollout(make_act(part), owner, starts[part].reshape(n * E, 4)).view(n, E))
    return torch.cat(out) if out else starts.new_zeros(0, E)


def batched_returns(model: nn.Module, params: Tensor, layer_shapes, init_states: Tensor,
                    max_episodes: int = 65536) -> Tensor:
    """Returns ``[K, E]`` (float64) of K policies (``params [K, P]``) from starts ``init_states``: ``[E, 4]``
    shared by every policy or ``[K, E, 4]`` per policy (``chunked_returns`` with the lean greedy forward)."""
    K = params.shape[0]
    starts = init_states.expand(K, -1, -1) if init_states.dim() == 2 else init_states  # [K, E, 4]
    return chunked_returns(lambda part: greedy_act_fn(model, vector_to_tensors(params[part], layer_shapes)),
                           starts.to(params.device, torch.float64), max_episodes)


def gymnasium_returns(model: nn.Module, params: Tensor, layer_shapes, seeds: Sequence[int],
                      max_envs: int = 2048) -> Tensor:
    """Returns ``[K, E]`` of K policies on the real ``gymnasium.make("CartPole-v1")`` reset with ``seeds``,
    stepped in a ``gymnasium.vector.SyncVectorEnv`` (the reference for ``batched_returns``). Policies are
    taken ``max_envs // E`` at a time; finished episodes are masked until the slowest one ends."""
    K, E = params.shape[0], len(seeds)
    parts = policy_chunks(K, E, max_envs)
    per = parts[0].stop if parts else 1  # policies per chunk: the first chunk is a full one
    envs = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1")] * (per * E))
    out = torch.zeros(K, E, dtype=torch.float64)
    try:
        for part in parts:
            chunk = params[part]
            n = chunk.shape[0]
            chunk = torch.cat([chunk, chunk[-1:].expand(per - n, -1)])  # [per, P] padded with copies
            act = greedy_act_fn(model, vector_to_tensors(chunk, layer_shapes))
            ids = torch.arange(per, device=params.device)
            o = torch.empty(4, per, E, device=params.device)  # one observation tensor: the forward plans once
            obs, _ = envs.reset(seed=[int(s) for s in seeds] * per)
            done = np.zeros(per * E, dtype=bool)
            total = np.zeros(per * E)
            while not done.all():
                o.copy_(torch.from_numpy(obs).T.reshape(4, per, E))  # float32 as gymnasium gives
                action = act(o, ids).reshape(-1).long().cpu().numpy()
                obs, reward, terminated, truncated, _ = envs.step(action)
                total += np.where(done, 0.0, reward)
                done |= terminated | truncated
            out[part] = torch.from_numpy(total).view(per, E)[:n]
    finally:
        envs.close()
    return out
