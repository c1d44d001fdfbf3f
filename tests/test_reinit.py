import json

import pytest
import torch

from mfr_sae.config import MFRConfig, load_config
from mfr_sae.distributed import Shard
from mfr_sae.reinit import ReinitRule, reinit_metric
from mfr_sae.train import Trainer


def test_reinit_metric_by_hand():
    # k/h = 0.25; firing probabilities (0.25, 0.25, 0.5, 0) -> deviations (0, 0, 1, 1) -> M = 0.5
    p = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    assert reinit_metric(p, [1]).item() == pytest.approx(0.5)
    assert reinit_metric(torch.full((1, 8), 0.25), [2]).item() == 0.0  # t follows k and h


def _rule(enabled: bool = True, **cfg) -> ReinitRule:
    settings = {"reinit_samples": 20, "reinit_window": 3, "reinit_threshold": 1.0, "reinit_max": 2, **cfg}
    return ReinitRule(MFRConfig(enabled=enabled, **settings), [1, 1], Shard(2))


def test_the_rule_waits_for_a_full_history_and_stops_after_the_window():
    rule = _rule()
    # k = 1 of h = 4: latent 0 fires on every sample, the others never
    one_latent = torch.tensor([[10.0, 0, 0, 0], [10.0, 0, 0, 0]])
    assert rule.check(0, one_latent, 10) == ([], None)  # 10 of 20 vectors
    chosen, metric = rule.check(1, one_latent, 10)
    assert chosen == [0, 1] and metric.tolist() == pytest.approx([(27 + 1 + 1 + 1) / 4] * 2)
    assert rule.attempts == [1, 1] and rule.steps_since_init == [0, 0] and not rule.history
    assert [(e["step"], e["member"], e["attempt"]) for e in rule.events] == [(1, 0, 1), (1, 1, 1)]
    for step in range(2, 6):
        rule.check(step, one_latent, 10)
    assert rule.attempts == [2, 2]  # reinit_max
    assert rule.check(6, one_latent, 10)[0] == []
    for step in range(7, 10):
        rule.check(step, one_latent, 10)
    assert rule.check(10, one_latent, 10) == ([], None)  # everyone past the window


def test_the_baseline_only_measures():
    rule = _rule(enabled=False)
    one_latent = torch.tensor([[10.0, 0, 0, 0], [10.0, 0, 0, 0]])
    rule.check(0, one_latent, 20)
    chosen, metric = rule.check(1, one_latent, 20)
    assert chosen == [] and metric is not None and rule.attempts == [0, 0]


def test_the_history_keeps_the_last_reinit_samples_vectors_and_survives_a_checkpoint():
    rule = _rule(reinit_window=100, reinit_threshold=1e9)
    for step, batch in enumerate([5, 10, 10, 10]):
        rule.check(step, torch.full((2, 4), float(step)), batch)
    assert [batch for batch, _ in rule.history] == [10, 10]  # the last 20 vectors
    tensors, meta = rule.state()
    restored = _rule(reinit_window=100, reinit_threshold=1e9)
    restored.load_state(tensors, json.loads(json.dumps(meta)))
    assert [batch for batch, _ in restored.history] == [10, 10]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rule.history, restored.history))
    assert restored.steps_since_init == rule.steps_since_init and restored.events == rule.events


@pytest.mark.parametrize("plant", [False, True])
def test_a_planted_bad_initialisation_triggers_reinit_and_a_good_one_does_not(tmp_path, easy_overrides, plant):
    cfg = load_config(
        None,
        easy_overrides
        + ["train.n_samples=20000", "mfr.enabled=true", "mfr.reinit_samples=1000", "mfr.reinit_window=10"],
    )
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
