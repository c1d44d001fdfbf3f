"""Which latents fire: per latent of a process's members, the training vectors since it last fired (dead
latents), and each batch's firing counts (the reinitialisation rule's input)."""

from __future__ import annotations

import torch
from torch import Tensor

from mfr_sae.distributed import Shard


class LatentFiring:
    """`samples_since_fired` [n, h] of this rank's n members; a latent is dead once it reaches dead_window."""

    def __init__(self, n_members: int, d_sae: int, dead_window: int, device: torch.device):
        self.samples_since_fired = torch.zeros(n_members, d_sae, dtype=torch.long, device=device)
        self.dead_window = dead_window

    @torch.no_grad()
    def count(self, acts: Tensor, idx: Tensor, batch: int, shard: Shard) -> Tensor:
        """Update samples_since_fired from a batch's TopK output (acts, idx [n, b, k]); return each latent's
        firing count in it [n, h] (over the whole batch: summed over the replicas of data parallel)."""
        n, h = self.samples_since_fired.shape
        counts = torch.zeros(n, h, device=acts.device)
        counts.scatter_add_(1, idx.reshape(n, -1), (acts > 0).reshape(n, -1).float())
        counts = shard.sum_replicas(counts)
        self.samples_since_fired += batch
        self.samples_since_fired[counts > 0] = 0
        return counts

    def reset(self, local: int) -> None:
        """A re-initialised member starts with no history."""
        self.samples_since_fired[local] = 0

    def dead_mask(self) -> Tensor:
        """Latents that have not fired on the last dead_window training vectors: [n, h]."""
        return self.idle_mask(self.dead_window)

    def idle_mask(self, window: int) -> Tensor:
        """Latents that have not fired on the last `window` training vectors: [n, h]."""
        return self.samples_since_fired >= window


def dead_measured(steps_since_init: list[int], batch_size: int, dead_window: int) -> list[bool]:
    """Per member: whether it has trained on dead_window vectors since its (re)initialisation; before that no
    latent can be dead by construction, so its dead fraction is not measured (None)."""
    return [steps * batch_size >= dead_window for steps in steps_since_init]


def dead_frac_note(unmeasured: list[int], samples: int, dead_window: int) -> str | None:
    """Why the dead_frac of these members is None (after `samples` training vectors); None when all were
    measured."""
    if not unmeasured:
        return None
    window = f"eval.dead_window ({dead_window:,} vectors)"
    if samples < dead_window:
        return f"run shorter than {window}: dead_frac not measured"
    many = len(unmeasured) > 1
    return (
        f"member{'s' if many else ''} {', '.join(map(str, unmeasured))} re-initialised less than {window} "
        f"before the end: {'their' if many else 'its'} dead_frac not measured"
    )
