import re
from pathlib import Path

import pytest

from mfr_sae.config import (
    ConfigError,
    MFRConfig,
    RunConfig,
    field_docs,
    help_text,
    load_config,
    load_run_config,
    save_config,
    sections,
)

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_are_the_papers_synthetic_setting():
    cfg = load_config()
    assert (cfg.data.d, cfg.data.n_features, cfg.data.n_groups, cfg.data.n_active, cfg.data.decay) == (
        256,
        512,
        12,
        36,
        0.99,
    )
    assert (cfg.sae.d_sae, cfg.sae.k, cfg.sae.tied, cfg.train.lr) == (512, 36, True, 1e-3)
    assert cfg.ks == [36, 36]


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sae:\n  k: [6, 12]\n  n_members: 2\ntrain:\n  lr: 1e-3\n  n_samples: 2e6\n")
    cfg = load_config(path, ["train.batch_size=500", "sae.tied=false", "train.lr=3e-4"])
    assert cfg.ks == [6, 12] and cfg.train.lr == 3e-4 and cfg.train.n_samples == 2_000_000
    assert cfg.train.batch_size == 500 and cfg.sae.tied is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sae.kk=3"], "unknown key 'sae.kk'"),
        (["model.k=3"], "unknown key 'model.k'"),
        (["sae.k=abc"], "sae.k='abc' is not a valid"),
        (["train.lr=-1"], "train.lr=-1.0: must be > 0"),
        (["sae.k=[3, 4, 5]"], "sae.k has 3 values but sae.n_members=2"),
        (["sae.k=600"], "sae.k=600: must be between 1 and sae.d_sae=512"),
        (["data.n_active=43"], "data.n_active=43: the smallest group has 42 features"),
        (["sae.tied=3"], "sae.tied=3 is not a valid bool"),
        (["train.batch_size"], "expected section.field=value"),
        (["train.n_samples=10", "train.batch_size=100"], "less than one batch"),
        (["data.kind=eeg"], "data.kind=eeg needs data.path"),
        (["data.kind=eeg", "data.path=x", "data.sfreq=80"], "data.sfreq=80.0: must exceed 90 Hz"),
        (["data.kind=eeg", "data.path=x", "data.noise=pink"], "data.noise='pink': must be one of none, white"),
        (["data.kind=eeg", "data.path=x", "data.holdout_fraction=1"], "data.holdout_fraction=1.0: must be in (0, 1)"),
        (["data.kind=eeg", "data.path=x", "data.channels=[]"], "data.channels=[]: must be common, an MNE montage"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae:\n  k: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("sae:\n  k: 3\n  tied: [1, 2\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 4, column 6: not valid YAML \(expected ',' or ']'"):
        load_config(bad)
    bad.write_text("saes:\n  k: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'saes'"):
        load_config(bad)


def test_every_field_has_help_text():
    for section, cls in sections().items():
        docs = field_docs(cls)
        for name in cls.__dataclass_fields__:
            assert docs.get(name), f"{section}.{name} has no docstring"
    assert "data.n_active (int, default 36)" in help_text()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    assert isinstance(load_config(path), RunConfig)


def test_the_paper_mfr_setting_is_spelled_out_in_full():
    from mfr_sae.config import PAPER_MFR, MFRConfig

    # every mfr field but `enabled` is set, so the paper's MFR does not follow changes of the defaults
    assert {o.split("=")[0].split(".")[1] for o in PAPER_MFR} == {f for f in vars(MFRConfig()) if f != "enabled"}
    paper = load_config(None, PAPER_MFR + ["mfr.enabled=true"]).mfr
    assert load_config(CONFIGS / "synthetic-mfr.yaml").mfr == paper


def test_a_saved_run_config_without_a_later_field_reads_as_the_run_was_trained(tmp_path):
    from mfr_sae.config.loading import FIELDS_BEFORE_THEY_EXISTED

    # each later field whose default is not how the runs saved before it behaved
    changed = {name: v for name, v in FIELDS_BEFORE_THEY_EXISTED["mfr"].items() if getattr(MFRConfig(), name) != v}
    assert changed
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["mfr.enabled=true", "mfr.confirm_cosine=0.6"]), path)
    assert load_run_config(path).mfr.confirm_cosine == 0.6  # a field the file holds is kept
    path.write_text(
        "\n".join(line for line in path.read_text().splitlines() if line.split(":")[0].strip() not in changed)
    )
    for name, before in changed.items():
        assert getattr(load_run_config(path).mfr, name) == before  # saved before the field existed
        assert getattr(load_config(path).mfr, name) == getattr(MFRConfig(), name)  # a user's config: the default
