"""Matchings between the decoder rows of two members (docs/design.md section 4), without autograd and in chunks:
for each row of a its partner in b and for each row of b its partner in a (`match_pair`; every member pair:
`match_all`).

`max`: each row's arg-max cosine; `hungarian`: a one-to-one assignment; `mnn`: the mutual nearest neighbours (i
and j matched when each is the other's best; the rest count 0); `mnn_hungarian`: the mutual nearest neighbours
completed one-to-one by an assignment among the rows left over (a whole one-to-one matching at the price of
`max` and a small assignment); `greedy`: matches taken in descending order of cosine among each row's
GREEDY_CANDIDATES best, the few rows left over assigned (no large assignment at any size). A match whose cosine
is below min_cosine (the thresholded form) or above max_cosine (the ceiling: agreement, not identity) counts 0
and is not pulled, and so does one that would make a twin (`twin_cosine`: the partner already that close to
another row of the row's own member). The matched rows' mean cosine and its gradient: links.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mfr_sae.metrics import CHUNK_ROWS, hungarian_matches
from mfr_sae.search import Top, at_least, best_both_ways, top_both_ways

Pair = tuple[int, int]  # two members (a, b), a < b
NO_MATCH = -1  # a row without a match (outside [min_cosine, max_cosine], or no mutual best): not linked


def member_pairs(n_members: int) -> list[Pair]:
    """Every pair of members, in the order (0, 1), (0, 2), ..., (1, 2), ..."""
    return [(a, b) for a in range(n_members) for b in range(a + 1, n_members)]


def n_member_pairs(n_members: int) -> int:
    return n_members * (n_members - 1) // 2


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
