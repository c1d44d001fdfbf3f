"""A training run's checkpoint, gathered from the processes and read back by each: all members in one
Ensemble on rank 0, the AdamW state as flat named tensors (safetensors holds no pickle), the latents' firing
history and the MFR state (`save_training`, `restore_training`; `load_trainer_state` reads a process's share of
trainer_state.safetensors)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mfr_sae import checkpoint as ckpt
from mfr_sae.digests import check_digest, recorded_digests
from mfr_sae.distributed import Shard
from mfr_sae.ensemble import Ensemble
from mfr_sae.errors import CheckpointError
from mfr_sae.firing import LatentFiring
from mfr_sae.mfr import MutualRegularizer


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
    for name, tensor in ensemble.weights_and_state():
        gathered = shard.gather_to_main(tensor.detach())
        if full is not None:
            getattr(full, name).copy_(gathered)
    return full


def save_training(
    run_dir: Path,
    shard: Shard,
    ensemble: Ensemble,
    build: Callable[[list[int], torch.device], Ensemble],
    optimizer: torch.optim.Optimizer,
    firing: LatentFiring,
    mfr: MutualRegularizer,
    step: int,
    firing_prob: Tensor | None,
) -> None:
    """Write the checkpoint of all N members at `step` (gathered to rank 0, which writes it; `build` as for
    `ensemble_on_main`); every rank returns once it is in place."""
    state = optimizer_state_on_main(shard, optimizer, ensemble)
    full = ensemble_on_main(shard, ensemble, build)
    state["samples_since_fired"] = shard.gather_to_main(firing.samples_since_fired)
    mfr_tensors, mfr_meta = mfr.state()
    if shard.is_main:  # where everything gathered is present: no None among the tensors
        assert full is not None
        state.update(mfr_tensors)
        meta = {"step": step, "mfr": mfr_meta}
        ckpt.save_checkpoint(
            run_dir,
            full,
            cast("dict[str, Tensor]", state),
            meta,
            extra={"mfr": mfr.cfg.enabled},
            firing_prob=firing_prob,
        )
    shard.barrier()  # nobody goes on (or exits) before the checkpoint is in place


def load_trainer_state(
    folder: Path, member_rows: slice | None = None, whole: tuple[str, ...] = ()
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of trainer_state.safetensors. member_rows: read only these rows of the
    tensors with a member axis first (all but scalars and those named in `whole`), so that a process
    reads its own members' state only."""
    path = Path(folder) / ckpt.STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    check_digest(folder, ckpt.STATE_FILE, recorded_digests(folder))
    tensors = {}
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            for name in f.keys():  # noqa: SIM118 (safe_open has keys(), not `in`)
                part = f.get_slice(name)
                shape = part.get_shape()
                if member_rows is None or name in whole or not shape:
                    tensors[name] = f.get_tensor(name)
                elif shape[0] < member_rows.stop:
                    raise CheckpointError(f"{path}: {name} holds {shape[0]} members, the run has more")
                else:
                    tensors[name] = part[member_rows]
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path}: {err}") from None
    return tensors, meta


def restore_training(
    folder: Path,
    shard: Shard,
    device: torch.device,
    ensemble: Ensemble,
    optimizer: torch.optim.Optimizer,
    firing: LatentFiring,
    mfr: MutualRegularizer,
) -> int:
    """Load this process's members (weights, AdamW state, firing history, MFR state) from the checkpoint
    folder, whatever the number of processes that wrote it (the files hold all N); returns its step."""
    state, meta = load_trainer_state(folder, slice(shard.start, shard.stop), whole=("mfr.matches", "mfr.confirmed"))
    loaded = ckpt.load(folder, device, members=shard.members)
    with torch.no_grad():
        for name, tensor in ensemble.weights_and_state():
            tensor.copy_(getattr(loaded, name))
    firing.samples_since_fired.copy_(state.pop("samples_since_fired"))
    mfr.load_state({k: v.to(device) for k, v in state.items() if k.startswith("mfr.")}, meta["mfr"])
    state = {k: v for k, v in state.items() if not k.startswith("mfr.")}
    optimizer.load_state_dict(optimizer_state_from_tensors(optimizer, ensemble, state))
    return int(meta["step"])
