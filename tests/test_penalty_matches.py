import torch

from mfr_sae.config import load_config
from mfr_sae.matching import changed_fraction, match_all
from mfr_sae.train import Trainer


def test_stale_fraction_of_sparse_matching_is_logged_and_measures_changed_matches(tmp_path, easy_overrides):
    cfg = load_config(
        None,
        easy_overrides
        + [
            "train.n_samples=12000",
            "mfr.enabled=true",
            "mfr.match_every=4",
            "mfr.mmcs=max",
            "mfr.confirm_cosine=1",
            "train.log_every=1",
            "mfr.warmup_steps=0",
            "mfr.beta=1.0",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    batches = trainer.source.batches(cfg.train.batch_size)
    seen = {}
    for step in range(9):
        before = dict(trainer.mfr.matching.matches)
        logs = trainer.train_step(next(batches))
        if "match_stale_frac" in logs:
            seen[step] = logs["match_stale_frac"]
            assert seen[step] == changed_fraction(before, trainer.mfr.matching.matches)
    assert sorted(seen) == [4, 8]  # at each re-matching after the first
    assert all(0 <= v <= 1 for v in seen.values()) and any(v > 0 for v in seen.values())


def test_a_reinitialisation_forces_a_re_matching_at_the_next_penalty(tmp_path, easy_overrides):
    cfg = load_config(
        None,
        easy_overrides
        + [
            "train.n_samples=20000",
            "mfr.enabled=true",
            "mfr.match_every=50",
            "mfr.mmcs=max",
            "mfr.confirm_cosine=1",
            "mfr.beta=1.0",
            "mfr.warmup_steps=0",
            "mfr.reinit_samples=1000",
            "mfr.reinit_window=10",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    with torch.no_grad():  # member 1 cannot use most latents: re-initialised at step 0
        trainer.ensemble.b_enc[1, 32:] = -100.0
    batches = trainer.source.batches(cfg.train.batch_size)
    logs = trainer.train_step(next(batches))
    assert [e["member"] for e in logs["reinit"]] == [1]
    new_weights = match_all(trainer.ensemble.decoder().detach())  # the matches of the re-initialised member
    trainer.train_step(next(batches))  # step 1: not a matching step of match_every=50
    assert torch.equal(trainer.mfr.matching.matches[(0, 1)], new_weights[0])
