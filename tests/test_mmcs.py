import pytest
import torch
from torch.nn import functional as F

from mfr_sae.matching import NO_MATCH, match_all
from mfr_sae.mmcs import agreed_fraction, dense_mmcs, matched_mmcs, pairwise_mmcs

E = torch.eye(4)


def fast_mmcs(decoder, mode="max", chunk=2048):
    """Mean pairwise MMCS through the matched (sparse) penalty."""
    return matched_mmcs(decoder, match_all(decoder.detach(), mode, chunk))


def test_mmcs_penalty_on_hand_made_decoders():
    same = torch.stack([E, E[torch.tensor([1, 2, 3, 0])]])  # a permuted copy: MMCS 1
    assert torch.allclose(dense_mmcs(same), torch.ones(1))
    assert fast_mmcs(same).item() == pytest.approx(1.0)
    assert fast_mmcs(same, "hungarian").item() == pytest.approx(1.0)
    # A = {e1, e2}, B = {e1, e1}: A->B max cosines (1, 0), B->A (1, 1): MMCS = (0.5 + 1) / 2
    a = torch.stack([E[0], E[1]])
    b = torch.stack([E[0], E[0]])
    pair = torch.stack([a, b])
    assert torch.allclose(dense_mmcs(pair), torch.tensor([0.75]))
    assert fast_mmcs(pair).item() == pytest.approx(0.75)
    # Hungarian is one-to-one: e1<->e1, e2<->e1 -> cosines (1, 0), MMCS 0.5
    assert fast_mmcs(pair, "hungarian").item() == pytest.approx(0.5)
    # three members: three pairs, in the order (0,1), (0,2), (1,2)
    three = torch.stack([a, b, torch.stack([E[2], E[3]])])
    assert torch.allclose(dense_mmcs(three), torch.tensor([0.75, 0.0, 0.0]))
    assert fast_mmcs(three).item() == pytest.approx(0.25)
    assert pairwise_mmcs(pair)["pairwise_mmcs"] == pytest.approx(0.75)


def test_matched_penalty_equals_the_dense_one_in_value_and_gradient_at_a_matching_step():
    torch.manual_seed(0)
    raw = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    dense = dense_mmcs(F.normalize(raw, dim=-1)).mean()
    (g_dense,) = torch.autograd.grad(dense, raw)
    fast = fast_mmcs(F.normalize(raw, dim=-1), chunk=7)  # chunked matching gives the same arg-max
    (g_fast,) = torch.autograd.grad(fast, raw)
    torch.testing.assert_close(fast, dense)
    torch.testing.assert_close(g_fast, g_dense)
    # from the raw rows: the matched penalty normalises them itself, in value and gradient
    raw_value = matched_mmcs(raw, match_all(F.normalize(raw, dim=-1).detach(), "max", 7))
    torch.testing.assert_close(raw_value, dense)
    torch.testing.assert_close(torch.autograd.grad(raw_value, raw)[0], g_dense)


def _dense_hungarian_mmcs(decoder, min_cosine=-1.0):
    """Reference for the one-to-one form: full similarity matrix, scipy's assignment, matched cosines below
    min_cosine counted 0 (both directions of a one-to-one matching are the same pairs)."""
    from scipy.optimize import linear_sum_assignment

    sims = decoder[0] @ decoder[1].T
    rows, cols = linear_sum_assignment(sims.detach().numpy(), maximize=True)
    matched = sims[rows, cols]
    return matched.masked_fill(matched < min_cosine, 0).mean()


@pytest.mark.parametrize("mode", ["max", "hungarian"])
@pytest.mark.parametrize("min_cosine", [-1.0, 0.3, 0.6])
def test_thresholded_and_one_to_one_penalties_equal_their_dense_reference(mode, min_cosine):
    torch.manual_seed(1)
    base = torch.randn(40, 12, dtype=torch.float64)
    raw = torch.stack([base, base + 0.9 * torch.randn(40, 12, dtype=torch.float64)]).requires_grad_()
    unit = F.normalize(raw, dim=-1)
    dense = dense_mmcs(unit, min_cosine).mean() if mode == "max" else _dense_hungarian_mmcs(unit, min_cosine)
    matches = match_all(unit.detach(), mode, chunk=7, min_cosine=min_cosine)
    fast = matched_mmcs(raw, matches)
    torch.testing.assert_close(fast, dense)
    torch.testing.assert_close(torch.autograd.grad(fast, raw)[0], torch.autograd.grad(dense, raw)[0])
    if min_cosine > 0.5:  # the threshold leaves out some matches but not all: the test sees it act
        assert 0 < (matches == NO_MATCH).float().mean() < 1


def test_agreed_fraction_counts_latents_another_member_has_at_the_cosine():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)
    other = base.clone()
    other[:2] = torch.nn.functional.normalize(torch.randn(2, 64), dim=-1)  # two latents no one else has
    third = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)  # shares nothing
    decoder = torch.stack([base * 3, other, third])  # any norm: cosines
    # member 0 and 1 share 6 latents each; member 2 none: 12 of 24
    assert agreed_fraction(decoder) == pytest.approx(12 / 24)
    assert agreed_fraction(decoder, cosine=-1.0) == 1.0
    assert agreed_fraction(decoder, match_all(decoder, "max")) == pytest.approx(12 / 24)
    assert pairwise_mmcs(decoder)["agreed_frac"] == pytest.approx(0.5)
    assert pairwise_mmcs(decoder[:1])["agreed_frac"] is None
