"""The matches the MFR penalty reads (docs/design.md section 4) and when they are made: anew every `match_every`
steps and after a reinitialisation, kept in between (the share that changed: `match_stale_frac`), or exact `max`
matching every step, certified (certified.py: only the rows its bounds cannot certify matched again). They are
filtered by mfr.min_cosine, max_cosine, twin_guard (matching.py), idle_to_live and confirmation (only the latents
that no other member confirms are pulled, towards those the same re-matching confirmed), and make the links L
(links.py) whose sum(D * (L @ D)) is the mean over pairs of MMCS. In one process that is all; across processes
each rank matches as the decoders of the others stream round the ring (ring.py), and keeps the matches of the
pairs of its own members.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.certified import CertifiedMaxMatcher
from mfr_sae.config import MFRConfig
from mfr_sae.distributed import Shard
from mfr_sae.links import Links, linked_similarity, links_between
from mfr_sae.matching import NO_MATCH, Pair, matches_and_best, member_pairs, n_member_pairs, without_marked_pairs
from mfr_sae.ring import Stream, linked_product, stream_shards


class PenaltyMatches:
    """The matches of this rank's member pairs, the links they make and what decides them. penalty_on: whether
    the run takes the penalty (across processes the decoders stream only then). column_dtype: the dtype the
    decoders of all members are matched and linked in (bf16 under autocast: half the bytes between ranks); None
    keeps the weights' dtype."""

    def __init__(
        self, cfg: MFRConfig, n_members: int, shard: Shard, penalty_on: bool, column_dtype: torch.dtype | None = None
    ):
        self.cfg, self.n_members, self.shard = cfg, n_members, shard
        self.penalty_on, self.column_dtype = penalty_on, column_dtype
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

    def reset(self) -> None:
        """After a reinitialisation: fresh partners, so the next penalty re-matches all pairs (every rank resets
        at the same step: all re-match together)."""
        self.matches, self.links, self.linked = {}, {}, None
        if self.certified is not None:
            self.certified.reset()
        if self.pair_certified is not None:
            self.pair_certified = {}

    def state(self) -> dict[str, Tensor]:
        """The matches of all pairs and the confirmed latents, on every rank (a collective across processes)."""
        tensors = {"mfr.matches": self._all_matches()} if self.matches else {}
        if self.confirmed is not None:
            tensors["mfr.confirmed"] = self.confirmed.to(torch.uint8)
        return tensors

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """From `state()` of a run on any number of processes: the matches of the pairs of this rank's members."""
        own_members = range(self.shard.start, self.shard.stop)
        saved = zip(member_pairs(self.n_members), tensors.get("mfr.matches", []))
        self.matches = {pair: matches for pair, matches in saved if pair[0] in own_members or pair[1] in own_members}
        confirmed = tensors.get("mfr.confirmed")
        self.confirmed = None if confirmed is None else confirmed.bool()
        self.links, self.linked = {}, None

    def rematch_due(self, step: int) -> bool:
        """Whether this step's penalty matches anew: at the first step, after a reinitialisation, every match_every."""
        return not self.matches or step % self.cfg.match_every == 0

    def kept_at(self, step: int) -> bool:
        """Whether this step's penalty reads the matches and links kept from the last re-matching (none made now),
        in one process and without the certified matching."""
        kept = bool(self.matches and self.links) and step % self.cfg.match_every != 0
        return self.shard.world == 1 and self.certified is None and self.cfg.match_every > 0 and kept

    def unconfirmed_linked(self, weight: Tensor) -> Tensor:
        """confirm: this rank's latents [n, h] that no latent of another member confirmed at the last re-matching
        and that are linked to one that is: the others take no gradient, and the pulled rows' work is theirs."""
        unconfirmed = torch.ones(weight.shape[:2], dtype=torch.bool, device=weight.device)
        if self.confirmed is not None:
            unconfirmed = ~self.confirmed[self.shard.start : self.shard.stop].to(weight.device)
        if self.linked is None:
            self.linked = self._linked_rows(unconfirmed)
        return unconfirmed & self.linked

    def confirm_matches(self) -> None:
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
        best = torch.full((self.n_members, next(iter(known.values())).shape[1]), -math.inf)
        for (a, b), cosines in known.items():
            best[a], best[b] = best[a].maximum(cosines[0].float()), best[b].maximum(cosines[1].float())
        return best >= self.cfg.confirm_cosine

    def match_log(self) -> dict[str, float]:
        """For the log line: `match_stale_frac` (match_every > 1: the share of matches changed at the last
        re-matching) and `match_rematched_frac` (certified exact matching: the mean share of rows matched
        again per step since the last log line)."""
        logged = {} if self.stale_frac is None else {"match_stale_frac": self.stale_frac}
        if self.rematched:
            logged["match_rematched_frac"] = sum(self.rematched) / len(self.rematched)
            self.rematched = []
        return logged

    def matched_mmcs(self, weight: Tensor, rematch: bool, idle: Tensor | None) -> Tensor:
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
        columns = self.one_process_columns(weight)
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
        ceiling), twin_guard and idle_to_live say (confirm: their best cosines kept, for `confirm_matches`)."""
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

    def one_process_columns(self, weight: Tensor) -> Tensor:
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

    def note_rematched(self) -> None:
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

    def _all_matches(self) -> Tensor:
        """The matches of every pair [P, 2, h], on every rank: each rank knows the pairs of its own members,
        together all pairs."""
        known = {}
        for part in self.shard.gather_objects({pair: matches.cpu() for pair, matches in self.matches.items()}):
            known.update(part)
        return torch.stack([known[pair] for pair in member_pairs(self.n_members)])
