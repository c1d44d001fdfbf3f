from mfr_sae.config import DATA_KINDS, FIRING_KINDS, load_config
from mfr_sae.data import SOURCES, SYNTHETIC_FIRINGS, HierarchicalData, SyntheticData, ZipfData, make_source


def test_every_name_the_config_accepts_has_a_source_and_each_firing_builds_its_own():
    assert set(SOURCES) == set(DATA_KINDS) and set(SYNTHETIC_FIRINGS) == set(FIRING_KINDS)
    common = ["data.d=8", "data.n_features=32", "data.mean_active=2", "data.n_groups=4", "data.n_active=3"]
    built = {
        firing: make_source(load_config(None, [*common, f"data.firing={firing}", "data.children=3"]).data)
        for firing in FIRING_KINDS
    }
    assert type(built["groups"]) is SyntheticData
    assert type(built["independent"]) is ZipfData
    assert type(built["hierarchical"]) is HierarchicalData
