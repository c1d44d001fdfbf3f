import pytest
import torch

from mfr_sae.config import ConfigError, load_config
from mfr_sae.data import make_source
from mfr_sae.data.hierarchy import HierarchicalData
from mfr_sae.seeding import EVAL_STREAM, TRAIN_STREAM


def test_children_fire_only_with_their_parent_at_their_rate_and_the_mean_is_kept():
    data = HierarchicalData(d=16, n_features=80, mean_active=5.0, exponent=0.5, children=3, child_probability=0.4)
    assert data.n_parents == 20
    codes = data.sample_codes(40_000, TRAIN_STREAM, 0)
    fires = codes > 0
    parents, kids = fires[:, :20], fires[:, 20:].view(-1, 20, 3)
    assert not (kids & ~parents.unsqueeze(2)).any()  # never without the parent
    given_parent = kids[parents].float().mean().item()  # a child's rate when its parent fires
    assert given_parent == pytest.approx(0.4, abs=0.01)
    rate = parents.float().mean(0)
    expected = data.probabilities[: data.n_parents]
    assert torch.allclose(rate, expected, atol=4 * (expected * (1 - expected) / 40_000).sqrt().max().item())
    assert fires.sum(1).float().mean().item() == pytest.approx(5.0, rel=0.02)
    # correlated: two children of one parent fire together far more often than independent features would
    both = (kids[:, 0, 0] & kids[:, 0, 1]).float().mean().item()
    alone = kids[:, 0, 0].float().mean().item() * kids[:, 0, 1].float().mean().item()
    assert both > 2 * alone
    magnitudes = codes[fires]
    assert magnitudes.min() >= 0 and magnitudes.max() < 1
    assert magnitudes.mean().item() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(data.sample(100, EVAL_STREAM, 3), data.sample_codes(100, EVAL_STREAM, 3) @ data.features)


def test_the_config_selects_the_hierarchy_and_checks_its_fields():
    base = ["data.firing=hierarchical", "data.d=16", "data.n_features=64", "data.children=3", "data.mean_active=4"]
    source = make_source(load_config(None, base + ["data.stream_seed=2"]).data)
    assert isinstance(source, HierarchicalData) and source.n_parents == 16 and source.stream_seed == 2
    for wrong, message in [
        ("data.n_features=63", "data.n_features"),
        ("data.children=0", "data.children"),
        ("data.child_probability=0", "data.child_probability"),
        ("data.mean_active=100", "data.mean_active"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, wrong])
