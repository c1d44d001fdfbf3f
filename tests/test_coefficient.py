import json
import math

import pytest
import torch
from torch.nn import functional as F

from mfr_sae.coefficient import warmup_weight
from mfr_sae.config import ConfigError, MFRConfig, load_config
from mfr_sae.mfr import MutualRegularizer


def test_warmup_is_a_cosine_ramp():
    assert warmup_weight(0, 100) == 0.0
    assert warmup_weight(50, 100) == pytest.approx(0.5)
    assert warmup_weight(25, 100) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert warmup_weight(100, 100) == 1.0 and warmup_weight(1000, 100) == 1.0
    assert warmup_weight(0, 0) == 1.0


def test_auto_beta_makes_the_penalty_equal_the_loss_at_the_start():
    reg = MutualRegularizer(
        MFRConfig(enabled=True, confirm_cosine=1.0, beta="auto", mmcs="max", warmup_steps=0), [2, 2]
    )
    decoder = F.normalize(torch.randn(2, 30, 8), dim=-1)
    penalty, logs = reg.penalty(decoder, 0, lambda: 0.37)
    assert penalty.item() == pytest.approx(0.37, rel=1e-5)
    assert reg.beta == pytest.approx(0.37 / (1 - logs["pairwise_mmcs"]), rel=1e-5)
    fixed = MutualRegularizer(MFRConfig(enabled=True, confirm_cosine=1.0, beta=2.0, warmup_steps=100), [2, 2])
    penalty, logs = fixed.penalty(decoder, 50, lambda: 0.37)
    assert logs["penalty_weight"] == pytest.approx(1.0)  # beta * w(50) = 2 * 0.5
    assert penalty.item() == pytest.approx(1 - logs["pairwise_mmcs"], rel=1e-5)


def test_auto_beta_refuses_identical_members():
    reg = MutualRegularizer(
        MFRConfig(enabled=True, confirm_cosine=1.0, max_cosine=1.0, twin_guard=1.0), [2, 2]
    )  # (a ceiling unlinks them all)
    decoder = F.normalize(torch.randn(1, 30, 8), dim=-1).expand(2, 30, 8)
    with pytest.raises(ConfigError, match="members start identical"):
        reg.penalty(decoder, 0, lambda: 1.0)


def test_beta_relative_to_auto_scales_the_auto_value():
    decoder = F.normalize(torch.randn(2, 30, 8), dim=-1)
    betas = {}
    for beta in ("auto", "0.02*auto", 0.5):
        reg = MutualRegularizer(MFRConfig(enabled=True, confirm_cosine=1.0, beta=beta, warmup_steps=0), [2, 2])
        reg.penalty(decoder, 0, lambda: 0.37)
        betas[beta] = reg.beta
    assert betas["0.02*auto"] == pytest.approx(0.02 * betas["auto"])
    assert betas[0.5] == 0.5
    assert not MutualRegularizer(MFRConfig(enabled=True, confirm_cosine=1.0, beta="0*auto"), [2, 2]).penalty_on
    for wrong in ("2*aut", "-1*auto", "auto*2", -0.5):
        with pytest.raises(ConfigError, match="mfr.beta"):
            load_config(None, [f"mfr.beta={wrong}"])
    assert load_config(None, ["mfr.beta=1e-3*auto"]).mfr.beta == "1e-3*auto"


def test_recon_beta_follows_the_reconstruction_loss_as_it_falls_and_auto_keeps_its_first_value():
    decoder = F.normalize(torch.randn(2, 30, 8), dim=-1)
    recon = MutualRegularizer(MFRConfig(enabled=True, confirm_cosine=1.0, beta="0.1*recon", warmup_steps=0), [2, 2])
    auto = MutualRegularizer(MFRConfig(enabled=True, confirm_cosine=1.0, beta="0.1*auto", warmup_steps=0), [2, 2])
    _, first = recon.penalty(decoder, 0, lambda: 1.0)
    auto.penalty(decoder, 0, lambda: 1.0)
    start = 1 - first["pairwise_mmcs"]
    assert first["beta_effective"] == pytest.approx(0.1 / start, rel=1e-5) == auto.beta
    mean = 1.0
    for step in range(1, 400):  # the loss falls a hundredfold and stays there
        _, logs = recon.penalty(decoder, step, lambda: 0.01)
        _, auto_logs = auto.penalty(decoder, step, lambda: 0.01)
        mean += 0.01 * (0.01 - mean)
    assert logs["beta_effective"] == pytest.approx(0.1 * mean / start, rel=1e-5)
    assert logs["beta_effective"] < 0.05 * first["beta_effective"]
    assert auto_logs["beta_effective"] == first["beta_effective"]  # the paper's form keeps its step-1 beta
    # a resumed run goes on from the same running mean and start distance
    tensors, meta = recon.state()
    again = MutualRegularizer(MFRConfig(enabled=True, confirm_cosine=1.0, beta="0.1*recon", warmup_steps=0), [2, 2])
    again.load_state(tensors, json.loads(json.dumps(meta)))
    assert again.penalty(decoder, 400, lambda: 0.01)[1] == recon.penalty(decoder, 400, lambda: 0.01)[1]
    with pytest.raises(ConfigError, match="mfr.beta"):
        load_config(None, ["mfr.beta=0.1*recons"])


def test_recon_beta_refuses_identical_members():
    reg = MutualRegularizer(
        MFRConfig(enabled=True, confirm_cosine=1.0, beta="recon", max_cosine=1.0, twin_guard=1.0), [2, 2]
    )
    decoder = F.normalize(torch.randn(1, 30, 8), dim=-1).expand(2, 30, 8)
    with pytest.raises(ConfigError, match="members start identical"):
        reg.penalty(decoder, 0, lambda: 1.0)
