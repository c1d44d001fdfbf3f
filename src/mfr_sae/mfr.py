"""Mutual Feature Regularization (docs/design.md section 4): the auxiliary penalty and the run's MFR state.

Penalty: P = beta * w(t) * mean over member pairs (a, b) of (1 - MMCS(a, b)) (MMCS: mmcs.py), with w(t)
a cosine warmup and beta given, `auto` (the paper: set at the first step so that P equals the mean
reconstruction loss of the members, times a factor with `0.02*auto`, and kept), or `recon`: beta_t =
factor x (running mean of the reconstruction loss) / (1 - MMCS at the first step), so that the penalty keeps
its weight against the reconstruction loss while that loss falls by orders of magnitude during training.

MMCS comes from matches of the decoder rows, recomputed every `match_every` steps and kept in between
(exact at a re-matching step, cheap between; exact `max` matching every step is certified, certified.py),
and from the links L they make: the mean over pairs of MMCS is sum(D * (L @ D)). In one process that is
all; across processes each rank computes its own rows' part of it, with the decoders of the others
streaming round a ring (ring.py). `match_every=0` is the naive dense penalty (full h x h similarities
with autograd every step), kept as the reference.

Reinitialisation: reinit.py; a reinitialisation makes the next penalty re-match all pairs, whatever
`match_every`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.certified import CertifiedMaxMatcher
from mfr_sae.config import ConfigError, MFRConfig, beta_parts
from mfr_sae.distributed import Shard
from mfr_sae.links import Links, linked_similarity, links_between, pulled_similarity
from mfr_sae.matching import (
    NO_MATCH,
    Pair,
    changed_fraction,
    matches_and_best,
    member_pairs,
    n_member_pairs,
    without_marked_pairs,
)
from mfr_sae.mmcs import dense_mmcs
from mfr_sae.reinit import ReinitRule
from mfr_sae.ring import Stream, linked_product, stream_shards
from mfr_sae.row_norms import unit_rows

RECON_MEAN_RATE = 0.01  # beta=recon: the running mean of the reconstruction loss spans about 100 steps


def warmup_weight(step: int, warmup_steps: int) -> float:
    """Cosine ramp from 0 to 1: 0.5 * (1 - cos(pi * t / W)) for t < W, then 1."""
    if step >= warmup_steps:
        return 1.0
    return 0.5 * (1 - math.cos(math.pi * step / warmup_steps))


class MutualRegularizer:
    """The MFR state of one run: beta, matches, the reinitialisation rule. Across processes (`Shard`) each
    rank keeps the matches and firing history of its own members and computes its own members' part of
    the penalty; beta and the reinitialisation record are the same on every rank."""

    def __init__(
        self, cfg: MFRConfig, ks: list[int], shard: Shard | None = None, column_dtype: torch.dtype | None = None
    ):
        """With cfg.enabled false (the baseline) it only measures: the reinitialisation metric is
        logged during the window, nothing is penalised or re-initialised. column_dtype: the dtype the
        decoders of all members are matched and linked in (bf16 under autocast: half the bytes between
        ranks); None keeps the weights' dtype."""
        if cfg.enabled and len(ks) < 2:
            raise ConfigError("mfr.enabled needs sae.n_members >= 2 (the penalty compares members)")
        self.cfg, self.ks, self.enabled, self.column_dtype = cfg, list(ks), cfg.enabled, column_dtype
        self.shard = shard or Shard(len(ks))
        self.reinit = ReinitRule(cfg, ks, self.shard)
        self.beta_factor, self.beta_kind = beta_parts(cfg.beta) or (1.0, "auto")
        # beta: None until auto or recon sets it at the first step (recon: anew every step)
        self.beta: float | None = self.beta_factor if cfg.enabled and self.beta_kind == "fixed" else None
        self.start_distance: float | None = None  # recon: 1 - MMCS at the first step
        self.recon_mean: float | None = None  # recon: running mean of the members' reconstruction loss
        self.matches: dict[Pair, Tensor] = {}  # [2, h] for each pair of this rank's members
        self.links: dict[int, Links] = {}  # L's block (own members, shard from member m) by m, till re-matching
        self.decoders_in: Stream | None = None  # across processes: the decoders of all shards, streaming in
        self.stale_frac: float | None = None  # share of matches changed at the last re-matching (match_every > 1)
        # exact every step (`max`): matched anew only where the bounds cannot certify a match;
        # None matches every row every step (the reference of tests/test_certified.py, bench/certified.py)
        self.idle_to_live = cfg.idle_window > 0 and cfg.idle_to_live
        certify = cfg.match_every == 1 and cfg.mmcs == "max" and cfg.max_cosine >= 1 and cfg.twin_guard >= 1
        certify = certify and not self.idle_to_live and cfg.confirm_cosine >= 1
        self.certified = CertifiedMaxMatcher(cfg.min_cosine) if certify and self.shard.world == 1 else None
        # across processes, each pair is matched by one rank as the decoders pass: one certified matcher a pair
        self.pair_certified: dict[Pair, CertifiedMaxMatcher] | None = {} if certify and self.shard.world > 1 else None
        self.rematched: list[float] = []  # the certified matching's share of rows re-matched, each step since a log
        self.idle: Tensor | None = None  # idle_to_live: all members' idle latents [N, h] at the re-matching step
        self.confirm = cfg.enabled and cfg.confirm_cosine < 1
        self.best: dict[Pair, Tensor] = {}  # confirm: each pair's best cosines [2, h] at the last re-matching
        self.confirmed: Tensor | None = None  # confirm: all members' confirmed latents [N, h] at the last one
        self.linked: Tensor | None = None  # confirm: this rank's latents [n, h] linked since the last one

    @property
    def penalty_on(self) -> bool:
        return self.enabled and self.beta_factor > 0

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
        rematch = self.cfg.match_every > 0 and self._rematch_due(step)
        previous = self.matches
        if self.confirm:
            if rematch:  # matched first: the pulled rows are known only once this matching has confirmed latents
                self._matched_mmcs(weight.detach(), True, pulled)
                self._confirm_matches()
                rematch = False
            unconfirmed = self._unconfirmed(weight)
            logged["confirmed_frac"] = 0.0 if self.confirmed is None else self.confirmed.float().mean().item()
            pulled = unconfirmed if pulled is None else pulled & unconfirmed
        if pulled is not None:
            logged["pulled_frac"] = pulled.float().mean().item()
            if not value and self._pulled_part_will_do(step):
                return self._pulled_part(weight, step, pulled, recon_loss), logged
            weight = torch.where(pulled.unsqueeze(-1), weight, weight.detach())
        if self.cfg.match_every == 0:  # the dense reference: every rank evaluates all of it
            mmcs = dense_mmcs(unit_rows(self.shard.gather_differentiable(weight)), self.cfg.min_cosine).mean()
        else:
            mmcs = self._matched_mmcs(weight, rematch, pulled)
            self._note_rematched()
            new = self.matches is not previous  # matched anew at this step
            stale = changed_fraction(previous, self.matches) if new and self.cfg.match_every > 1 else None
            if stale is not None:  # how far matches drift in match_every steps (this rank's pairs)
                logged["match_stale_frac"] = self.stale_frac = stale
        distance = 1 - mmcs
        if self.beta_kind == "recon":
            self.beta = self._recon_beta(distance.item(), recon_loss())
        elif self.beta is None:
            self.beta = self._auto_beta(distance.item(), recon_loss)
        penalty_weight = self.beta * warmup_weight(step, self.cfg.warmup_steps)
        penalty = penalty_weight * distance
        logged.update(
            penalty=penalty.item(), penalty_weight=penalty_weight, beta_effective=self.beta, pairwise_mmcs=mmcs.item()
        )
        return penalty, logged

    def _rematch_due(self, step: int) -> bool:
        """Whether this step's penalty matches anew: at the first step, after a reinitialisation, every match_every."""
        return not self.matches or step % self.cfg.match_every == 0

    def _unconfirmed(self, weight: Tensor) -> Tensor:
        """confirm: this rank's latents [n, h] that no latent of another member confirmed at the last re-matching
        and that are linked to one that is: the others take no gradient, and the pulled rows' work is theirs."""
        unconfirmed = torch.ones(weight.shape[:2], dtype=torch.bool, device=weight.device)
        if self.confirmed is not None:
            unconfirmed = ~self.confirmed[self.shard.start : self.shard.stop].to(weight.device)
        if self.linked is None:
            self.linked = self._linked_rows(unconfirmed)
        return unconfirmed & self.linked

    def _confirm_matches(self) -> None:
        """confirm, right after a re-matching: the latents it confirmed, and its matches without the pairs of two
        unconfirmed latents (a pair of two confirmed ones stays linked: neither takes a gradient)."""
        self.confirmed = self._gathered_confirmed()
        unconfirmed = ~self.confirmed
        for (a, b), matches in self.matches.items():
            marked = unconfirmed.to(matches.device)
            self.matches[(a, b)] = without_marked_pairs(matches, marked[a], marked[b])
        self.links, self.linked = {}, None

    def _linked_rows(self, like: Tensor) -> Tensor:
        """This rank's latents [n, h] with a match in some pair (as of the last re-matching)."""
        linked = torch.zeros_like(like)
        for pair, matches in self.matches.items():
            for side, member in enumerate(pair):
                if self.shard.start <= member < self.shard.stop:
                    linked[member - self.shard.start] |= matches[side].to(like.device) != NO_MATCH
        return linked

    def _gathered_confirmed(self) -> Tensor:
        """confirm: all members' confirmed latents [N, h] from every rank's best cosines of the re-matching just
        made, which together cover every pair (a collective: every rank takes it at the same step)."""
        known: dict[Pair, Tensor] = {}
        for part in self.shard.gather_objects({pair: best.cpu() for pair, best in self.best.items()}):
            known.update(part)
        best = torch.full((len(self.ks), next(iter(known.values())).shape[1]), -math.inf)
        for (a, b), cosines in known.items():
            best[a], best[b] = best[a].maximum(cosines[0].float()), best[b].maximum(cosines[1].float())
        return best >= self.cfg.confirm_cosine

    def _pulled_part_will_do(self, step: int) -> bool:
        """Whether this step needs nothing of the penalty but its pulled rows' gradient: one process, matches
        kept from the last re-matching (not made now), beta known."""
        kept = bool(self.matches and self.links) and step % self.cfg.match_every != 0
        known_beta = self.beta is not None and (self.beta_kind != "recon" or self.start_distance is not None)
        return self.shard.world == 1 and self.certified is None and self.cfg.match_every > 0 and kept and known_beta

    def _pulled_part(self, weight: Tensor, step: int, pulled: Tensor, recon_loss: Callable[[], float]) -> Tensor:
        """-beta * w(step) * (the pulled rows' part of sum(D * (L @ D))): its gradient reaching the pulled rows is
        the whole penalty's (for a symmetric L, that of row r is 2 (L @ D)_r projected: only row r's products)."""
        if self.beta_kind == "recon":  # its running mean goes on every step
            self.beta = self._recon_beta(0.0, recon_loss())
        assert self.beta is not None  # `_pulled_part_will_do`
        rows = pulled.flatten().nonzero().squeeze(1)
        product = self.links[0].rows(rows).matmul_unit(self._one_process_columns(weight))
        return -self.beta * warmup_weight(step, self.cfg.warmup_steps) * pulled_similarity(weight, rows, product)

    def match_log(self) -> dict[str, float]:
        """For the log line: `match_stale_frac` (match_every > 1: the share of matches changed at the last
        re-matching) and `match_rematched_frac` (certified exact matching: the mean share of rows matched
        again per step since the last log line)."""
        logged = {} if self.stale_frac is None else {"match_stale_frac": self.stale_frac}
        if self.rematched:
            logged["match_rematched_frac"] = sum(self.rematched) / len(self.rematched)
            self.rematched = []
        return logged

    def _auto_beta(self, distance: float, recon_loss: Callable[[], float]) -> float:
        """beta=auto: the penalty equals the reconstruction loss at the start (times beta_factor)."""
        return self.beta_factor * recon_loss() / self._first_distance(distance)

    def _recon_beta(self, distance: float, recon_loss: float) -> float:
        """beta=recon: beta_factor x the running mean of the reconstruction loss (about the last 100 steps) over
        the distance at the first step."""
        if self.start_distance is None:
            self.start_distance = self._first_distance(distance)
        mean = self.recon_mean
        self.recon_mean = recon_loss if mean is None else mean + RECON_MEAN_RATE * (recon_loss - mean)
        return self.beta_factor * self.recon_mean / self.start_distance

    def _first_distance(self, distance: float) -> float:
        """1 - MMCS at the first step, which auto and recon divide by."""
        if distance <= 1e-8:
            raise ConfigError(
                f"mfr.beta={self.cfg.beta}: the members start identical (pairwise MMCS = 1), "
                "so no beta makes the penalty equal the loss; set mfr.beta to a number"
            )
        return distance

    def _matched_mmcs(self, weight: Tensor, rematch: bool, idle: Tensor | None) -> Tensor:
        """Mean over pairs of MMCS = sum(D * (L @ D)), from the matches (made anew when `rematch`, where
        idle_to_live leaves pairs of this rank's `idle` latents out); across processes each rank adds its own
        rows' part, summed in member order whatever the shards."""
        if rematch and self.certified is None:
            self.matches, self.links, self.best = {}, {}, {}
            if self.idle_to_live and idle is not None:  # every rank's, for the pairs it matches
                self.idle = self.shard.gather(idle.to(torch.uint8)).bool()
        if self.shard.world == 1:
            product = self._one_process_product(weight, rematch)
        else:
            if self.decoders_in is None:
                self.prefetch(weight)
            stream, self.decoders_in = self.decoders_in, None
            assert stream is not None  # prefetch streams whenever the penalty is on, as it is when asked for
            product = linked_product(
                self.shard, weight, stream, self.matches, self.links, self._match if rematch else None
            )
        return self.shard.gather_differentiable(linked_similarity(weight, product)).sum()

    @torch.no_grad()
    def _one_process_product(self, weight: Tensor, rematch: bool) -> Tensor:
        """L @ D for all rows [N * h, d], all pairs matched first at a re-matching step."""
        n, h, d = weight.shape
        columns = self._one_process_columns(weight)
        if self.certified is not None:
            matches = self.certified.match(F.normalize(columns, dim=-1).view(n, h, d))
            if not self.links or any(
                pair not in self.matches or not torch.equal(m, self.matches[pair]) for pair, m in matches.items()
            ):
                self.matches, self.links = matches, {}  # links made anew only when a match changed
        elif rematch:
            unit = F.normalize(columns, dim=-1).view(n, h, d)
            pairs = member_pairs(n)  # all pairs at once: their assignments side by side
            matched = self._match_pairs(pairs, [(unit[a], unit[b]) for a, b in pairs])
            self.matches = dict(zip(pairs, matched))
        if not self.links:  # one block: all members' rows to all members' rows
            self.links[0] = links_between(self.matches, range(n), range(n), h, n_member_pairs(n), weight.device)
        return self.links[0].matmul_unit(columns)

    def _match_pairs(self, pairs: list[Pair], unit_rows: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """The matches [2, h] of member pairs from their unit rows, kept where mfr.min_cosine, max_cosine (the
        ceiling), twin_guard and idle_to_live say (confirm: their best cosines kept, for `_confirm_matches`)."""
        cfg = self.cfg
        matched, best = matches_and_best(
            unit_rows,
            cfg.mmcs,
            min_cosine=cfg.min_cosine,
            max_cosine=cfg.max_cosine,
            twin_cosine=cfg.twin_guard,
            best=self.confirm,
        )
        self.best.update(zip(pairs, best))
        if self.idle is None:
            return matched
        idle = self.idle.to(matched[0].device) if matched else self.idle
        return [without_marked_pairs(m, idle[a], idle[b]) for m, (a, b) in zip(matched, pairs)]

    def _one_process_columns(self, weight: Tensor) -> Tensor:
        """All members' decoder rows [N * h, d] in column_dtype and back: rounded as the rows that travel between
        ranks, so that 1 and R processes agree."""
        return self._columns(weight).to(weight.dtype).flatten(0, 1)

    def _columns(self, weight: Tensor) -> Tensor:
        """The decoder rows in the dtype they are sent between ranks, matched and linked in: column_dtype."""
        return weight.detach().to(self.column_dtype or weight.dtype)

    def _match(self, pair: Pair, a: Tensor, b: Tensor) -> Tensor:
        """The matches [2, h] of a pair from its members' unit rows; across processes with exact `max`
        matching, certified by the pair's own matcher (one process certifies all pairs at once)."""
        if self.pair_certified is None:
            return self._match_pairs([pair], [(a, b)])[0]
        matcher = self.pair_certified.setdefault(pair, CertifiedMaxMatcher(self.cfg.min_cosine))
        return matcher.match(torch.stack([a, b]))[(0, 1)]

    def _note_rematched(self) -> None:
        """This step's share of rows matched against all rows, over the pairs this rank certified."""
        matchers = [self.certified] if self.certified is not None else list((self.pair_certified or {}).values())
        shares = [m.rematched_frac for m in matchers if m.rematched_frac is not None]
        if shares:
            self.rematched.append(sum(shares) / len(shares))

    def prefetch(self, weight: Tensor) -> None:
        """Across processes, start streaming the decoders of all members for the next `penalty`, so that the
        first transfer overlaps the reconstruction's forward pass (the weights do not change in between)."""
        if self.cfg.match_every and self.penalty_on and self.shard.world > 1:
            self.decoders_in = stream_shards(self.shard, self._columns(weight))

    # ------------------------------------------------------------------ reinitialisation

    def reinit_check(self, step: int, counts: Tensor, batch_size: int) -> tuple[list[int], Tensor | None]:
        """Record this step's firing counts of this rank's members [n, h]; return the members (global
        indices) to re-initialise now and, while any member is inside its window, the metric M of this
        rank's members [n] (None once all are past it)."""
        chosen, own_metric = self.reinit.check(step, counts, batch_size)
        if chosen:  # fresh partners: matches of its old weights would pull it until the next re-matching, so
            # the next penalty re-matches (every rank takes this decision: all re-match together)
            self.matches, self.links, self.linked = {}, {}, None
            if self.certified is not None:
                self.certified.reset()
            if self.pair_certified is not None:
                self.pair_certified = {}
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
        tensors = {"mfr.matches": self._all_matches()} if self.matches else {}
        if self.confirmed is not None:
            tensors["mfr.confirmed"] = self.confirmed.to(torch.uint8)
        reinit_tensors, reinit_meta = self.reinit.state()
        beta_meta = {"beta": self.beta, "beta_start_distance": self.start_distance, "recon_mean": self.recon_mean}
        return tensors | reinit_tensors, beta_meta | reinit_meta

    def _all_matches(self) -> Tensor:
        """The matches of every pair [P, 2, h], on every rank: each rank knows the pairs of its own members,
        together all pairs."""
        known = {}
        for part in self.shard.gather_objects({pair: matches.cpu() for pair, matches in self.matches.items()}):
            known.update(part)
        return torch.stack([known[pair] for pair in member_pairs(len(self.ks))])

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """From `state()` of a run on any number of processes, its firing history cut to this rank's members
        (mfr.history.*; mfr.matches whole)."""
        self.beta = meta["beta"]
        self.start_distance, self.recon_mean = meta.get("beta_start_distance"), meta.get("recon_mean")
        self.reinit.load_state(tensors, meta)
        own_members = range(self.shard.start, self.shard.stop)
        saved = zip(member_pairs(len(self.ks)), tensors.get("mfr.matches", []))
        self.matches = {pair: matches for pair, matches in saved if pair[0] in own_members or pair[1] in own_members}
        confirmed = tensors.get("mfr.confirmed")
        self.confirmed = None if confirmed is None else confirmed.bool()
        self.links, self.linked = {}, None
