"""The reinitialisation rule of MFR (docs/design.md section 4) and the firing history it reads.

M = mean_j (|p_j - t| / t)^3 per member, with p_j the firing probability of latent j over the last
`reinit_samples` training vectors and t = k / h of that member. During a member's first `reinit_window`
steps after its (re)initialisation, M > `reinit_threshold` re-initialises it, at most `reinit_max` times
(the trainer gives it fresh, seeded weights and zeroes its AdamW moments).
"""

from __future__ import annotations

from collections import deque
from typing import Any, cast

import torch
from torch import Tensor

from mfr_sae.config import MFRConfig
from mfr_sae.distributed import Shard


def reinit_metric(firing_prob: Tensor, ks: list[int]) -> Tensor:
    """M = mean_j (|p_j - t| / t)^3 per member, t = k / h: [N]."""
    target = torch.tensor(ks, dtype=firing_prob.dtype, device=firing_prob.device).view(-1, 1)
    target = target / firing_prob.shape[1]
    return ((firing_prob - target).abs() / target).pow(3).mean(dim=1)


class ReinitRule:
    """The firing history of this rank's members and the record of reinitialisations (steps since each
    member's (re)initialisation, attempts, events: the same on every rank, which all take the same
    decisions). With cfg.enabled false (the baseline) it only measures: M is returned during the window,
    nobody is re-initialised."""

    def __init__(self, cfg: MFRConfig, ks: list[int], shard: Shard):
        self.cfg, self.ks, self.shard = cfg, list(ks), shard
        self.steps_since_init = [0] * len(ks)
        self.attempts = [0] * len(ks)
        self.events: list[dict[str, Any]] = []
        self.history: deque[tuple[int, Tensor]] = deque()  # (batch size, own members' firing counts [n, h])

    def check(self, step: int, counts: Tensor, batch_size: int) -> tuple[list[int], Tensor | None]:
        """Record this step's firing counts of this rank's members [n, h]; return the members (global
        indices) to re-initialise now and, while any member is inside its window and the history spans
        reinit_samples vectors, M of this rank's members [n] (else None)."""
        for member in range(len(self.ks)):
            self.steps_since_init[member] += 1
        # once every member is past its window nothing can happen again (only a reinit restarts one)
        inside = [member for member, steps in enumerate(self.steps_since_init) if steps <= self.cfg.reinit_window]
        if not inside:
            return [], None
        firing_prob = self._record(counts, batch_size)
        if firing_prob is None:
            return [], None
        own_metric = reinit_metric(firing_prob, self.ks[self.shard.start : self.shard.stop])
        if not self.cfg.enabled:  # the baseline only logs it: no communication
            return [], own_metric
        chosen = self._choose(step, inside, self.shard.gather(own_metric))
        if chosen:  # a re-initialised member needs a fresh window: start the (shared) history again
            self.history.clear()
        return chosen, own_metric

    def _record(self, counts: Tensor, batch_size: int) -> Tensor | None:
        """Add this step's counts to the history, cut to the last reinit_samples vectors; the firing
        probabilities over it, or None while it spans fewer."""
        self.history.append((batch_size, counts))
        while sum(batch for batch, _ in self.history) - self.history[0][0] >= self.cfg.reinit_samples:
            self.history.popleft()
        window = sum(batch for batch, _ in self.history)
        if window < self.cfg.reinit_samples:
            return None
        # the history holds this step's counts at least: the sum is a Tensor, not sum()'s start 0
        return cast(Tensor, sum(counts for _, counts in self.history)) / window

    def _choose(self, step: int, inside: list[int], metric: Tensor) -> list[int]:
        """The members inside their window whose M (of all members [N]) is over the threshold and that have
        attempts left; each gets a fresh window and an event."""
        chosen = []
        for member in inside:
            if metric[member] > self.cfg.reinit_threshold and self.attempts[member] < self.cfg.reinit_max:
                self.attempts[member] += 1
                self.steps_since_init[member] = 0
                self.events.append(
                    {"step": step, "member": member, "metric": metric[member].item(), "attempt": self.attempts[member]}
                )
                chosen.append(member)
        return chosen

    # ------------------------------------------------------------------ checkpointing

    def state(self) -> tuple[dict[str, Tensor | None], dict[str, Any]]:
        """The history of all members whole on rank 0 (a collective: every rank calls it; None on the
        others), and the record."""
        tensors = {
            f"mfr.history.{index}": self.shard.gather_to_main(counts) for index, (_, counts) in enumerate(self.history)
        }
        meta: dict[str, Any] = {
            "steps_since_init": self.steps_since_init,
            "attempts": self.attempts,
            "events": self.events,
            "history_batches": [batch for batch, _ in self.history],
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """From `state()`, the history cut to this rank's members."""
        self.steps_since_init, self.attempts = meta["steps_since_init"], meta["attempts"]
        self.events = meta["events"]
        self.history = deque(
            (batch, tensors[f"mfr.history.{index}"]) for index, batch in enumerate(meta["history_batches"])
        )
