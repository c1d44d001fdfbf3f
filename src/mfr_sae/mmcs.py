"""MMCS between the decoders of an ensemble's members (docs/design.md section 4), and its matched form.

MMCS(a, b) = (mean_i max_j cos(A_i, B_j) + mean_j max_i cos(A_i, B_j)) / 2 (`max`), the mean cosine of
a one-to-one Hungarian matching (`hungarian`), of the mutual nearest neighbours (`mnn`: i and j matched
when each is the other's best; the rest count 0), or of the mutual nearest neighbours completed one-to-one
by an assignment among the rows left over (`mnn_hungarian`: a whole one-to-one matching at the price of
`max` and a small assignment), or greedily (`greedy`: matches taken in descending order of cosine among each
row's GREEDY_CANDIDATES best, the few rows left over assigned: no large assignment at any size); a match
whose cosine is below min_cosine (the thresholded form) or above max_cosine (the ceiling: agreement, not
identity) counts 0 and is not pulled, and so does one that would make a twin (`twin_cosine`: the partner
already that close to another row of the row's own member).

The gradient of a max flows only through its arg-max, so the penalty splits in two:
1. matching, without autograd and in chunks: for each row of a its partner in b and for each row of b
   its partner in a (`match_pair`);
2. the mean cosine of the matched rows, differentiable and cheap (O(h d) per pair). All pairs' matches
   form one symmetric sparse matrix L over the N * h decoder rows (`Links`), scaled so that
   sum(D * (L @ D)) is the mean over pairs of MMCS (D: the unit decoder rows; `linked_similarity`).
With the matches of the current weights this is exactly the mean pairwise MMCS (`matched_mmcs`);
`dense_mmcs` is the naive reference (full h x h similarities with autograd).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.kernels import inverse_norms
from mfr_sae.metrics import CHUNK_ROWS, hungarian_matches

Pair = tuple[int, int]  # two members (a, b), a < b
NO_MATCH = -1  # a row without a match (outside [min_cosine, max_cosine], or no mutual best): not linked


def member_pairs(n_members: int) -> list[Pair]:
    """Every pair of members, in the order (0, 1), (0, 2), ..., (1, 2), ..."""
    return [(a, b) for a in range(n_members) for b in range(a + 1, n_members)]


def n_member_pairs(n_members: int) -> int:
    return n_members * (n_members - 1) // 2


# ---------------------------------------------------------------------- 1. matching


# Cosines closer than this (to each other, or to min_cosine) are compared again in float64: fp32 rounding
# of a d = 768 dot product (~1e-6) then cannot decide a match, whichever way the product was blocked.
TIE_TOLERANCE = 1e-4
GREEDY_CANDIDATES = 16  # each row's best partners `greedy` considers: 2-5% of random rows are left for the assignment


@torch.no_grad()
def match_pair(
    a: Tensor,
    b: Tensor,
    mode: str = "max",
    chunk: int = CHUNK_ROWS,
    *,
    min_cosine: float = -1.0,
    max_cosine: float = 1.0,
    twin_cosine: float = 1.0,
) -> Tensor:
    """Matches between unit-norm rows of a and b: [2, h] long, row 0 gives for each row of a its
    partner in b, row 1 for each row of b its partner in a. `max`: the arg-max cosine (both
    directions from one chunked pass); `mnn`: those arg-maxes kept where they are mutual; `mnn_hungarian`:
    those completed by an assignment among the rows left over; `hungarian`: a one-to-one assignment and
    its inverse. A match whose cosine is outside [min_cosine, max_cosine) is
    NO_MATCH (no ceiling at max_cosine >= 1), and so is a match (i, j) where j is at cosine >= twin_cosine
    with a row of a other than i, or i with a row of b other than j: pulling them together would make a twin
    in a member (no guard at twin_cosine >= 1)."""
    bounds = {"min_cosine": min_cosine, "max_cosine": max_cosine, "twin_cosine": twin_cosine}
    return matches_and_best([(a, b)], mode, chunk, best=False, **bounds)[0][0]


@torch.no_grad()
def matches_and_best(
    pairs: Sequence[tuple[Tensor, Tensor]],
    mode: str = "max",
    chunk: int = CHUNK_ROWS,
    *,
    min_cosine: float = -1.0,
    max_cosine: float = 1.0,
    twin_cosine: float = 1.0,
    best: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """`match_pair` of each (a, b), the one-to-one assignments of all pairs solved side by side in threads
    (`metrics.hungarian_matches`); and with `best` each pair's best cosines [2, h]: for each row of a its largest
    cosine with a row of b (row 0), and for each row of b with a row of a (row 1), from the same products (else
    [])."""
    matched: list[tuple[Tensor, Tensor | None]] = []  # each pair's matches and, where known, their cosines
    tops: list[tuple[Top, Top]] = []  # each pair's best cosines both ways (two or more), where taken
    if mode == "greedy":
        for a, b in pairs:
            a_top, b_top = top_both_ways(a, b, min(GREEDY_CANDIDATES, len(a), len(b)), chunk)
            tops.append((a_top, b_top))  # the twin guard reads their first two
            matched.append((greedy_matches(a_top, b_top), None))
        matched = [(matches, None) for matches in assign_the_rest(pairs, [m for m, _ in matched])]
    elif mode != "hungarian":
        for a, b in pairs:
            (a_best, a_to_b, a_top), (b_best, b_to_a, b_top) = best_both_ways(a, b, chunk=chunk)
            tops.append((a_top, b_top))
            if mode != "max":
                a_to_b, b_to_a = mutual_matches(a_to_b, b_to_a)
            matched.append((torch.stack([a_to_b, b_to_a]), torch.stack([a_best, b_best])))
        if mode == "mnn_hungarian":
            matched = [(matches, None) for matches in assign_the_rest(pairs, [m for m, _ in matched])]
    else:
        for (a, _), (rows, cols, _) in zip(pairs, hungarian_matches([(a, b, False) for a, b in pairs])):
            a_to_b = torch.as_tensor(cols[rows.argsort()], device=a.device)
            matched.append((torch.stack([a_to_b, torch.argsort(a_to_b)]), None))  # cosines taken only for a threshold
        if twin_cosine < 1 or best:
            tops = [top_both_ways(a, b, 2, chunk) for a, b in pairs]
    kept = [
        _thresholded(a, b, matches, cosines, min_cosine, max_cosine)
        for (a, b), (matches, cosines) in zip(pairs, matched)
    ]
    bests = [torch.stack([a_top.values[:, 0], b_top.values[:, 0]]) for a_top, b_top in tops] if best else []
    if twin_cosine >= 1:
        return kept, bests
    return [without_twins(matches, a_top, b_top, twin_cosine) for matches, (a_top, b_top) in zip(kept, tops)], bests


def without_twins(matches: Tensor, a_top: Top, b_top: Top, twin_cosine: float) -> Tensor:
    """matches [2, h] of a pair (a, b) with NO_MATCH where a pull would make a twin: a match (i, j) goes when
    j is at cosine >= twin_cosine with a row of a other than i (pulling i onto j would double that row), or i
    with a row of b other than j. a_top, b_top [h, m >= 2]: each row's best cosines in the other member
    (`top_both_ways`); its first two are enough to know a row's best match but one."""

    def best_but(top: Top, rows: Tensor, excluded: Tensor) -> Tensor:
        """For each row its best cosine in the other member other than with `excluded`."""
        first = top.indices[rows, 0] == excluded
        return torch.where(first, top.values[rows, 1], top.values[rows, 0])

    kept = matches.clone()
    for side, (row_top, partner_top) in enumerate([(a_top, b_top), (b_top, a_top)]):
        rows = (matches[side] != NO_MATCH).nonzero().squeeze(1)
        partners = matches[side, rows]
        twin = (best_but(partner_top, partners, rows) >= twin_cosine) | (
            best_but(row_top, rows, partners) >= twin_cosine
        )
        kept[side, rows[twin]] = NO_MATCH
    return kept


def mutual_matches(a_to_b: Tensor, b_to_a: Tensor) -> tuple[Tensor, Tensor]:
    """Each side's best matches [h] kept only where they are mutual (i's best is j and j's best is i), the
    others NO_MATCH: a partial one-to-one matching."""
    a_kept = b_to_a[a_to_b] == torch.arange(len(a_to_b), device=a_to_b.device)
    b_kept = a_to_b[b_to_a] == torch.arange(len(b_to_a), device=b_to_a.device)
    return a_to_b.masked_fill(~a_kept, NO_MATCH), b_to_a.masked_fill(~b_kept, NO_MATCH)


def greedy_matches(a_top: Top, b_top: Top) -> Tensor:
    """The greedy one-to-one matching [2, h] (NO_MATCH where a row has none) on the candidate pairs: each row of
    a with its a_top.indices, each row of b with its b_top.indices, at their cosines. Greedy: pairs taken in
    descending order of cosine, each only if both its rows are still free (equal cosines: the first listed).
    Done in rounds: every pair that is the best left of both its rows is taken at once (the same matching as
    one pair at a time; a few rounds, not h), then the pairs of taken rows dropped."""
    h_a, h_b = len(a_top.indices), len(b_top.indices)
    device = a_top.indices.device
    a_rows = torch.arange(h_a, device=device).repeat_interleave(a_top.indices.shape[1])
    b_rows = torch.arange(h_b, device=device).repeat_interleave(b_top.indices.shape[1])
    rows = torch.cat([a_rows, b_top.indices.flatten()])
    cols = torch.cat([a_top.indices.flatten(), b_rows])
    cosines = torch.cat([a_top.values.flatten(), b_top.values.flatten()]).float()
    order = torch.arange(len(rows), device=device)  # settles equal cosines: the first listed wins
    a_to_b = torch.full((h_a,), NO_MATCH, dtype=torch.long, device=device)
    b_to_a = torch.full((h_b,), NO_MATCH, dtype=torch.long, device=device)
    while len(rows):
        best = (_best_of_each(rows, cosines, order, h_a), _best_of_each(cols, cosines, order, h_b))
        taken = (best[0][rows] == order) & (best[1][cols] == order)
        a_to_b[rows[taken]], b_to_a[cols[taken]] = cols[taken], rows[taken]
        free = (a_to_b[rows] == NO_MATCH) & (b_to_a[cols] == NO_MATCH)
        rows, cols, cosines, order = rows[free], cols[free], cosines[free], order[free]
    return torch.stack([a_to_b, b_to_a])


def _best_of_each(ends: Tensor, cosines: Tensor, order: Tensor, n: int) -> Tensor:
    """For each of n rows, the `order` of its highest-cosine pair among those whose end is that row (the first
    listed among equals)."""
    best = cosines.new_full((n,), -torch.inf).scatter_reduce(0, ends, cosines, "amax")
    top = cosines == best[ends]
    first = order.new_full((n,), torch.iinfo(order.dtype).max)
    return first.scatter_reduce(0, ends[top], order[top], "amin")


def assign_the_rest(pairs: Sequence[tuple[Tensor, Tensor]], mutual: list[Tensor]) -> list[Tensor]:
    """Complete each pair's mutual matches ([2, h], NO_MATCH where a row has none) one-to-one: the rows left
    over on both sides are matched by an assignment among themselves (all pairs side by side in threads), a
    problem as small as the share of rows that are not mutual best matches."""
    left = (
        [(m[0] == NO_MATCH).nonzero().squeeze(1) for m in mutual],
        [(m[1] == NO_MATCH).nonzero().squeeze(1) for m in mutual],
    )
    todo = [i for i, (rows, cols) in enumerate(zip(*left)) if len(rows) and len(cols)]
    solved = hungarian_matches([(pairs[i][0][left[0][i]], pairs[i][1][left[1][i]], False) for i in todo])
    completed = [m.clone() for m in mutual]
    for i, (rows, cols, _) in zip(todo, solved):
        a_rows, b_rows = left[0][i][torch.as_tensor(rows)], left[1][i][torch.as_tensor(cols)]
        completed[i][0, a_rows], completed[i][1, b_rows] = b_rows, a_rows
    return completed


def _thresholded(
    a: Tensor, b: Tensor, matches: Tensor, cosines: Tensor | None, min_cosine: float, max_cosine: float
) -> Tensor:
    """matches [2, h] with those whose cosine (given, or taken here) is below min_cosine, or at least max_cosine
    (below 1), set to NO_MATCH."""
    if min_cosine <= -1 and max_cosine >= 1:
        return matches
    if cosines is None:
        cosines = torch.stack([torch.linalg.vecdot(a, b[matches[0]]), torch.linalg.vecdot(b, a[matches[1]])])
    linked = matches != NO_MATCH
    for side, (rows, partners) in enumerate([(a, b[matches[0]]), (b, a[matches[1]])]):
        if min_cosine > -1:
            linked[side] &= at_least(cosines[side], rows, partners, min_cosine)
        if max_cosine < 1:
            linked[side] &= ~at_least(cosines[side], rows, partners, max_cosine)
    return matches.masked_fill(~linked, NO_MATCH)


def without_marked_pairs(matches: Tensor, a_marked: Tensor, b_marked: Tensor) -> Tensor:
    """matches [2, h] of a pair (a, b) with NO_MATCH where a row and its partner are both marked ([h] bools
    each; e.g. both idle)."""
    kept = matches.clone()
    for side, (rows_marked, partners_marked) in enumerate([(a_marked, b_marked), (b_marked, a_marked)]):
        linked = matches[side] != NO_MATCH
        both = linked & rows_marked & partners_marked[matches[side].clamp(min=0)]
        kept[side, both] = NO_MATCH
    return kept


class Top(NamedTuple):
    """For each row, its k largest cosines (descending) and the rows they are with: [rows, k]."""

    values: Tensor
    indices: Tensor


Best = tuple[Tensor, Tensor, Top]  # for each row: its best cosine, its match (near ties settled), its top k


def best_both_ways(a: Tensor, b: Tensor, k: int = 2, chunk: int = CHUNK_ROWS) -> tuple[Best, Best]:
    """For each row of a its k best cosines with rows of b, and the same for each row of b with a, from one
    chunked pass over a @ b.T; each row's match is its best, near ties settled in float64 (`settle_near_ties`)."""
    a_top, b_top = top_both_ways(a, b, k, chunk)
    return (
        (a_top.values[:, 0], settle_near_ties(a, b, a_top), a_top),
        (b_top.values[:, 0], settle_near_ties(b, a, b_top), b_top),
    )


def top_both_ways(a: Tensor, b: Tensor, k: int, chunk: int = CHUNK_ROWS) -> tuple[Top, Top]:
    """The k largest entries of each row of a @ b.T and of each of its columns, from one chunked pass, in the
    product's dtype (bf16 rows give the screen of `mfr_sae.screen`). The columns' are taken by a top-k in the
    first chunk, then from each later chunk only where an entry beats the column's k-th so far: few entries,
    where a top-k down each chunk's columns cost about as much as its product."""
    a_parts = []
    b_top: Top | None = None
    for start in range(0, len(a), chunk):
        sims = a[start : start + chunk] @ b.T
        a_parts.append(sims.topk(k, dim=1))
        b_top = _columns_top(sims, k) if b_top is None else _merged_columns(b_top, sims, start)
    assert b_top is not None, "top_both_ways needs rows in a"
    a_top = Top(torch.cat([part.values for part in a_parts]), torch.cat([part.indices for part in a_parts]))
    return a_top, b_top


def _columns_top(sims: Tensor, k: int) -> Top:
    """Each column's k largest entries [columns, k] (-inf at row 0 past the rows there are)."""
    top = sims.T.contiguous().topk(min(k, len(sims)), dim=1)  # transposed: a top-k along rows is faster
    missing = k - top.values.shape[1]
    if not missing:
        return Top(top.values, top.indices)
    return Top(
        torch.cat([top.values, top.values.new_full((len(top.values), missing), -torch.inf)], dim=1),
        torch.cat([top.indices, top.indices.new_zeros(len(top.indices), missing)], dim=1),
    )


def _merged_columns(kept: Top, sims: Tensor, start: int) -> Top:
    """Each column's k largest of `kept` [columns, k] and of the chunk `sims` [rows, columns], whose rows are
    numbered from `start`; among equal values the one kept before (the lower row) stays first."""
    rows, columns = (sims > kept.values[:, -1]).nonzero(as_tuple=True)
    return merged_top(kept, columns, sims[rows, columns], rows + start)


def merged_top(kept: Top, owners: Tensor, values: Tensor, indices: Tensor) -> Top:
    """Each owner's k largest of its entries in `kept` [owners, k] and of the new entries (values and indices
    [m], each of the owner `owners` [m] names); among equal values the kept ones first, then the new in their
    order. A running top-k over a stream: pass only the entries above their owner's k-th kept, which are few."""
    if not len(owners):
        return kept
    n_owners, k = kept.values.shape
    device = values.device
    values = torch.cat([kept.values.flatten(), values.to(kept.values.dtype)])
    indices = torch.cat([kept.indices.flatten(), indices])
    owners = torch.cat([torch.arange(n_owners, device=device).repeat_interleave(k), owners])
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(owners[order], stable=True)]  # by owner, each one's entries in descending order
    counts = torch.bincount(owners, minlength=n_owners)
    firsts = counts.cumsum(0) - counts
    picked = order[(firsts.unsqueeze(1) + torch.arange(k, device=device)).flatten()]
    return Top(values[picked].view(n_owners, k), indices[picked].view(n_owners, k))


def settle_near_ties(rows: Tensor, columns: Tensor, top: Top) -> Tensor:
    """Each row's arg-max column (top [rows, m]: its m best cosines, descending, and their columns), with the
    rows whose two best are within TIE_TOLERANCE matched again in float64 (lowest index among equals). The
    float64 arg-max lies within the fp32 rounding of two dot products (2 d 2^-24) below the fp32 best, so
    where the m-th best is below that window it is one of the m; else every column is compared."""
    best = top.indices[:, 0]
    near = ((top.values[:, 0] - top.values[:, 1]) < TIE_TOLERANCE).nonzero().squeeze(1)
    if not len(near):
        return best
    best = best.clone()
    window = max(TIE_TOLERANCE, 2.02 * rows.shape[-1] * 2.0**-24)
    inside = top.values[near, -1] < top.values[near, 0] - window
    few, many = near[inside], near[~inside]
    if len(few):
        indices = top.indices[few]
        exact = torch.bmm(columns[indices].double(), rows[few].double().unsqueeze(2)).squeeze(2)
        tied = exact == exact.amax(dim=1, keepdim=True)
        best[few] = torch.where(tied, indices, len(columns)).amin(dim=1)
    if len(many):
        best[many] = (rows[many].double() @ columns.double().T).argmax(dim=1)
    return best


def at_least(cosine: Tensor, rows: Tensor, partners: Tensor, min_cosine: float) -> Tensor:
    """cosine >= min_cosine for each row and its partner, decided in float64 within TIE_TOLERANCE of it."""
    linked = cosine >= min_cosine
    near = ((cosine - min_cosine).abs() < TIE_TOLERANCE).nonzero().squeeze(1)
    if len(near):
        linked[near] = torch.linalg.vecdot(rows[near].double(), partners[near].double()) >= min_cosine
    return linked


def match_all(
    decoder: Tensor,
    mode: str = "max",
    chunk: int = CHUNK_ROWS,
    *,
    min_cosine: float = -1.0,
    max_cosine: float = 1.0,
    twin_cosine: float = 1.0,
) -> Tensor:
    """Matches of every member pair, in `member_pairs` order: [P, 2, h]."""
    pairs = member_pairs(len(decoder))
    if not pairs:
        return torch.empty(0, 2, decoder.shape[1], dtype=torch.long, device=decoder.device)
    bounds = {"min_cosine": min_cosine, "max_cosine": max_cosine, "twin_cosine": twin_cosine}
    return torch.stack(
        matches_and_best([(decoder[a], decoder[b]) for a, b in pairs], mode, chunk, best=False, **bounds)[0]
    )


def changed_fraction(old: dict[Pair, Tensor], new: dict[Pair, Tensor]) -> float | None:
    """Share of matches that differ between two matchings of the same pairs: how stale the old ones had
    become (None when no pair is in both)."""
    common = [pair for pair in new if pair in old]
    if not common:
        return None
    changed = sum((old[pair].to(new[pair].device) != new[pair]).sum().item() for pair in common)
    return changed / sum(new[pair].numel() for pair in common)


# ---------------------------------------------------------------------- 2. the mean cosine of matched rows


@dataclass
class Links:
    """A block of L, between the decoder rows of some members (L's rows) and those of some members (L's
    columns), in CSR form: where each row's links start, the column each link reaches, and its weight."""

    offsets: Tensor
    targets: Tensor
    weights: Tensor

    def matmul_unit(self, columns: Tensor) -> Tensor:
        """L @ D, D: the column members' decoder rows `columns` [n * h, d] scaled to unit norm (the scale goes
        into the link weights: no normalised copy), as a weighted sum of rows per output row (embedding_bag)."""
        # the norms of all columns in one pass, or of the linked ones only where they are a few (`rows`): a
        # gathered row costs about what norms of four rows in place cost (a copy written, then read)
        few = 4 * len(self.targets) < len(columns)
        target_scale = inverse_norms(columns[self.targets]) if few else inverse_norms(columns)[self.targets]
        return F.embedding_bag(
            self.targets,
            columns,
            offsets=self.offsets,
            per_sample_weights=self.weights.to(columns.dtype) * target_scale,
            mode="sum",
        )

    def rows(self, selected: Tensor) -> Links:
        """The block of these rows of L (indices, ascending), in their order: its product is those rows of L @ D."""
        ends = torch.cat([self.offsets[1:], self.offsets.new_full((1,), len(self.targets))])
        starts = self.offsets[selected]
        counts = ends[selected] - starts
        offsets = counts.cumsum(0) - counts
        links = torch.repeat_interleave(starts - offsets, counts) + torch.arange(
            int(counts.sum()), device=starts.device
        )
        return Links(offsets, self.targets[links], self.weights[links])


def links_between(
    matches: dict[Pair, Tensor],
    row_members: range,
    column_members: range,
    d_sae: int,
    n_pairs: int,
    device: torch.device,
) -> Links:
    """The block of L between the decoder rows of the members `row_members` and those of the members
    `column_members` (each numbered from the block's first row), from the matches ([2, h]) of the member
    pairs (a, b) that join them (other pairs are ignored). L is scaled for the mean over all n_pairs pairs."""
    link_rows, link_columns = [], []
    arange = torch.arange(d_sae, device=device)
    for (a, b), (a_to_b, b_to_a) in matches.items():
        for row_member, column_member, forward, backward in [(a, b, a_to_b, b_to_a), (b, a, b_to_a, a_to_b)]:
            if row_member in row_members and column_member in column_members:
                # row i of the row member links to row forward[i] of the column member; row backward[j] to row j
                row_start = (row_member - row_members.start) * d_sae
                column_start = (column_member - column_members.start) * d_sae
                linked, linked_back = forward != NO_MATCH, backward != NO_MATCH
                link_rows += [arange[linked] + row_start, backward[linked_back] + row_start]
                link_columns += [forward[linked] + column_start, arange[linked_back] + column_start]
    size = (len(row_members) * d_sae, len(column_members) * d_sae)
    n_links = sum(map(len, link_rows))
    if not n_links:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Links(torch.zeros(size[0], dtype=torch.long, device=device), empty, empty.float())
    # each directed match carries 1 / (2 h P); half of it on (i, j), half on (j, i): L is symmetric
    link_weight = 1.0 / (4 * d_sae * n_pairs)
    coo = torch.sparse_coo_tensor(
        torch.stack([torch.cat(link_rows), torch.cat(link_columns)]),
        torch.full((n_links,), link_weight, device=device),
        size,
        check_invariants=False,
    ).coalesce()  # sorted by row, duplicates summed
    rows, targets = coo.indices()
    counts = torch.bincount(rows, minlength=size[0])
    return Links(torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]]), targets, coo.values())


class _LinkedSimilarity(torch.autograd.Function):
    """Per member of the rows W given, sum over its rows r of d_r . (L @ D)_r, with D = W's rows scaled to
    unit norm (no normalised copy) and (L @ D) for these rows given (`product`, a constant: L's columns
    read the rows of all members, on every rank). The gradient reaching row r is that of the whole sum
    over all rows of all members, which for a symmetric L is 2 (L @ D)_r projected off w_r and divided
    by ||w_r||: it reuses the product."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, product: Tensor) -> Tensor:
        rows = weight.reshape(-1, weight.shape[-1])
        inv_norm = inverse_norms(rows)
        dots = torch.linalg.vecdot(rows, product)  # w_r . (L @ D)_r
        ctx.save_for_backward(rows, product, inv_norm, dots)
        ctx.shape = weight.shape
        summed: Tensor = (dots * inv_norm).view(weight.shape[:2]).sum(1)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        rows, product, inv_norm, dots = ctx.saved_tensors
        grad_rows = product.addcmul(rows, (dots * inv_norm.square()).unsqueeze(1), value=-1)
        grad_per_row = grad.repeat_interleave(ctx.shape[1])  # each row takes its member's incoming gradient
        grad_weight: Tensor = grad_rows.mul_((2 * grad_per_row * inv_norm).unsqueeze(1)).view(ctx.shape)
        return grad_weight, None


_linked_similarity: Callable[[Tensor, Tensor], Tensor] = _LinkedSimilarity.apply  # typed: torch's `apply` is not


class _PulledSimilarity(torch.autograd.Function):
    """`_LinkedSimilarity` of some rows of all members' rows W [N, h, d] (flat indices into its N * h rows,
    ascending), summed; the gradient reaching them (the same) is returned sparse, to be added in place into
    the dense gradient of the reconstruction: no dense [N, h, d] buffer for a few rows, and no sum of two."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, rows: Tensor, product: Tensor) -> Tensor:
        picked = weight.detach().flatten(0, 1)[rows]
        summed = _LinkedSimilarity.forward(ctx, picked.unsqueeze(0), product)
        ctx.rows, ctx.whole_shape = rows, weight.shape
        return summed.sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad_rows = _LinkedSimilarity.backward(ctx, grad.reshape(1))[0].squeeze(0)
        n_latents = ctx.whole_shape[1]
        members_and_latents = torch.stack([ctx.rows // n_latents, ctx.rows % n_latents])
        sparse = torch.sparse_coo_tensor(
            members_and_latents, grad_rows, ctx.whole_shape, is_coalesced=True, check_invariants=False
        )
        return sparse, None, None


_pulled_similarity: Callable[[Tensor, Tensor, Tensor], Tensor] = _PulledSimilarity.apply


def linked_similarity(weight: Tensor, product: Tensor) -> Tensor:
    """Each given member's part of sum(D * (L @ D)): [n]; weight [n, h, d]: decoder rows of any norm (one
    rank's members), product [n * h, d]: L @ D for those rows (`Links.matmul_unit` of the rows of all
    members). Differentiable as parts of that one sum: the gradient a row receives is that of the whole
    sum (so sum the parts of all members, with one weight)."""
    return _linked_similarity(weight, product)


def pulled_similarity(weight: Tensor, rows: Tensor, product: Tensor) -> Tensor:
    """The part of sum(D * (L @ D)) of some rows (flat indices into weight [N, h, d]'s N * h rows, ascending):
    a scalar, whose gradient reaching those rows is that of the whole sum, given as a sparse tensor.
    product [rows, d]: L @ D for those rows."""
    return _pulled_similarity(weight, rows, product)


def matched_mmcs(weight: Tensor, matches: Tensor) -> Tensor:
    """Mean over member pairs of MMCS from fixed matches ([P, 2, h], `match_all`), differentiable; weight
    [N, h, d]: decoder rows of any norm (the cosines are taken of their directions). O(P h d)."""
    n, h, d = weight.shape
    links = links_between(dict(zip(member_pairs(n), matches)), range(n), range(n), h, len(matches), weight.device)
    return linked_similarity(weight, links.matmul_unit(weight.detach().reshape(-1, d))).sum()


def dense_mmcs(decoder: Tensor, min_cosine: float = -1.0) -> Tensor:
    """The naive `max` MMCS of every member pair, full similarity matrices with autograd: [P]. Thresholded
    form: a max cosine below min_cosine counts 0."""

    def kept_mean(best: Tensor) -> Tensor:
        return best.masked_fill(best < min_cosine, 0).mean() if min_cosine > -1 else best.mean()

    per_pair = []
    for a, b in member_pairs(len(decoder)):
        sims = decoder[a] @ decoder[b].T
        per_pair.append((kept_mean(sims.max(dim=1).values) + kept_mean(sims.max(dim=0).values)) / 2)
    return torch.stack(per_pair)


@torch.no_grad()
def pairwise_mmcs(decoder: Tensor) -> dict[str, float | None]:
    """Mean over member pairs of MMCS, `max` and `hungarian` variants (None for a single member)."""
    if len(decoder) < 2:
        return {"pairwise_mmcs": None, "pairwise_mmcs_hungarian": None}
    return {
        f"pairwise_mmcs{suffix}": matched_mmcs(decoder, match_all(decoder, mode)).item()
        for suffix, mode in [("", "max"), ("_hungarian", "hungarian")]
    }
