import numpy as np
import pytest
import torch

from mfr_sae.reproduce.synthetic_analysis import ACROSS_KEYS, AcrossAgreement


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
