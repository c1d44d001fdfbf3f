"""Mutual Feature Regularization (docs/design.md section 4): the auxiliary penalty and the run's MFR state.

Penalty: P = beta * w(t) * mean over member pairs (a, b) of (1 - MMCS(a, b)) (MMCS: mmcs.py), with w(t)
a cosine warmup and beta given, `auto` or `recon` (coefficient.py).

MMCS comes from matches of the decoder rows, recomputed every `match_every` steps and kept in between
(exact at a re-matching step, cheap between; exact `max` matching every step is certified, certified.py),
and from the links L they make: the mean over pairs of MMCS is sum(D * (L @ D)) (penalty_matches.py). In one
process that is all; across processes each rank computes its own rows' part of it, with the decoders of the
others streaming round a ring (ring.py). `match_every=0` is the naive dense penalty (full h x h similarities
with autograd every step), kept as the reference.

Reinitialisation: reinit.py; a reinitialisation makes the next penalty re-match all pairs, whatever
`match_every`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mfr_sae.coefficient import Coefficient, warmup_weight
from mfr_sae.config import ConfigError, MFRConfig
from mfr_sae.distributed import Shard
from mfr_sae.links import pulled_similarity
from mfr_sae.matching import changed_fraction
from mfr_sae.mmcs import dense_mmcs
from mfr_sae.penalty_matches import PenaltyMatches
from mfr_sae.reinit import ReinitRule
from mfr_sae.row_norms import unit_rows


class MutualRegularizer:
    """The MFR state of one run: beta (`Coefficient`), matches (`PenaltyMatches`), the reinitialisation rule.
    Across processes (`Shard`) each rank keeps the matches and firing history of its own members and computes its
    own members' part of the penalty; beta and the reinitialisation record are the same on every rank."""

    def __init__(
        self, cfg: MFRConfig, ks: list[int], shard: Shard | None = None, column_dtype: torch.dtype | None = None
    ):
        """With cfg.enabled false (the baseline) it only measures: the reinitialisation metric is
        logged during the window, nothing is penalised or re-initialised. column_dtype: the dtype the
        decoders of all members are matched and linked in (bf16 under autocast: half the bytes between
        ranks); None keeps the weights' dtype."""
        if cfg.enabled and len(ks) < 2:
            raise ConfigError("mfr.enabled needs sae.n_members >= 2 (the penalty compares members)")
        self.cfg, self.ks, self.enabled = cfg, list(ks), cfg.enabled
        self.shard = shard or Shard(len(ks))
        self.reinit = ReinitRule(cfg, ks, self.shard)
        self.coefficient = Coefficient(cfg)
        self.matching = PenaltyMatches(cfg, len(ks), self.shard, self.penalty_on, column_dtype)

    @property
    def penalty_on(self) -> bool:
        return self.enabled and self.coefficient.beta_factor > 0

    @property
    def beta(self) -> float | None:
        """beta as of the last penalty (None until auto or recon sets it at the first step)."""
        return self.coefficient.beta

    # ------------------------------------------------------------------ penalty

    def penalty(
        self,
        weight: Tensor,
        step: int,
        recon_loss: Callable[[], float],
        pulled: Tensor | None = None,
        value: bool = True,
    ) -> tuple[Tensor, dict[str, float]]:
        """beta * w(step) * mean over pairs (1 - MMCS); weight [n, h, d]: this rank's members' decoder rows
        (any norm; all N in one process), the gradient reaching them being that of the whole penalty.
        recon_loss: the mean reconstruction loss of all members (asked for once by beta=auto, every step by
        recon). pulled [n, h] (mfr.idle_window): only these rows take the penalty's gradient; the value is
        the same. Without `value` (a step whose penalty is not logged) and with `pulled`, between
        re-matchings, only the pulled rows' part is computed: the same gradient for a fraction of the work,
        and a tensor that is not the penalty's value (nothing is logged from it)."""
        logged: dict[str, float] = {}
        matching = self.matching
        rematch = self.cfg.match_every > 0 and matching.rematch_due(step)
        previous = matching.matches
        if matching.confirm:
            if rematch:  # matched first: the pulled rows are known only once this matching has confirmed latents
                matching.matched_mmcs(weight.detach(), True, pulled)
                matching.confirm_matches()
                rematch = False
            unconfirmed = matching.unconfirmed_linked(weight)
            logged["confirmed_frac"] = 0.0 if matching.confirmed is None else matching.confirmed.float().mean().item()
            pulled = unconfirmed if pulled is None else pulled & unconfirmed
        if pulled is not None:
            logged["pulled_frac"] = pulled.float().mean().item()
            if not value and self._pulled_part_will_do(step):
                return self._pulled_part(weight, step, pulled, recon_loss), logged
            weight = torch.where(pulled.unsqueeze(-1), weight, weight.detach())
        if self.cfg.match_every == 0:  # the dense reference: every rank evaluates all of it
            mmcs = dense_mmcs(unit_rows(self.shard.gather_differentiable(weight)), self.cfg.min_cosine).mean()
        else:
            mmcs = matching.matched_mmcs(weight, rematch, pulled)
            matching.note_rematched()
            new = matching.matches is not previous  # matched anew at this step
            stale = changed_fraction(previous, matching.matches) if new and self.cfg.match_every > 1 else None
            if stale is not None:  # how far matches drift in match_every steps (this rank's pairs)
                logged["match_stale_frac"] = matching.stale_frac = stale
        distance = 1 - mmcs
        beta = self.coefficient.beta_at(distance, recon_loss)
        penalty_weight = beta * warmup_weight(step, self.cfg.warmup_steps)
        penalty = penalty_weight * distance
        logged.update(
            penalty=penalty.item(), penalty_weight=penalty_weight, beta_effective=beta, pairwise_mmcs=mmcs.item()
        )
        return penalty, logged

    def _pulled_part_will_do(self, step: int) -> bool:
        """Whether this step needs nothing of the penalty but its pulled rows' gradient: one process, matches
        kept from the last re-matching (not made now), beta known."""
        return self.matching.kept_at(step) and self.coefficient.known()

    def _pulled_part(self, weight: Tensor, step: int, pulled: Tensor, recon_loss: Callable[[], float]) -> Tensor:
        """-beta * w(step) * (the pulled rows' part of sum(D * (L @ D))): its gradient reaching the pulled rows is
        the whole penalty's (for a symmetric L, that of row r is 2 (L @ D)_r projected: only row r's products)."""
        beta = self.coefficient.beta_between(recon_loss)
        rows = pulled.flatten().nonzero().squeeze(1)
        product = self.matching.links[0].rows(rows).matmul_unit(self.matching.one_process_columns(weight))
        return -beta * warmup_weight(step, self.cfg.warmup_steps) * pulled_similarity(weight, rows, product)

    def match_log(self) -> dict[str, float]:
        """For the log line: `match_stale_frac` and `match_rematched_frac` (`PenaltyMatches.match_log`)."""
        return self.matching.match_log()

    def prefetch(self, weight: Tensor) -> None:
        """Across processes, start streaming the decoders of all members for the next `penalty`, so that the
        first transfer overlaps the reconstruction's forward pass (the weights do not change in between)."""
        self.matching.prefetch(weight)

    # ------------------------------------------------------------------ reinitialisation

    def reinit_check(self, step: int, counts: Tensor, batch_size: int) -> tuple[list[int], Tensor | None]:
        """Record this step's firing counts of this rank's members [n, h]; return the members (global
        indices) to re-initialise now and, while any member is inside its window, the metric M of this
        rank's members [n] (None once all are past it)."""
        chosen, own_metric = self.reinit.check(step, counts, batch_size)
        if chosen:  # fresh partners: matches of its old weights would pull it until the next re-matching, so
            # the next penalty re-matches (every rank takes this decision: all re-match together)
            self.matching.reset()
        return chosen, own_metric

    @property
    def steps_since_init(self) -> list[int]:
        return self.reinit.steps_since_init

    @property
    def attempts(self) -> list[int]:
        return self.reinit.attempts

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.reinit.events

    # ------------------------------------------------------------------ checkpointing

    def state(self) -> tuple[dict[str, Tensor | None], dict[str, Any]]:
        """All members' state, whole on rank 0 (a collective across processes: every rank calls it; the
        firing history is None on the other ranks)."""
        tensors = self.matching.state()
        reinit_tensors, reinit_meta = self.reinit.state()
        return tensors | reinit_tensors, self.coefficient.state() | reinit_meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """From `state()` of a run on any number of processes, its firing history cut to this rank's members
        (mfr.history.*; mfr.matches whole)."""
        self.coefficient.load_state(meta)
        self.reinit.load_state(tensors, meta)
        self.matching.load_state(tensors)
