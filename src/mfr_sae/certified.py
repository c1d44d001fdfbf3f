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

Where bf16 products are fast (AMX, tensor cores; `screen`), that product is first taken in bf16
(`mfr_sae.screen`, whose error bound is proven): the screen decides a row by itself when its best leads
its second by more than twice the bound, else it renews the row's candidates, whose exact cosines decide;
only rows still open are matched in fp32 against every row (about 1 in 3,000 at the GPT-2 shape).

Bounds grow by each step's movement rather than by the movement since a fixed reference: against a fixed
reference, a row matched anew would carry the movement of every step before it.

Near ties are settled in float64 as exact matching settles them (search.TIE_TOLERANCE), so that the result
is the matching `match_pair` finds, bitwise; with a threshold (min_cosine > -1) a match's cosine is exact
(a candidate's), so its side of the threshold is decided as `match_pair` decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mfr_sae.matching import NO_MATCH, Pair, member_pairs
from mfr_sae.metrics import CHUNK_ROWS
from mfr_sae.screen import bf16_is_faster, screen_both_ways, screen_error, screen_rows
from mfr_sae.search import TIE_TOLERANCE, Top, at_least, best_both_ways, settle_near_ties
from mfr_sae.sparse_grads import csr_matrix


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
        return csr_matrix(offsets, self.columns.flatten(), values, (h, h))  # the pattern sampled_addmm computes


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
        screen: bool | None = None,
    ):
        """full_share: when more than this share of all rows fails, everything is matched anew rather than
        row by row. screen: renew candidates from a bf16 product first (`mfr_sae.screen`; None: where bf16
        products are at least twice as fast as fp32 ones)."""
        self.min_cosine, self.n_candidates, self.margin = min_cosine, n_candidates, margin
        self.full_share, self.chunk, self.screen = full_share, chunk, screen
        self.previous: Tensor | None = None  # [N, h, d] the unit rows of the last call
        self.candidates: dict[tuple[int, int], _Candidates] = {}  # by (row member, column member)
        self.rematched_frac: float | None = None  # share of rows matched against all rows at the last call

    def reset(self) -> None:
        self.previous, self.candidates = None, {}

    @torch.no_grad()
    def match(self, unit: Tensor) -> dict[Pair, Tensor]:
        """The matches of every pair (a, b), a < b: [2, h] long (row 0: a's rows into b; row 1: b's into a;
        NO_MATCH below min_cosine), equal to exact matching (`match_pair`) of these rows."""
        h = unit.shape[1]
        k = min(self.n_candidates, h - 1)
        fresh = self.previous is None or self.previous.shape != unit.shape or k < 1
        if self.screen is None:
            self.screen = bf16_is_faster(unit.device)
        if fresh and (k < 1 or not self.screen):
            return self._match_everything(unit, k)
        if fresh:
            self.previous = unit.clone()
            self._screen_everything(unit, k)
        else:
            assert self.previous is not None  # not fresh
            moved = torch.linalg.vector_norm(unit - self.previous, dim=-1)  # [N, h]
            self.previous.copy_(unit)
            farthest = moved.amax(dim=1)
            for (rows, columns), candidates in self.candidates.items():
                candidates.bound_rest += moved[rows] + farthest[columns]
        best, failed = self._certify_all(unit, k)
        total = len(self.candidates) * h
        renewed = total if fresh else sum(len(failing) for failing in failed.values())
        if not fresh and renewed > self.full_share * total:
            if not self.screen:  # one product serves both directions of a pair: dearer row by row
                return self._match_everything(unit, k)
            self._screen_everything(unit, k)
            best, failed = self._certify_all(unit, k)
            renewed = total
        elif self.screen and not fresh and renewed:
            low = unit.bfloat16()
            for pair, failing in failed.items():
                if len(failing):
                    failed[pair] = self._screen_again(unit, low, pair, failing, best[pair], k)
        for pair, failing in failed.items():
            if len(failing):
                self._rematch(unit, pair, failing, best[pair], k)
        self.rematched_frac = renewed / total
        return self._matches(unit, best)

    def _certify_all(
        self, unit: Tensor, k: int
    ) -> tuple[dict[tuple[int, int], tuple[Tensor, Tensor]], dict[tuple[int, int], Tensor]]:
        """`_certify` of every row of every pair and direction, the candidates' cosines from sampled products."""
        best, failed = {}, {}
        for pair, candidates in self.candidates.items():
            cosines = torch.sparse.sampled_addmm(candidates.mask(), unit[pair[0]], unit[pair[1]].T).values()
            cosines = cosines.view(len(candidates.columns), k)
            best[pair], failed[pair] = self._certify(cosines, candidates.columns, candidates.bound_rest, k)
        return best, failed

    def _certify(
        self, cosines: Tensor, columns: Tensor, bound_rest: Tensor, k: int
    ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """From the exact cosines of rows with their candidates `columns` [rows, K] and the bound of all other
        cosines [rows]: each row's best candidate (cosine, column), and the positions of the rows whose best
        is not proven the best of all columns."""
        top = cosines.topk(min(2, k), dim=1)
        best = top.values[:, 0], columns.gather(1, top.indices[:, :1]).squeeze(1)
        certain = top.values[:, 0] > bound_rest + self.margin
        if k > 1:  # a near tie between candidates: settled as exact matching settles it
            certain &= top.values[:, 0] - top.values[:, 1] >= TIE_TOLERANCE
        return best, (~certain).nonzero().squeeze(1)

    def _screen_again(
        self, unit: Tensor, low: Tensor, pair: tuple[int, int], rows: Tensor, best: tuple[Tensor, Tensor], k: int
    ) -> Tensor:
        """Renew the candidates of `rows` from the bf16 screen (low: unit in bf16) and write into `best` the
        match of each row the screen decides: by itself where its best leads its second by more than twice
        its error plus the near-tie tolerance, else from the candidates' exact cosines. Returns the rows
        still open."""
        row_member, column_member = pair
        candidates, error = self.candidates[pair], screen_error(unit.shape[-1])
        top = screen_rows(low[row_member][rows], low[column_member], k + 1, self.chunk)
        candidates.columns[rows] = top.indices[:, :k].sort(dim=1).values
        candidates.bound_rest[rows] = top.values[:, k] + error
        clear = top.values[:, 0] - top.values[:, 1] >= 2 * error + TIE_TOLERANCE
        decided, rows = rows[clear], rows[~clear]
        match = top.indices[clear, 0]
        best[0][decided] = torch.linalg.vecdot(unit[row_member][decided], unit[column_member][match])
        best[1][decided] = match
        if not len(rows):
            return rows
        partners = unit[column_member][candidates.columns[rows]]  # [rows, K, d]
        cosines = torch.bmm(partners, unit[row_member][rows].unsqueeze(2)).squeeze(2)
        (cosine, match), failed = self._certify(cosines, candidates.columns[rows], candidates.bound_rest[rows], k)
        best[0][rows], best[1][rows] = cosine, match
        return rows[failed]

    # ------------------------------------------------------------------ exact matching

    def _screen_everything(self, unit: Tensor, k: int) -> None:
        """Every row's candidates and bound from the bf16 screen, both directions of a pair from one product."""
        self.candidates, error = {}, screen_error(unit.shape[-1])
        for a, b in member_pairs(len(unit)):
            for direction, top in zip([(a, b), (b, a)], screen_both_ways(unit[a], unit[b], k + 1, self.chunk)):
                self.candidates[direction] = _Candidates(
                    top.indices[:, :k].sort(dim=1).values, top.values[:, k] + error
                )

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
            best[1][chunk] = settle_near_ties(chunk_rows, unit[columns], Top(top.values, top.indices))
            candidates.columns[chunk] = top.indices[:, :k].sort(dim=1).values
            candidates.bound_rest[chunk] = top.values[:, k]
