from mfr_sae.config import load_config
from mfr_sae.study_catalogue import BASELINE, CANDIDATES, DEFAULT_SETTING, run_config, settings


def test_the_grid_is_the_baseline_and_every_candidate_each_a_valid_config():
    grid = settings()
    assert grid[0].name == BASELINE and [s.name for s in grid[1:]] == list(CANDIDATES)
    assert len({s.folder for s in grid}) == len(grid) and all("/" not in s.folder for s in grid)
    assert DEFAULT_SETTING in CANDIDATES
    for setting in grid:
        cfg = run_config("learnable", setting, replicate=2, quick=True, split="heldout")
        assert cfg.mfr.enabled == (setting.name != BASELINE)
        assert (cfg.data.seed, cfg.data.stream_seed, cfg.train.seed) == (1, 102, 102)  # held-out: other features, seeds
    tuning = run_config("learnable", grid[1], replicate=2, quick=True)
    assert (tuning.data.seed, tuning.data.stream_seed, tuning.train.seed) == (0, 2, 2)
    test = run_config("learnable", grid[1], replicate=2, quick=True, split="test")  # for judging frozen defaults once
    assert (test.data.seed, test.data.stream_seed, test.train.seed) == (2, 202, 202)


def test_configs_quick_yaml_is_replicate_0_of_the_studys_learnable_default_setting():
    """README's first run claims to be one replicate of the study's learnable setting with the defaults of mfr.*:
    the same config but for logging, checkpoints and the stream seed's spelling (-1: data.seed, which is 0)."""
    setting = next(s for s in settings() if s.name == DEFAULT_SETTING)
    study_cfg = run_config("learnable", setting, replicate=0, quick=False).to_dict()
    quick_cfg = load_config("configs/quick.yaml").to_dict()
    for cfg in (study_cfg, quick_cfg):
        cfg["train"].pop("log_every"), cfg["train"].pop("checkpoint_every"), cfg["data"].pop("stream_seed")
    assert quick_cfg == study_cfg
