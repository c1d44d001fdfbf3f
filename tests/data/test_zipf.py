import pytest
import torch

from mfr_sae.config import ConfigError, load_config
from mfr_sae.data import make_source
from mfr_sae.data.zipf import ZipfData, zipf_probabilities
from mfr_sae.seeding import EVAL_STREAM, TRAIN_STREAM


def test_probabilities_follow_zipf_sum_to_the_mean_and_are_capped():
    p = zipf_probabilities(1000, 6.0, 1.0)
    assert p.sum().item() == pytest.approx(6.0)
    assert p[0] / p[9] == pytest.approx(10.0)  # p_i proportional to (i + 1)^-1
    capped = zipf_probabilities(10, 5.0, 2.0)  # uncapped, p_0 would be 3.2
    assert capped.max().item() == 1.0 and capped.sum().item() == pytest.approx(5.0)
    assert (capped[1:] <= 1).all() and (capped.diff() <= 0).all()
    assert zipf_probabilities(8, 2.0, 0.0).tolist() == [0.25] * 8  # exponent 0: uniform
    with pytest.raises(ValueError, match="mean_active"):
        zipf_probabilities(8, 9.0, 1.0)


def test_features_fire_independently_at_their_probabilities_with_uniform_magnitudes():
    data = ZipfData(d=16, n_features=64, mean_active=4.0, exponent=0.8, min_magnitude=0.25, seed=3)
    codes = data.sample_codes(50_000, TRAIN_STREAM, 0)
    fires = codes > 0
    expected = data.probabilities
    rate = fires.float().mean(0)
    assert torch.allclose(rate, expected, atol=4 * (expected * (1 - expected) / 50_000).sqrt().max().item())
    assert fires.sum(1).float().mean().item() == pytest.approx(4.0, rel=0.02)
    # independence: the two most common features fire together at the product of their rates
    both = (fires[:, 0] & fires[:, 1]).float().mean().item()
    assert both == pytest.approx((expected[0] * expected[1]).item(), abs=0.01)
    magnitudes = codes[fires]
    assert magnitudes.min() >= 0.25 and magnitudes.max() < 1
    assert magnitudes.mean().item() == pytest.approx(0.625, abs=0.01)  # U[0.25, 1)
    assert torch.allclose(data.features.norm(dim=1), torch.ones(64))


def test_vectors_are_the_weighted_sum_of_features_and_streams_are_seeded():
    data = ZipfData(d=8, n_features=32, mean_active=3.0, seed=1)
    codes = data.sample_codes(100, TRAIN_STREAM, 4)
    torch.testing.assert_close(data.sample(100, TRAIN_STREAM, 4), codes @ data.features)
    assert torch.equal(
        data.sample(100, TRAIN_STREAM, 4),
        ZipfData(d=8, n_features=32, mean_active=3.0, seed=1).sample(100, TRAIN_STREAM, 4),
    )
    assert not torch.equal(data.sample(100, TRAIN_STREAM, 4), data.sample(100, EVAL_STREAM, 4))
    # stream_seed: same true features, other samples
    other = ZipfData(d=8, n_features=32, mean_active=3.0, seed=1, stream_seed=9)
    assert torch.equal(other.features, data.features)
    assert not torch.equal(other.sample(100, TRAIN_STREAM, 4), data.sample(100, TRAIN_STREAM, 4))


def test_the_config_selects_the_generator_and_checks_its_fields():
    cfg = load_config(
        None,
        [
            "data.firing=independent",
            "data.d=16",
            "data.n_features=40",
            "data.mean_active=3",
            "data.stream_seed=5",
            "data.normalize_features=true",
        ],
    )
    source = make_source(cfg.data)
    assert isinstance(source, ZipfData) and source.stream_seed == 5 and source.ground_truth.shape == (40, 16)
    for wrong, message in [
        ("data.firing=poisson", "data.firing"),
        ("data.mean_active=0", "data.mean_active"),
        ("data.zipf_exponent=-1", "data.zipf_exponent"),
        ("data.min_magnitude=1", "data.min_magnitude"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["data.firing=independent", wrong])
    # n_active larger than a group is only an error for the paper's grouped firing
    assert load_config(None, ["data.firing=independent", "data.n_active=500"])
