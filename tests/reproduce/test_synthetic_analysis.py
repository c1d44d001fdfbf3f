import numpy as np
import pytest
import torch

from mfr_sae.reproduce.synthetic_analysis import ACROSS_KEYS, AcrossAgreement
from mfr_sae.stats import interchangeable_arms


def _runs(n_seeds=2, members=2, h=8, d=4):
    generator = torch.Generator().manual_seed(0)
    return {
        m: [{"decoder": torch.randn(members, h, d, generator=generator)} for _ in range(n_seeds)]
        for m in ("mfr", "baseline")
    }


def test_across_agreement_matches_member_m_with_member_m_and_computes_each_pair_once():
    runs = _runs()
    agreement = AcrossAgreement(runs, threshold=0.7)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    runs["mfr"][1]["decoder"] = runs["mfr"][0]["decoder"][:, order]
    same = agreement(("mfr", 0), ("mfr", 1))  # the same latents, in another order
    assert same["across_pw_mcc"] == pytest.approx(1.0) and same["across_shared_frac"] == 1.0
    assert agreement(("mfr", 1), ("mfr", 0)) is same and len(agreement.cache) == 1
    swapped = AcrossAgreement({"mfr": [runs["mfr"][0], {"decoder": runs["mfr"][0]["decoder"].flip(0)}]}, 0.7)
    assert swapped(("mfr", 0), ("mfr", 1))["across_pw_mcc"] < 0.99  # member 0 is never matched with member 1
    assert agreement.per_seed_pair("mfr") == {key: [same[key]] for key in ACROSS_KEYS}


def test_paired_similarity_leaves_out_the_two_ensembles_of_one_seed():
    agreement = AcrossAgreement(_runs(n_seeds=3), threshold=0.7)
    similarity = agreement.paired_similarity("mfr", "baseline", "across_pw_mcc")
    assert similarity.shape == (6, 6) and np.array_equal(similarity, similarity.T, equal_nan=True)
    never = {(i, i) for i in range(6)} | {(r, r + 3) for r in range(3)} | {(r + 3, r) for r in range(3)}
    for i in range(6):
        for j in range(6):
            assert np.isnan(similarity[i, j]) == ((i, j) in never)
    assert similarity[1, 5] == agreement(("mfr", 1), ("baseline", 2))["across_pw_mcc"]


def test_two_methods_with_the_same_ensembles_agree_alike_bit_for_bit_so_their_arms_test_as_identical():
    # reinit's runs are the baseline's when no reinitialisation fires; the matching's float32 sums depend on
    # which decoder comes first, so each pair is computed in one order (lower seed first) whoever asks
    runs = _runs(n_seeds=3, h=96, d=24)
    runs["reinit"] = [{"decoder": r["decoder"].clone()} for r in runs["baseline"]]
    agreement = AcrossAgreement(runs, threshold=0.7)
    asked_the_other_way = AcrossAgreement(runs, threshold=0.7)
    for r, j in [(0, 1), (0, 2), (1, 2)]:
        assert agreement(("mfr", r), ("baseline", j)) == asked_the_other_way(("baseline", j), ("mfr", r))
    for key in ACROSS_KEYS:
        assert interchangeable_arms(agreement.paired_similarity("reinit", "baseline", key), 3)
        assert not interchangeable_arms(agreement.paired_similarity("mfr", "baseline", key), 3)
