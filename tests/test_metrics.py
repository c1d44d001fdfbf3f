import math

import pytest
import torch

from mfr_sae.ensemble import Ensemble
from mfr_sae.metrics import evaluate, ground_truth_metrics, hungarian_match, max_cosine, mmcs, reconstruction_metrics

E = torch.eye(4)


def test_mmcs_of_hand_made_matrices():
    assert mmcs(E, E) == 1.0
    assert abs(mmcs(E[torch.tensor([2, 0, 3, 1])], E) - 1.0) < 1e-6
    a = E[:2]  # e1, e2
    b = torch.stack([E[0], (E[0] + E[1]) / math.sqrt(2)])
    assert abs(mmcs(a, b) - (1 + 1 / math.sqrt(2)) / 2) < 1e-6
    assert abs(mmcs(b, a) - (1 + 1 / math.sqrt(2)) / 2) < 1e-6
    assert abs(mmcs(E[:2], E[2:])) < 1e-6
    assert abs(mmcs(3 * E, E) - 1.0) < 1e-6  # scale does not matter


def test_max_cosine_in_chunks_equals_unchunked():
    a, b = torch.randn(50, 8), torch.randn(30, 8)
    v1, i1 = max_cosine(a, b)
    v2, i2 = max_cosine(a, b, chunk=7)
    torch.testing.assert_close(v1, v2)
    assert torch.equal(i1, i2)


def test_hungarian_match_recovers_a_permutation():
    perm = torch.tensor([3, 1, 0, 2])
    rows, cols, cos = hungarian_match(E, E[perm])
    assert (cos > 0.999).all()
    assert all(perm[c] == r for r, c in zip(rows, cols))


def test_ground_truth_metrics_max_versus_one_to_one():
    truth = E[:2]
    one_latent = ((E[0] + E[1]) / math.sqrt(2)).unsqueeze(0)  # one latent halfway between both
    m = ground_truth_metrics(one_latent, truth, threshold=0.9)
    assert abs(m["gt_mmcs"] - 1 / math.sqrt(2)) < 1e-6  # each true feature finds it
    assert abs(m["gt_mmcs_hungarian"] - 1 / (2 * math.sqrt(2))) < 1e-6  # but only one may match it
    assert m["gt_recovered_frac"] == 0.0
    m = ground_truth_metrics(torch.stack([E[0], E[0], E[3]]), truth, threshold=0.9)
    assert m["gt_recovered_frac"] == 0.5 and abs(m["gt_mmcs"] - 0.5) < 1e-6


def test_reconstruction_metrics_on_an_identity_sae():
    ens = Ensemble(4, 4, [4, 1])
    with torch.no_grad():
        ens.W_enc.copy_(torch.eye(4).expand(2, 4, 4))
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, -1.0]])
    m = reconstruction_metrics(ens, x, batch_size=1)
    # member 0 keeps all positives: error only at the -1; member 1 keeps the largest value only
    assert torch.allclose(m["mse"], torch.tensor([1 / 8, (1 + 1) / 8]))
    assert torch.allclose(m["l0"], torch.tensor([1.5, 1.0]))
    total_var = (x - x.mean(0)).pow(2).sum()
    assert torch.allclose(m["fvu"], torch.tensor([1.0, 2.0]) / total_var)
    assert torch.allclose(m["firing_prob"][1], torch.tensor([0.0, 0.5, 0.5, 0.0]))


def test_evaluate_reports_every_field_per_member():
    ens = Ensemble(4, 6, [2, 3])
    dead = torch.zeros(2, 6, dtype=torch.bool)
    dead[1, :3] = True
    members, firing = evaluate(ens, torch.randn(20, 4), torch.randn(5, 4), dead)
    assert firing.shape == (2, 6) and (firing.sum(1) <= torch.tensor([2.0, 3.0]) + 1e-6).all()
    assert [m["k"] for m in members] == [2, 3]
    assert members[0]["dead_frac"] == 0.0 and members[1]["dead_frac"] == 0.5
    for key in ["mse", "fvu", "l0", "gt_mmcs", "gt_mmcs_hungarian", "gt_recovered_frac"]:
        assert key in members[0]
    assert "gt_mmcs" not in evaluate(ens, torch.randn(20, 4), None, dead)[0][0]


def test_twin_fraction_counts_rows_with_a_near_copy_in_the_same_decoder():
    from mfr_sae.metrics import twin_fraction

    e = torch.eye(6)
    # rows 0/1 are one direction (norms differ), 3/4 are at cosine 0.99995; 2 and 5 stand alone
    decoder = torch.stack([e[0], 2 * e[0], e[1], e[2], e[2] + 0.01 * e[3], e[4]])
    for chunk in (2, 3, 2048):  # twins found across and inside chunks, never a row with itself
        assert twin_fraction(decoder, chunk=chunk) == pytest.approx(4 / 6)
    assert twin_fraction(torch.eye(5)) == 0.0
    # two rows at cosine 0.9: twins for a threshold just below, not just above
    at = torch.stack([e[0], 0.9 * e[0] + (1 - 0.81) ** 0.5 * e[1]])
    assert twin_fraction(at, threshold=0.905) == 0.0 and twin_fraction(at, threshold=0.895) == 1.0


def test_gt_distinct_counts_true_features_that_are_some_latents_best_match():
    e = torch.eye(6)
    truth = e[:4]
    decoder = torch.stack([e[0], e[0] + 0.1 * e[5], e[1], e[1] + 0.2 * e[4], e[2]])  # feature 3 is nobody's
    assert ground_truth_metrics(decoder, truth)["gt_distinct"] == 3
    assert ground_truth_metrics(truth, truth)["gt_distinct"] == 4


def test_silent_frac_counts_latents_that_never_fire_on_the_vectors_and_dead_frac_can_be_unmeasured():
    ens = Ensemble(4, 6, [2, 3])
    with torch.no_grad():  # member 0: latents 3-5 never win its top 2
        ens.b_enc[0, 3:] = -1e4
    dead = torch.zeros(2, 6, dtype=torch.bool)
    members, firing = evaluate(ens, torch.randn(200, 4), None, dead, dead_measured=[True, False])
    for i, member in enumerate(members):
        assert member["silent_frac"] == pytest.approx((firing[i] == 0).float().mean().item())
    assert members[0]["silent_frac"] >= 0.5
    assert members[0]["dead_frac"] == 0.0 and members[1]["dead_frac"] is None
