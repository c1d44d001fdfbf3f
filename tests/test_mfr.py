import json

import pytest
import torch
from torch.nn import functional as F

from mfr_sae import load
from mfr_sae.config import PAPER_MFR, ConfigError, MFRConfig, load_config
from mfr_sae.matching import NO_MATCH, match_all, member_pairs
from mfr_sae.mfr import MutualRegularizer
from mfr_sae.mmcs import matched_mmcs
from mfr_sae.train import Trainer, train


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
    every_latent = ["mfr.enabled=true", "mfr.beta=1.0", "mfr.confirm_cosine=1"]  # (here nothing is confirmed by 0.8)
    mfr = train(load_config(None, overrides + every_latent), tmp_path / "mfr", progress=False)
    assert base["beta"] is None and mfr["beta"] == 1.0
    assert mfr["pairwise_mmcs"] > base["pairwise_mmcs"]


def test_resume_of_an_mfr_run_with_sparse_matching_is_exact(tmp_path, easy_overrides):
    overrides = easy_overrides + [
        "train.n_samples=40000",
        "mfr.enabled=true",
        "mfr.match_every=7",
        "mfr.reinit_samples=3000",
        "train.checkpoint_every=15",
    ]
    train(load_config(None, overrides), tmp_path / "full", progress=False)
    trainer = Trainer(load_config(None, overrides), tmp_path / "cut", progress=False)
    trainer.cfg.train.n_samples = 25000  # stop early, after the checkpoint at step 15
    trainer.fit()
    (tmp_path / "cut" / "results.json").unlink()
    from mfr_sae import load, resume

    resume(tmp_path / "cut", progress=False)
    for name, p in load(tmp_path / "full").named_parameters():
        assert torch.equal(p, getattr(load(tmp_path / "cut"), name)), name


@pytest.mark.parametrize(
    "mmcs, match_every", [("max", 1), ("mnn", 10), ("mnn_hungarian", 10), ("hungarian", 10), ("greedy", 10)]
)
def test_a_ceiling_stops_the_pull_on_members_that_already_agree(mmcs, match_every):
    torch.manual_seed(0)
    a = F.normalize(torch.randn(30, 8), dim=-1)
    close = torch.stack([a, F.normalize(a + 0.03 * torch.randn(30, 8), dim=-1)])  # every match at cosine > 0.99
    grads = {}
    for ceiling in (1.0, 0.98):
        cfg = MFRConfig(
            enabled=True,
            confirm_cosine=1.0,
            beta=1.0,
            mmcs=mmcs,
            match_every=match_every,
            max_cosine=ceiling,
            twin_guard=1.0,
            idle_to_live=False,
        )
        reg = MutualRegularizer(cfg, [2, 2])
        assert (reg.matching.certified is None) == (ceiling < 1 or mmcs != "max")  # the certified path has no ceiling
        weight = close.clone().requires_grad_()
        penalty, logs = reg.penalty(weight, 200, lambda: 1.0)
        penalty.backward()
        grads[ceiling] = weight.grad
        expected = matched_mmcs(close, match_all(close, mmcs, max_cosine=ceiling)).item()
        assert logs["pairwise_mmcs"] == pytest.approx(expected, abs=1e-6)
    assert grads[1.0].abs().sum() > 0
    assert torch.equal(grads[0.98], torch.zeros_like(grads[0.98]))  # no link left: no pull
    with pytest.raises(ConfigError, match="mfr.match_every=0"):
        load_config(None, ["mfr.mmcs=max", "mfr.match_every=0", "mfr.max_cosine=0.9"])
    with pytest.raises(ConfigError, match="mfr.min_cosine"):
        load_config(None, ["mfr.min_cosine=0.9", "mfr.max_cosine=0.8"])


@pytest.mark.parametrize("mmcs, match_every", [("max", 0), ("max", 1), ("mnn_hungarian", 10)])
def test_only_the_rows_given_as_pulled_take_the_penalty_gradient(mmcs, match_every):
    torch.manual_seed(0)
    decoder = F.normalize(torch.randn(3, 30, 8), dim=-1)
    pulled = torch.rand(3, 30) < 0.3
    grads, values = {}, {}
    for name, mask in (("all", None), ("some", pulled)):
        cfg = MFRConfig(
            enabled=True,
            confirm_cosine=1.0,
            beta=1.0,
            mmcs=mmcs,
            match_every=match_every,
            twin_guard=1.0,
            idle_to_live=False,
        )
        reg = MutualRegularizer(cfg, [2, 2, 2])
        weight = decoder.clone().requires_grad_()
        penalty, logs = reg.penalty(weight, 200, lambda: 1.0, mask)
        penalty.backward()
        grads[name], values[name] = weight.grad, penalty.item()
    assert values["some"] == pytest.approx(values["all"], rel=1e-6)  # the same penalty, a part of its gradient
    torch.testing.assert_close(grads["some"][pulled], grads["all"][pulled])
    assert torch.equal(grads["some"][~pulled], torch.zeros_like(grads["some"][~pulled]))
    assert grads["all"][~pulled].abs().sum() > 0
    assert logs["pulled_frac"] == pytest.approx(pulled.float().mean().item())


@pytest.mark.parametrize("beta", [0.5, "0.5*recon"])
def test_a_step_without_the_value_gives_the_pulled_rows_the_same_gradient_bitwise(beta):
    torch.manual_seed(0)
    decoder = F.normalize(torch.randn(60, 16), dim=-1) + 0.3 * torch.randn(3, 60, 16)
    pulled = torch.rand(3, 60) < 0.2
    grads, betas = {}, {}
    for value in (True, False):
        reg = MutualRegularizer(
            MFRConfig(enabled=True, confirm_cosine=1.0, beta=beta, match_every=10, idle_window=1), [2, 2, 2]
        )
        weight = decoder.clone().requires_grad_()
        reg.penalty(weight, 0, lambda: 1.0, pulled)  # the re-matching step: its value is always taken
        weight.grad = None
        for step in (201, 202):  # between re-matchings
            penalty, logs = reg.penalty(weight, step, lambda step=step: 1.0 + step, pulled, value=value)
            penalty.backward()
        assert ("penalty" in logs) == value  # without it, nothing of the value is logged
        assert weight.grad.is_sparse == (not value)  # a sparse gradient: added into the dense one in place
        grads[value], betas[value] = weight.grad.to_dense(), reg.beta
    assert torch.equal(grads[False], grads[True])
    assert grads[True][pulled].abs().sum() > 0 and not grads[True][~pulled].any()
    assert betas[False] == betas[True]  # recon's running mean went on alike


def _unlinked_where_both(matches, marked):
    """Reference, by hand: matches [P, 2, h] with NO_MATCH wherever a latent and its partner are both marked [N, h]."""
    matches = matches.clone()
    for p, (a, b) in enumerate(member_pairs(len(marked))):
        for side, (row_member, partner_member) in enumerate([(a, b), (b, a)]):
            for row, partner in enumerate(matches[p, side].tolist()):
                if partner != NO_MATCH and marked[row_member, row] and marked[partner_member, partner]:
                    matches[p, side, row] = NO_MATCH
    return matches


def test_idle_to_live_leaves_pairs_of_idle_latents_unpulled_against_hand_filtered_matches():
    torch.manual_seed(1)
    base = F.normalize(torch.randn(30, 8), dim=-1)
    decoder = F.normalize(base + 0.3 * torch.randn(3, 30, 8), dim=-1)  # members that roughly agree
    idle = torch.rand(3, 30) < 0.5
    cfg = MFRConfig(
        enabled=True,
        confirm_cosine=1.0,
        twin_guard=1.0,
        beta=1.0,
        mmcs="mnn_hungarian",
        match_every=10,
        max_cosine=1.0,
        idle_window=1,
        idle_to_live=True,
    )
    reg = MutualRegularizer(cfg, [2, 2, 2])
    weight = decoder.clone().requires_grad_()
    penalty, _ = reg.penalty(weight, 200, lambda: 1.0, idle)
    penalty.backward()
    # the reference: every pair's one-to-one matches, with those between two idle latents taken out by hand
    matches = _unlinked_where_both(match_all(decoder, "mnn_hungarian"), idle)
    reference = decoder.clone().requires_grad_()
    expected = 1 - matched_mmcs(torch.where(idle.unsqueeze(-1), reference, reference.detach()), matches)
    expected.backward()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(weight.grad, reference.grad)
    dropped = (matches == NO_MATCH).sum().item()
    assert dropped > 0 and (match_all(decoder, "mnn_hungarian") == NO_MATCH).sum() == 0  # only the idle pairs went
    assert weight.grad[idle].abs().sum() > 0  # idle latents matched to live ones are still pulled


def test_idle_window_pulls_only_latents_that_have_not_fired_lately(tmp_path, easy_overrides):
    overrides = easy_overrides + ["train.n_samples=40000", "sae.n_members=3"]
    mfr = ["mfr.enabled=true", "mfr.beta=1.0", "mfr.mmcs=mnn_hungarian", "mfr.warmup_steps=0", "mfr.confirm_cosine=1"]
    runs = {}
    for name, extra in [
        ("base", []),
        ("never", [*mfr, "mfr.idle_window=1000000"]),
        ("idle", [*mfr, "mfr.idle_window=2000"]),
    ]:
        train(load_config(None, overrides + extra), tmp_path / name, progress=False)
        runs[name] = load(tmp_path / name).decoder_weight.detach()
    torch.testing.assert_close(runs["never"], runs["base"], atol=0, rtol=0)  # no latent idle: no pull at all
    assert not torch.equal(runs["idle"], runs["base"])
    logged = [json.loads(line) for line in (tmp_path / "idle" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["pulled_frac"] < 1 for r in logged if "pulled_frac" in r)
    assert max(r.get("pulled_frac", 0) for r in logged) > 0
    with pytest.raises(ConfigError, match="mfr.idle_window"):
        load_config(None, ["mfr.idle_window=-1"])


def _confirmed(decoder, cosine):
    """Reference: latents with a latent of another member at cosine >= `cosine`, from dense products."""
    n = len(decoder)
    best = torch.stack(
        [
            torch.stack([(decoder[m] @ decoder[o].T).max(1).values for o in range(n) if o != m]).max(0).values
            for m in range(n)
        ]
    )
    return best >= cosine


def _confirmed_reference(decoder, cosine):
    """The penalty of `confirm` from dense products and hand-filtered matches: the confirmed latents, and the
    penalty's value and gradient with pairs of two unconfirmed latents unlinked and confirmed rows not pulled."""
    confirmed = _confirmed(decoder, cosine)
    matches = _unlinked_where_both(match_all(decoder, "greedy"), ~confirmed)
    reference = decoder.clone().requires_grad_()
    expected = 1 - matched_mmcs(torch.where(confirmed.unsqueeze(-1), reference.detach(), reference), matches)
    expected.backward()
    return confirmed, expected.item(), reference.grad


def test_confirm_pulls_only_unconfirmed_latents_towards_latents_that_the_same_rematching_confirmed():
    torch.manual_seed(2)
    base = F.normalize(torch.randn(30, 8), dim=-1)
    noise = torch.cat([0.1 * torch.ones(15), 3 * torch.ones(15)]).view(1, 30, 1)  # half agree, half do not
    cfg = MFRConfig(
        enabled=True,
        beta=1.0,
        warmup_steps=0,
        mmcs="greedy",
        match_every=10,
        max_cosine=1.0,
        twin_guard=1.0,
        idle_window=0,
        confirm_cosine=0.9,
    )
    reg = MutualRegularizer(cfg, [2, 2, 2])
    for step in (0, 10):  # two re-matchings of other decoders
        decoder = F.normalize(base + noise * torch.randn(3, 30, 8), dim=-1)
        weight = decoder.clone().requires_grad_()
        penalty, logs = reg.penalty(weight, step, lambda: 1.0)
        penalty.backward()
        confirmed, expected, expected_grad = _confirmed_reference(decoder, 0.9)
        assert 0 < confirmed.float().mean() < 1
        assert logs["confirmed_frac"] == pytest.approx(confirmed.float().mean().item())
        assert penalty.item() == pytest.approx(expected, rel=1e-6)
        torch.testing.assert_close(weight.grad, expected_grad)
        assert not weight.grad[confirmed].any() and weight.grad[~confirmed].abs().sum() > 0
    # between re-matchings only the linked unconfirmed rows are pulled: the same gradient, with or without the value
    grads = {}
    for value in (True, False):
        weight = decoder.clone().requires_grad_()
        penalty, logs = reg.penalty(weight, 11, lambda: 1.0, value=value)
        penalty.backward()
        grads[value] = weight.grad.to_dense()
        assert logs["pulled_frac"] < (~confirmed).float().mean()  # unlinked unconfirmed rows are left out
    torch.testing.assert_close(grads[False], grads[True])
    torch.testing.assert_close(grads[True], expected_grad)


def test_a_run_with_confirm_resumes_to_the_same_weights(tmp_path, easy_overrides, cut_and_resumed):
    overrides = easy_overrides + [
        "sae.n_members=3",
        "mfr.enabled=true",
        "mfr.beta=1.0",
        "mfr.confirm_cosine=0.6",  # (this small problem's members agree slowly)
        "mfr.max_cosine=0.5",
        "mfr.idle_window=0",
        "mfr.match_every=4",
        "train.n_samples=40000",
        "train.checkpoint_every=15",
        "train.log_every=5",
    ]
    full = train(load_config(None, overrides), tmp_path / "full", progress=False)
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < max(r.get("confirmed_frac", 0) for r in logged) < 1  # some latents confirmed, others pulled
    _, resumed = cut_and_resumed(overrides, tmp_path / "cut", 22)
    for name, tensor in load(tmp_path / "full").state_dict().items():
        assert torch.equal(tensor, load(tmp_path / "cut").state_dict()[name]), name
    assert resumed["members"] == full["members"]
