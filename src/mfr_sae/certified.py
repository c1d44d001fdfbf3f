"""Exact `max` matching every step at a fraction of its price: re-match only the rows whose match the
bound cannot certify (issue 19).

The `max` match of row i of member a is the row of member b with the largest cosine. When the row was last
matched exactly we keep its K best partners (the candidates) and the (K+1)-th best cosine r_i. Each step
the cosines to the candidates are computed exactly (a sampled product: K dot products a row) and every
other cosine is bounded: for unit rows |cos(x, y) - cos(x', y')| <= |x - x'| + |y - y'|, so each step adds
to the bound r_i how far row i moved and how far the farthest-moving row of b moved. While the best
candidate's cosine is above the bound (by `margin`), the best candidate is the match. A row whose bound
fails is matched again against every row of b (a [rows, h] product), which renews its candidates and its
bound; when most rows fail, everything is matched anew (one product serves both directions of a pair).

Bounds grow by each step's movement rather than by the movement since a fixed reference: against a fixed
reference, a row matched anew would carry the movement of every step before it.

Near ties are settled in float64 as exact matching settles them (mmcs.TIE_TOLERANCE), so that the result
is the matching `match_pair` finds, bitwise; with a threshold (min_cosine > -1) a match's cosine is exact
(a candidate's), so its side of the threshold is decided as `match_pair` decides it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from mfr_sae.metrics import CHUNK_ROWS
from mfr_sae.mmcs import NO_MATCH, TIE_TOLERANCE, Pair, at_least, best_both_ways, member_pairs, settle_near_ties


@dataclass
class _Candidates:
    """For each row of one member (the rows) matched into another (the columns): its K best partners when
    last matched exactly (sorted, as CSR wants them for the sampled product) and the bound of every other
    cosine."""

    columns: Tensor  # [h, K] sorted
    bound_rest: Tensor  # [h]

    def mask(self) -> Tensor:
        h, k = self.columns.shape
        offsets = torch.arange(0, h * k + 1, k, device=self.columns.device)
        values = torch.zeros(h * k, device=self.columns.device, dtype=self.bound_rest.dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is what we need of it
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(offsets, self.columns.flatten(), values, (h, h), check_invariants=False)


class CertifiedMaxMatcher:
    """The exact `max` matches of every member pair, step after step, re-matching only uncertified rows.

    Call `match(unit)` every step with the unit decoder rows [N, h, d]; `reset()` when the rows change
    by more than a training step does (a reinitialisation), which makes the next call match everything."""

    def __init__(
        self,
        min_cosine: float = -1.0,
        n_candidates: int = 8,
        margin: float = 1e-4,
        full_share: float = 0.5,
        chunk: int = CHUNK_ROWS,
    ):
        """full_share: when more than this share of all rows fails, everything is matched anew rather than
        row by row."""
        self.min_cosine, self.n_candidates, self.margin = min_cosine, n_candidates, margin
        self.full_share, self.chunk = full_share, chunk
        self.previous: Tensor | None = None  # [N, h, d] the unit rows of the last call
        self.candidates: dict[tuple[int, int], _Candidates] = {}  # by (row member, column member)
        self.rematched_frac: float | None = None  # share of rows matched again at the last call

    def reset(self) -> None:
        self.previous, self.candidates = None, {}

    @torch.no_grad()
    def match(self, unit: Tensor) -> dict[Pair, Tensor]:
        """The matches of every pair (a, b), a < b: [2, h] long (row 0: a's rows into b; row 1: b's into a;
        NO_MATCH below min_cosine), equal to exact matching (`match_pair`) of these rows."""
        n, h, _ = unit.shape
        k = min(self.n_candidates, h - 1)
        if self.previous is None or self.previous.shape != unit.shape or k < 1:
            return self._match_everything(unit, k)
        moved = torch.linalg.vector_norm(unit - self.previous, dim=-1)  # [N, h]
        self.previous.copy_(unit)
        farthest = moved.amax(dim=1)
        best: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        failed: dict[tuple[int, int], Tensor] = {}
        for (rows, columns), candidates in self.candidates.items():
            cosines = torch.sparse.sampled_addmm(candidates.mask(), unit[rows], unit[columns].T).values().view(h, k)
            top = cosines.topk(min(2, k), dim=1)
            best[(rows, columns)] = top.values[:, 0], candidates.columns.gather(1, top.indices[:, :1]).squeeze(1)
            candidates.bound_rest += moved[rows] + farthest[columns]
            certain = top.values[:, 0] > candidates.bound_rest + self.margin
            if k > 1:  # a near tie between candidates: settled as exact matching settles it
                certain &= top.values[:, 0] - top.values[:, 1] >= TIE_TOLERANCE
            failed[(rows, columns)] = (~certain).nonzero().squeeze(1)
        n_failed = sum(len(rows) for rows in failed.values())
        if n_failed > self.full_share * len(self.candidates) * h:
            # one product serves both directions of a pair: dearer to re-match this many rows one way at a time
            return self._match_everything(unit, k)
        for pair, failed_rows in failed.items():
            if len(failed_rows):
                self._rematch(unit, pair, failed_rows, best[pair], k)
        self.rematched_frac = n_failed / (len(self.candidates) * h)
        return self._matches(unit, best)

    def _matches(self, unit: Tensor, best: dict[tuple[int, int], tuple[Tensor, Tensor]]) -> dict[Pair, Tensor]:
        matches = {}
        for a, b in member_pairs(len(unit)):
            directions = []
            for rows, columns in [(a, b), (b, a)]:
                cosine, match = best[(rows, columns)]
                if self.min_cosine > -1:
                    linked = at_least(cosine, unit[rows], unit[columns][match], self.min_cosine)
                    match = match.masked_fill(~linked, NO_MATCH)
                directions.append(match)
            matches[(a, b)] = torch.stack(directions)
        return matches

    # ------------------------------------------------------------------ exact matching

    def _match_everything(self, unit: Tensor, k: int) -> dict[Pair, Tensor]:
        """All rows of all pairs matched exactly, both directions of a pair from one chunked product; the
        bounds start at the (K+1)-th cosines."""
        self.previous, self.candidates, best = unit.clone(), {}, {}
        for a, b in member_pairs(len(unit)):
            for direction, (cosine, match, top) in zip([(a, b), (b, a)], best_both_ways(unit[a], unit[b], k + 1)):
                best[direction] = cosine, match
                self.candidates[direction] = _Candidates(top.indices[:, :k].sort(dim=1).values, top.values[:, k])
        self.rematched_frac = 1.0
        return self._matches(unit, best)

    def _rematch(
        self,
        unit: Tensor,
        pair: tuple[int, int],
        failed: Tensor,
        best: tuple[Tensor, Tensor],
        k: int,
    ) -> None:
        """Match the rows `failed` of member pair[0] exactly against all rows of member pair[1] (into
        `best`, in place), renewing their candidates and bounds."""
        rows, columns = pair
        candidates = self.candidates[pair]
        for start in range(0, len(failed), self.chunk):
            chunk = failed[start : start + self.chunk]
            chunk_rows = unit[rows][chunk]
            top = (chunk_rows @ unit[columns].T).topk(k + 1, dim=1)
            best[0][chunk] = top.values[:, 0]
            best[1][chunk] = settle_near_ties(chunk_rows, unit[columns], top.values, top.indices[:, 0])
            candidates.columns[chunk] = top.indices[:, :k].sort(dim=1).values
            candidates.bound_rest[chunk] = top.values[:, k]
