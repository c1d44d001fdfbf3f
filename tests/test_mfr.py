import json
import math

import pytest
import torch
from torch.nn import functional as F

from mfr_sae.config import PAPER_MFR, ConfigError, MFRConfig, load_config
from mfr_sae.mfr import (NO_MATCH, MutualRegularizer, changed_fraction, dense_mmcs, match_all, matched_mmcs,
                         pairwise_mmcs, reinit_metric, warmup_weight)
from mfr_sae.train import Trainer, train

E = torch.eye(4)


def fast_mmcs(decoder, mode="max", chunk=2048):
    """Mean pairwise MMCS through the matched (sparse) penalty."""
    return matched_mmcs(decoder, match_all(decoder.detach(), mode, chunk))


def test_mmcs_penalty_on_hand_made_decoders():
    same = torch.stack([E, E[torch.tensor([1, 2, 3, 0])]])  # a permuted copy: MMCS 1
    assert torch.allclose(dense_mmcs(same), torch.ones(1))
    assert fast_mmcs(same).item() == pytest.approx(1.0)
    assert fast_mmcs(same, "hungarian").item() == pytest.approx(1.0)
    # A = {e1, e2}, B = {e1, e1}: A->B max cosines (1, 0), B->A (1, 1): MMCS = (0.5 + 1) / 2
    a = torch.stack([E[0], E[1]])
    b = torch.stack([E[0], E[0]])
    pair = torch.stack([a, b])
    assert torch.allclose(dense_mmcs(pair), torch.tensor([0.75]))
    assert fast_mmcs(pair).item() == pytest.approx(0.75)
    # Hungarian is one-to-one: e1<->e1, e2<->e1 -> cosines (1, 0), MMCS 0.5
    assert fast_mmcs(pair, "hungarian").item() == pytest.approx(0.5)
    # three members: three pairs, in the order (0,1), (0,2), (1,2)
    three = torch.stack([a, b, torch.stack([E[2], E[3]])])
    assert torch.allclose(dense_mmcs(three), torch.tensor([0.75, 0.0, 0.0]))
    assert fast_mmcs(three).item() == pytest.approx(0.25)
    assert pairwise_mmcs(pair)["pairwise_mmcs"] == pytest.approx(0.75)


def test_matched_penalty_equals_the_dense_one_in_value_and_gradient_at_a_matching_step():
    torch.manual_seed(0)
    raw = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    dense = dense_mmcs(F.normalize(raw, dim=-1)).mean()
    (g_dense,) = torch.autograd.grad(dense, raw)
    fast = fast_mmcs(F.normalize(raw, dim=-1), chunk=7)  # chunked matching gives the same arg-max
    (g_fast,) = torch.autograd.grad(fast, raw)
    torch.testing.assert_close(fast, dense)
    torch.testing.assert_close(g_fast, g_dense)
    # from the raw rows: the matched penalty normalises them itself, in value and gradient
    raw_value = matched_mmcs(raw, match_all(F.normalize(raw, dim=-1).detach(), "max", 7))
    torch.testing.assert_close(raw_value, dense)
    torch.testing.assert_close(torch.autograd.grad(raw_value, raw)[0], g_dense)


def test_warmup_is_a_cosine_ramp():
    assert warmup_weight(0, 100) == 0.0
    assert warmup_weight(50, 100) == pytest.approx(0.5)
    assert warmup_weight(25, 100) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert warmup_weight(100, 100) == 1.0 and warmup_weight(1000, 100) == 1.0
    assert warmup_weight(0, 0) == 1.0


def test_auto_beta_makes_the_penalty_equal_the_loss_at_the_start():
    reg = MutualRegularizer(MFRConfig(enabled=True, beta="auto", mmcs="max", warmup_steps=0), [2, 2])
    decoder = F.normalize(torch.randn(2, 30, 8), dim=-1)
    penalty, logs = reg.penalty(decoder, 0, lambda: 0.37)
    assert penalty.item() == pytest.approx(0.37, rel=1e-5)
    assert reg.beta == pytest.approx(0.37 / (1 - logs["pairwise_mmcs"]), rel=1e-5)
    fixed = MutualRegularizer(MFRConfig(enabled=True, beta=2.0, warmup_steps=100), [2, 2])
    penalty, logs = fixed.penalty(decoder, 50, lambda: 0.37)
    assert logs["penalty_weight"] == pytest.approx(1.0)  # beta * w(50) = 2 * 0.5
    assert penalty.item() == pytest.approx(1 - logs["pairwise_mmcs"], rel=1e-5)


def test_auto_beta_refuses_identical_members():
    reg = MutualRegularizer(MFRConfig(enabled=True), [2, 2])
    decoder = F.normalize(torch.randn(1, 30, 8), dim=-1).expand(2, 30, 8)
    with pytest.raises(ConfigError, match="members start identical"):
        reg.penalty(decoder, 0, lambda: 1.0)


def test_reinit_metric_by_hand():
    # k/h = 0.25; firing probabilities (0.25, 0.25, 0.5, 0) -> deviations (0, 0, 1, 1) -> M = 0.5
    p = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    assert reinit_metric(p, [1]).item() == pytest.approx(0.5)
    assert reinit_metric(torch.full((1, 8), 0.25), [2]).item() == 0.0  # t follows k and h


@pytest.mark.parametrize("plant", [False, True])
def test_a_planted_bad_initialisation_triggers_reinit_and_a_good_one_does_not(tmp_path, easy_overrides, plant):
    cfg = load_config(None, easy_overrides + ["train.n_samples=20000", "mfr.enabled=true",
                                              "mfr.reinit_samples=1000", "mfr.reinit_window=10"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    if plant:  # member 1: three quarters of its latents can never win the TopK
        with torch.no_grad():
            trainer.ensemble.b_enc[1, 32:] = -100.0
    results = trainer.fit()
    events = results["reinit_events"]
    if plant:
        assert [e["member"] for e in events] == [1]
        assert events[0]["step"] == 0 and events[0]["metric"] > 2.5
        assert (trainer.ensemble.b_enc[1, 32:] > -50).all()  # the plant is gone
        logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert any("reinit" in r for r in logged)
    else:
        assert events == []


def test_reinit_resets_the_member_and_its_optimizer_moments(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=5000", "mfr.enabled=true"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.train_step(next(trainer.source.batches(1000)))
    trainer.mfr.attempts[0] = 1
    trainer._reinit_member(0)
    fresh = trainer.ensemble.__class__(32, 128, [3, 3], seed=0)
    fresh.reset_member(0, attempt=1)
    assert torch.equal(trainer.ensemble.W_enc[0], fresh.W_enc[0])
    state = trainer.optimizer.state[trainer.ensemble.W_enc]
    assert (state["exp_avg"][0] == 0).all() and (state["exp_avg"][1] != 0).any()


def test_with_match_every_1_training_follows_the_dense_penalty(tmp_path, easy_overrides):
    base = easy_overrides + PAPER_MFR + ["train.n_samples=30000", "mfr.enabled=true", "mfr.warmup_steps=5"]
    runs = {}
    for every in (0, 1):
        train(load_config(None, base + [f"mfr.match_every={every}"]), tmp_path / str(every), progress=False)
        runs[every] = [json.loads(line) for line in (tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()]
    from mfr_sae import load
    dense, fast = load(tmp_path / "0"), load(tmp_path / "1")
    torch.testing.assert_close(fast.W_enc, dense.W_enc, atol=1e-5, rtol=1e-4)
    loss = lambda r: [x["loss"] for x in r if "loss" in x]  # noqa: E731
    assert loss(runs[1]) == pytest.approx(loss(runs[0]), rel=1e-5)


def test_mfr_pulls_members_together(tmp_path, easy_overrides):
    overrides = easy_overrides + ["train.n_samples=100000", "sae.n_members=3"]
    base = train(load_config(None, overrides), tmp_path / "base", progress=False)
    mfr = train(load_config(None, overrides + ["mfr.enabled=true", "mfr.beta=1.0"]), tmp_path / "mfr",
                progress=False)
    assert base["beta"] is None and mfr["beta"] == 1.0
    assert mfr["pairwise_mmcs"] > base["pairwise_mmcs"]


def test_resume_of_an_mfr_run_with_sparse_matching_is_exact(tmp_path, easy_overrides):
    overrides = easy_overrides + ["train.n_samples=40000", "mfr.enabled=true", "mfr.match_every=7",
                                  "mfr.reinit_samples=3000", "train.checkpoint_every=15"]
    train(load_config(None, overrides), tmp_path / "full", progress=False)
    trainer = Trainer(load_config(None, overrides), tmp_path / "cut", progress=False)
    trainer.cfg.train.n_samples = 25000  # stop early, after the checkpoint at step 15
    trainer.fit()
    (tmp_path / "cut" / "results.json").unlink()
    from mfr_sae import load, resume
    resume(tmp_path / "cut", progress=False)
    for name, p in load(tmp_path / "full").named_parameters():
        assert torch.equal(p, getattr(load(tmp_path / "cut"), name)), name


def _dense_hungarian_mmcs(decoder, min_cosine=-1.0):
    """Reference for the one-to-one form: full similarity matrix, scipy's assignment, matched cosines below
    min_cosine counted 0 (both directions of a one-to-one matching are the same pairs)."""
    from scipy.optimize import linear_sum_assignment

    sims = decoder[0] @ decoder[1].T
    rows, cols = linear_sum_assignment(sims.detach().numpy(), maximize=True)
    matched = sims[rows, cols]
    return matched.masked_fill(matched < min_cosine, 0).mean()


@pytest.mark.parametrize("mode", ["max", "hungarian"])
@pytest.mark.parametrize("min_cosine", [-1.0, 0.3, 0.6])
def test_thresholded_and_one_to_one_penalties_equal_their_dense_reference(mode, min_cosine):
    torch.manual_seed(1)
    base = torch.randn(40, 12, dtype=torch.float64)
    raw = torch.stack([base, base + 0.9 * torch.randn(40, 12, dtype=torch.float64)]).requires_grad_()
    unit = F.normalize(raw, dim=-1)
    dense = dense_mmcs(unit, min_cosine).mean() if mode == "max" else _dense_hungarian_mmcs(unit, min_cosine)
    matches = match_all(unit.detach(), mode, chunk=7, min_cosine=min_cosine)
    fast = matched_mmcs(raw, matches)
    torch.testing.assert_close(fast, dense)
    torch.testing.assert_close(torch.autograd.grad(fast, raw)[0], torch.autograd.grad(dense, raw)[0])
    if min_cosine > 0.5:  # the threshold leaves out some matches but not all: the test sees it act
        assert 0 < (matches == NO_MATCH).float().mean() < 1


def test_beta_relative_to_auto_scales_the_auto_value():
    decoder = F.normalize(torch.randn(2, 30, 8), dim=-1)
    betas = {}
    for beta in ("auto", "0.02*auto", 0.5):
        reg = MutualRegularizer(MFRConfig(enabled=True, beta=beta, warmup_steps=0), [2, 2])
        reg.penalty(decoder, 0, lambda: 0.37)
        betas[beta] = reg.beta
    assert betas["0.02*auto"] == pytest.approx(0.02 * betas["auto"])
    assert betas[0.5] == 0.5
    assert not MutualRegularizer(MFRConfig(enabled=True, beta="0*auto"), [2, 2]).penalty_on
    for wrong in ("2*aut", "-1*auto", "auto*2", -0.5):
        with pytest.raises(ConfigError, match="mfr.beta"):
            load_config(None, [f"mfr.beta={wrong}"])
    assert load_config(None, ["mfr.beta=1e-3*auto"]).mfr.beta == "1e-3*auto"


def test_stale_fraction_of_sparse_matching_is_logged_and_measures_changed_matches(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=12000", "mfr.enabled=true", "mfr.match_every=4", "mfr.mmcs=max",
                                              "train.log_every=1", "mfr.warmup_steps=0", "mfr.beta=1.0"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    batches = trainer.source.batches(cfg.train.batch_size)
    seen = {}
    for step in range(9):
        before = dict(trainer.mfr.matches)
        logs = trainer.train_step(next(batches))
        if "match_stale_frac" in logs:
            seen[step] = logs["match_stale_frac"]
            assert seen[step] == changed_fraction(before, trainer.mfr.matches)
    assert sorted(seen) == [4, 8]  # at each re-matching after the first
    assert all(0 <= v <= 1 for v in seen.values()) and any(v > 0 for v in seen.values())


def test_a_reinitialisation_forces_a_re_matching_at_the_next_penalty(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=20000", "mfr.enabled=true", "mfr.match_every=50", "mfr.mmcs=max",
                                              "mfr.beta=1.0", "mfr.warmup_steps=0", "mfr.reinit_samples=1000",
                                              "mfr.reinit_window=10"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    with torch.no_grad():  # member 1 cannot use most latents: re-initialised at step 0
        trainer.ensemble.b_enc[1, 32:] = -100.0
    batches = trainer.source.batches(cfg.train.batch_size)
    logs = trainer.train_step(next(batches))
    assert [e["member"] for e in logs["reinit"]] == [1]
    new_weights = match_all(trainer.ensemble.decoder().detach())  # the matches of the re-initialised member
    trainer.train_step(next(batches))  # step 1: not a matching step of match_every=50
    assert torch.equal(trainer.mfr.matches[(0, 1)], new_weights[0])
