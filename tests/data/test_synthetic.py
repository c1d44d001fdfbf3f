import numpy as np
import pytest
import torch

from mfr_sae.data.synthetic import SyntheticData
from mfr_sae.seeding import EVAL_STREAM, TRAIN_STREAM


def test_every_feature_belongs_to_a_group_when_groups_do_not_divide_n():
    data = SyntheticData(d=8, n_features=50, n_groups=12, n_active=3)
    members = torch.cat(data.groups).sort().values
    assert torch.equal(members, torch.arange(50))
    assert sorted({len(g) for g in data.groups}) == [4, 5]


def test_each_sample_has_exactly_n_active_distinct_features_from_one_group():
    data = SyntheticData(d=16, n_features=50, n_groups=12, n_active=4)
    ids, coefficients = data.sample_codes(2000, TRAIN_STREAM, 0)
    assert ids.shape == (2000, 4)
    group_of = torch.empty(50, dtype=torch.long)
    for g, members in enumerate(data.groups):
        group_of[members] = g
    groups = group_of[ids]
    assert (groups == groups[:, :1]).all()
    assert all(len(set(row.tolist())) == 4 for row in ids)
    assert ((coefficients >= 0) & (coefficients < 1)).all()
    # every group gets picked, roughly uniformly
    counts = torch.bincount(groups[:, 0], minlength=12).float()
    assert counts.min() > 2000 / 12 * 0.7


def test_vectors_are_the_coefficient_weighted_sum_of_features():
    data = SyntheticData(d=16, n_features=40, n_groups=4, n_active=3, seed=3)
    ids, coefficients = data.sample_codes(64, TRAIN_STREAM, 5)
    x = data.sample(64, TRAIN_STREAM, 5)
    expected = torch.einsum("bs,bsd->bd", coefficients, data.features[ids])
    torch.testing.assert_close(x, expected)


def test_firing_frequency_matches_weighted_sampling_without_replacement():
    # Strong decay so that the weights matter; reference: numpy's sequential weighted draw.
    n, groups, active, decay = 20, 3, 3, 0.7
    data = SyntheticData(d=8, n_features=n, n_groups=groups, n_active=active, decay=decay, seed=1)
    ids, _ = data.sample_codes(150_000, TRAIN_STREAM, 0)
    freq = torch.bincount(ids.flatten(), minlength=n).numpy() / len(ids)

    rng = np.random.default_rng(0)
    expected = np.zeros(n)
    draws = 20_000
    for g in data.groups:
        g = g.numpy()
        w = decay ** np.arange(len(g))
        for _ in range(draws):
            expected[rng.choice(g, size=active, replace=False, p=w / w.sum())] += 1
    expected /= draws * groups
    np.testing.assert_allclose(freq, expected, atol=0.01)
    # the weights matter: the first feature of a group fires clearly more than the last
    first, last = data.groups[0][0], data.groups[0][-1]
    assert freq[first] > freq[last] + 0.1


def test_supports_are_drawn_per_sample():
    data = SyntheticData()  # the paper's setting: d=256, n=512, 12 groups, 36 active
    ids, _ = data.sample_codes(5000, TRAIN_STREAM, 0)
    supports = {tuple(sorted(row.tolist())) for row in ids}
    assert len(supports) > 0.99 * 5000


def test_stream_is_deterministic_by_seed_and_index():
    a, b = (
        SyntheticData(d=8, n_features=24, n_groups=2, n_active=2, seed=0),
        SyntheticData(d=8, n_features=24, n_groups=2, n_active=2, seed=0),
    )
    assert torch.equal(a.sample(100, TRAIN_STREAM, 3), b.sample(100, TRAIN_STREAM, 3))
    assert not torch.equal(a.sample(100, TRAIN_STREAM, 3), a.sample(100, TRAIN_STREAM, 4))
    assert not torch.equal(a.sample(100, TRAIN_STREAM, 0), a.sample(100, EVAL_STREAM, 0))
    other = SyntheticData(d=8, n_features=24, n_groups=2, n_active=2, seed=1)
    assert not torch.equal(a.features, other.features)
    batches = a.batches(100, start_step=2)
    assert torch.equal(next(batches), a.sample(100, TRAIN_STREAM, 2))
    assert torch.equal(next(batches), a.sample(100, TRAIN_STREAM, 3))


def test_features_are_standard_normal_and_optionally_unit_norm():
    raw = SyntheticData(d=256, n_features=512)
    assert abs(raw.features.mean().item()) < 0.01
    assert abs(raw.features.std().item() - 1) < 0.01
    unit = SyntheticData(d=256, n_features=512, normalize_features=True)
    torch.testing.assert_close(unit.features.norm(dim=1), torch.ones(512))


def test_too_many_active_features_for_a_group_is_an_error():
    with pytest.raises(ValueError, match="smallest group"):
        SyntheticData(d=8, n_features=20, n_groups=5, n_active=5)
