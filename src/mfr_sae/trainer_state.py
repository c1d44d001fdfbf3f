"""What a checkpoint of a training run holds besides the weights, gathered from the processes: the AdamW
state as flat named tensors (safetensors holds no pickle) and all members in one Ensemble on rank 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mfr_sae.distributed import Shard
from mfr_sae.ensemble import Ensemble


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Tensor]:
    """`optimizer.<parameter name>.<state key>` for every state tensor (moments and step)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optimizer.{names[id(param)]}.{key}"] = torch.as_tensor(value)
    return tensors


def optimizer_state_from_tensors(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict[str, Tensor]
) -> dict[str, Any]:
    """The `state_dict` that `optimizer.load_state_dict` takes, from `optimizer_state_to_tensors`' output."""
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        _, name, field = key.split(".")
        state.setdefault(index[name], {})[field] = value
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def optimizer_state_on_main(
    shard: Shard, optimizer: torch.optim.Optimizer, model: torch.nn.Module
) -> dict[str, Tensor | None]:
    """All members' AdamW state on rank 0 (None on the others), one tensor at a time; the step counts are
    scalars, the same on every rank."""
    return {
        k: v if v.ndim == 0 else shard.gather_to_main(v)
        for k, v in optimizer_state_to_tensors(optimizer, model).items()
    }


@torch.no_grad()
def ensemble_on_main(
    shard: Shard, ensemble: Ensemble, build: Callable[[list[int], torch.device], Ensemble]
) -> Ensemble | None:
    """All N members in one Ensemble on rank 0 (on its CPU, `build(members, device)` making it), None on the
    other ranks; in one process, `ensemble` itself."""
    if shard.world == 1:
        return ensemble
    full = build(list(range(shard.n_members)), torch.device("cpu")) if shard.is_main else None
    for name, param in ensemble.named_parameters():
        gathered = shard.gather_to_main(param.detach())
        if full is not None:
            getattr(full, name).copy_(gathered)
    return full
