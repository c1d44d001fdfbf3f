import pytest
import torch
from torch.nn import functional as F

from mfr_sae.matching import (
    GREEDY_CANDIDATES,
    NO_MATCH,
    greedy_matches,
    match_all,
    match_pair,
    matches_and_best,
    member_pairs,
)
from mfr_sae.mmcs import matched_mmcs
from mfr_sae.search import top_both_ways


@pytest.mark.parametrize("min_cosine", [-1.0, 0.3])
def test_all_pairs_matched_at_once_equal_pairs_matched_one_by_one(min_cosine):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(48, 16, generator=gen)
    decoder = F.normalize(base + 0.7 * torch.randn(4, 48, 16, generator=gen), dim=-1)
    for mode in ["max", "hungarian"]:
        together = match_all(decoder, mode, min_cosine=min_cosine)
        for matches, (a, b) in zip(together, member_pairs(4)):
            assert torch.equal(matches, match_pair(decoder[a], decoder[b], mode, min_cosine=min_cosine))
        assert (together == NO_MATCH).any() == (min_cosine > -1)


def dense_mutual_reference(a, b):
    """Mutual nearest neighbours from the full similarity matrix, in float64: [2, h] with NO_MATCH."""
    sims = a.double() @ b.double().T
    a_best, b_best = sims.argmax(1), sims.argmax(0)
    a_to_b = torch.where(b_best[a_best] == torch.arange(len(a)), a_best, NO_MATCH)
    b_to_a = torch.where(a_best[b_best] == torch.arange(len(b)), b_best, NO_MATCH)
    return torch.stack([a_to_b, b_to_a])


@pytest.mark.parametrize("shared", [0.0, 0.9])
def test_mutual_nearest_neighbours_equal_the_dense_reference_and_are_one_to_one(shared):
    torch.manual_seed(0)
    base = F.normalize(torch.randn(300, 24), dim=-1)  # shared=0.9: two decoders that share most features
    a = F.normalize(base + (1 - shared) * torch.randn(300, 24), dim=-1)
    b = F.normalize(base[torch.randperm(300)] + 0.3 * torch.randn(300, 24), dim=-1)
    matches = match_pair(a, b, "mnn", chunk=64)
    assert torch.equal(matches, dense_mutual_reference(a, b))
    a_to_b, b_to_a = matches
    linked = a_to_b != NO_MATCH
    assert 0 < linked.sum() < 300  # partial: random rows leave some without a mutual best
    assert torch.equal(b_to_a[a_to_b[linked]], torch.arange(300)[linked])  # each link is mutual
    assert (b_to_a != NO_MATCH).sum() == linked.sum()
    # its MMCS counts the unmatched as 0: the mean of matched cosines times the matched share
    cosines = torch.linalg.vecdot(a[linked], b[a_to_b[linked]])
    value = matched_mmcs(torch.stack([a, b]), matches.unsqueeze(0)).item()
    assert value == pytest.approx(cosines.sum().item() / 300, rel=1e-5)


@pytest.mark.parametrize("mode", ["max", "mnn", "mnn_hungarian", "hungarian", "greedy"])
def test_a_ceiling_unlinks_matches_at_or_above_it_and_keeps_the_others(mode):
    torch.manual_seed(1)
    a = F.normalize(torch.randn(60, 16), dim=-1)
    b = a.clone()
    b[30:] = F.normalize(a[30:] + 0.8 * torch.randn(30, 16), dim=-1)  # half copies (cosine 1), half not
    free, capped = match_pair(a, b, mode), match_pair(a, b, mode, max_cosine=0.95)
    for side, (rows, partners) in enumerate([(a, b), (b, a)]):
        linked = free[side] != NO_MATCH
        cosine = torch.linalg.vecdot(rows[linked], partners[free[side][linked]])
        expected = free[side].clone()
        expected[linked.nonzero().squeeze(1)[cosine >= 0.95]] = NO_MATCH
        assert torch.equal(capped[side], expected)
    assert (capped[0, :30] == NO_MATCH).all()  # the copies are not pulled any further
    assert (capped != NO_MATCH).any()
    # the ceiling and the floor together: only matches inside [min_cosine, max_cosine) stay
    both = match_pair(a, b, mode, min_cosine=0.3, max_cosine=0.95)
    kept = both[0] != NO_MATCH
    cosine = torch.linalg.vecdot(a[kept], b[both[0][kept]])
    assert (cosine >= 0.3).all() and (cosine < 0.95).all()


@pytest.mark.parametrize("mode", ["max", "mnn", "mnn_hungarian", "hungarian", "greedy"])
def test_the_twin_guard_unlinks_exactly_the_matches_whose_pull_would_make_a_twin(mode):
    torch.manual_seed(3)
    a = F.normalize(torch.randn(80, 64), dim=-1)
    a[60:70] = F.normalize(a[:10] + 0.01 * torch.randn(10, 64), dim=-1)  # twins in a
    b = F.normalize(a + 0.1 * torch.randn(80, 64), dim=-1)
    b[:10] = F.normalize(a[:10] + 0.01 * torch.randn(10, 64), dim=-1)  # each close to both of a's twins
    free, guarded = match_pair(a, b, mode), match_pair(a, b, mode, twin_cosine=0.9)
    sims = a.double() @ b.double().T  # the dense reference: every cosine
    for side, cosines in enumerate([sims, sims.T]):
        rows = (free[side] != NO_MATCH).nonzero().squeeze(1)
        partners = free[side, rows]
        each = torch.arange(len(rows))
        partner_side = cosines.T[partners]  # each partner's cosines with the rows' member...
        partner_side[each, rows] = -2  # ...but the row it is matched to
        row_side = cosines[rows]
        row_side[each, partners] = -2
        twin = (partner_side.amax(1) >= 0.9) | (row_side.amax(1) >= 0.9)
        expected = free[side].clone()
        expected[rows[twin]] = NO_MATCH
        assert torch.equal(guarded[side], expected)
    assert (guarded[1, :10] == NO_MATCH).all()  # whichever of a's twins b's rows 0-9 match, the other is close
    assert (guarded[:, 20:50] != NO_MATCH).all()  # rows far from any twin keep their matches


def dense_greedy(sims, allowed):
    """The greedy matching, one pair at a time: pairs (allowed [h, h] bools) in descending order of similarity,
    taken while both rows are free; [2, h] with NO_MATCH for rows it leaves."""
    h = len(sims)
    a_to_b, b_to_a = torch.full((h,), NO_MATCH), torch.full((h,), NO_MATCH)
    flat = torch.where(allowed, sims, -torch.inf).flatten()
    for index in torch.argsort(flat, descending=True, stable=True).tolist():
        i, j = divmod(index, h)
        if flat[index] == -torch.inf:
            break
        if a_to_b[i] == NO_MATCH and b_to_a[j] == NO_MATCH:
            a_to_b[i], b_to_a[j] = j, i
    return torch.stack([a_to_b, b_to_a])


def test_greedy_equals_taking_pairs_one_at_a_time_in_descending_cosine():
    torch.manual_seed(4)
    small = F.normalize(torch.randn(2, GREEDY_CANDIDATES - 4, 8), dim=-1)  # fewer rows than candidates: all pairs
    sims = small[0] @ small[1].T
    assert torch.equal(match_pair(small[0], small[1], "greedy"), dense_greedy(sims, torch.ones_like(sims).bool()))
    # more rows than candidates: the same on the pairs that are some row's candidates, whichever side
    a, b = F.normalize(torch.randn(2, 300, 16), dim=-1)
    a_top, b_top = top_both_ways(a, b, GREEDY_CANDIDATES, chunk=64)
    allowed = torch.zeros(300, 300, dtype=torch.bool)
    allowed[torch.arange(300).unsqueeze(1), a_top.indices] = True
    allowed[b_top.indices, torch.arange(300).unsqueeze(1)] = True
    partial = greedy_matches(a_top, b_top)
    assert torch.equal(partial, dense_greedy(a @ b.T, allowed))
    left = partial[0] == NO_MATCH
    assert 0 < left.sum() < 30  # a few rows whose candidates were all taken
    # match_pair completes it one-to-one: the greedy pairs kept, the rows left over assigned among themselves
    whole = match_pair(a, b, "greedy", chunk=64)
    assert torch.equal(whole[0][~left], partial[0][~left])
    assert torch.equal(torch.sort(whole[0]).values, torch.arange(300)) and torch.equal(
        whole[1][whole[0]], torch.arange(300)
    )
    # a permuted copy: every row takes its own copy in the first round
    perm = torch.randperm(300)
    assert torch.equal(match_pair(a, a[perm], "greedy")[0], torch.argsort(perm))


def test_mnn_hungarian_keeps_the_mutual_pairs_and_assigns_the_rest_optimally_one_to_one():
    from scipy.optimize import linear_sum_assignment

    torch.manual_seed(2)
    base = F.normalize(torch.randn(200, 24), dim=-1)
    a = F.normalize(base + 0.5 * torch.randn(200, 24), dim=-1)
    b = F.normalize(base[torch.randperm(200)] + 0.5 * torch.randn(200, 24), dim=-1)
    mutual, whole = match_pair(a, b, "mnn"), match_pair(a, b, "mnn_hungarian")
    a_to_b, b_to_a = whole
    assert torch.equal(torch.sort(a_to_b).values, torch.arange(200))  # a whole one-to-one matching
    assert torch.equal(b_to_a[a_to_b], torch.arange(200))
    kept = mutual[0] != NO_MATCH
    assert 0 < kept.sum() < 200 and torch.equal(a_to_b[kept], mutual[0][kept])
    rest_a, rest_b = (~kept).nonzero().squeeze(1), (mutual[1] == NO_MATCH).nonzero().squeeze(1)
    sims = (a[rest_a].double() @ b[rest_b].double().T).numpy()
    rows, cols = linear_sum_assignment(sims, maximize=True)
    assert torch.equal(a_to_b[rest_a[rows]], rest_b[cols])  # the leftovers' optimal assignment
    # a permuted copy: every row is a mutual best match, nothing left to assign
    perm = torch.randperm(200)
    assert torch.equal(match_pair(a, a[perm], "mnn_hungarian")[0], torch.argsort(perm))


@pytest.mark.parametrize("mode", ["max", "mnn", "mnn_hungarian", "hungarian", "greedy"])
def test_best_cosines_come_with_the_matches_and_equal_the_dense_maxima(mode):
    torch.manual_seed(3)
    a, b = F.normalize(torch.randn(2, 50, 12), dim=-1)
    bounds = {"min_cosine": 0.1, "max_cosine": 0.8, "twin_cosine": 0.9}
    (matches,), (best,) = matches_and_best([(a, b)], mode, chunk=16, **bounds)
    assert torch.equal(matches, match_pair(a, b, mode, chunk=16, **bounds))  # the same matches as without
    sims = a @ b.T
    torch.testing.assert_close(best, torch.stack([sims.max(1).values, sims.max(0).values]))
    assert matches_and_best([(a, b)], mode, best=False)[1] == []
