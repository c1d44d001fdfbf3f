import pytest
import torch
from torch.nn import functional as F

from mfr_sae.ensemble import Ensemble


def _by_hand(ens: Ensemble, i: int, x: torch.Tensor) -> torch.Tensor:
    """One member computed the textbook way: z = ReLU(TopK(W (x - b_dec) + b_enc)), x_hat = z D + b_dec."""
    b_dec = ens.b_dec[i] if ens.b_dec is not None else torch.zeros(ens.d_in)
    pre = (x - b_dec) @ ens.W_enc[i].T + ens.b_enc[i]
    top = pre.topk(ens.ks[i], dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    return z @ ens.decoder()[i] + b_dec


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("decoder_bias", [False, True])
def test_each_member_matches_a_hand_computed_topk_sae(tied, decoder_bias):
    ens = Ensemble(8, 20, [2, 5, 3], tied=tied, decoder_bias=decoder_bias, seed=1)
    with torch.no_grad():
        ens.b_enc.normal_()
        if ens.b_dec is not None:
            ens.b_dec.normal_()
    x = torch.randn(30, 8)
    out = ens(x)
    for i, k in enumerate(ens.ks):
        torch.testing.assert_close(out.x_hat[i], _by_hand(ens, i, x), atol=1e-5, rtol=1e-5)
        assert ((out.acts[i] > 0).sum(-1) <= k).all()


@pytest.mark.parametrize("decoder_bias", [False, True])
def test_one_latents_pre_activation_is_the_dense_products_entry(decoder_bias):
    ens = Ensemble(8, 20, [2, 5, 3], decoder_bias=decoder_bias, seed=2)
    with torch.no_grad():
        ens.b_enc.normal_()
        if ens.b_dec is not None:
            ens.b_dec.normal_()
    x = torch.randn(30, 8)
    latents = torch.randint(0, 3 * 20, (30,))
    member, latent = latents // 20, latents % 20
    b_dec = ens.b_dec[member] if ens.b_dec is not None else torch.zeros(30, 8)
    want = ((x - b_dec) * ens.W_enc[member, latent]).sum(-1) + ens.b_enc[member, latent]
    pre, magnitude = ens.pre_activations_at(x, latents)
    torch.testing.assert_close(pre, want, atol=1e-5, rtol=1e-5)
    assert (magnitude >= pre.abs() - 1e-6).all() and (magnitude > 0).all()


@pytest.mark.parametrize("tied, decoder_bias", [(True, False), (False, True)])
def test_the_forward_pass_reads_the_asked_latents_pre_activations_and_keeps_the_same_ones(
    perturbed_ensemble, tied, decoder_bias
):
    ensemble = perturbed_ensemble(tied, decoder_bias)
    x = torch.randn(16, 8, dtype=torch.float64)
    latents = torch.tensor([1, 7, 19, 20, 33])  # flat: member * h + latent, both members
    out, plain = ensemble(x, latents), ensemble(x)
    want = torch.einsum("bd,nhd->bnh", x, ensemble.W_enc) + ensemble._encoder_bias(x)
    assert not out.read_pre.requires_grad and plain.read_pre is None
    torch.testing.assert_close(out.read_pre, want.flatten(1)[:, latents])
    assert torch.equal(out.idx, plain.idx) and torch.equal(out.x_hat, plain.x_hat)


def test_tied_decoder_is_the_unit_normalised_encoder():
    ens = Ensemble(8, 20, [3, 3])
    torch.testing.assert_close(ens.decoder(), F.normalize(ens.W_enc, dim=-1))
    torch.testing.assert_close(ens.decoder().norm(dim=-1), torch.ones(2, 20))
    assert ens.W_dec is None and sum(p.numel() for p in ens.parameters()) == 2 * 20 * 8 + 2 * 20


def test_untied_decoder_is_kept_at_unit_norm():
    ens = Ensemble(8, 20, [3, 3], tied=False)
    with torch.no_grad():
        ens.W_dec.mul_(3.0)
    ens.renormalize_decoder()
    torch.testing.assert_close(ens.W_dec.norm(dim=-1), torch.ones(2, 20))


def test_member_init_depends_only_on_seed_and_member_id():
    whole = Ensemble(8, 20, [3, 3, 3], seed=5)
    shard = Ensemble(8, 20, [3], seed=5, member_ids=[2])
    assert torch.equal(whole.W_enc[2], shard.W_enc[0])
    assert torch.equal(whole.select([2]).W_enc[0], shard.W_enc[0])
    assert not torch.equal(whole.W_enc[0], whole.W_enc[1])
    before = whole.W_enc[1].clone()
    whole.reset_member(1, attempt=1)
    assert not torch.equal(before, whole.W_enc[1])
    assert torch.equal(whole.W_enc[0], Ensemble(8, 20, [3], seed=5).W_enc[0])


def test_gradients_reach_every_member_parameter():
    ens = Ensemble(8, 20, [2, 4], tied=False, decoder_bias=True)
    x = torch.randn(16, 8)
    ens(x).x_hat.sub(x).pow(2).mean().backward()
    for name, p in ens.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_wrong_input_shape_is_a_clear_error():
    ens = Ensemble(8, 20, [3])
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, 8\], got \[4, 7\]"):
        ens(torch.randn(4, 7))


def test_shared_init_starts_every_member_from_member_0():
    ens = Ensemble(8, 20, [3, 3, 3], seed=2, shared_init=True)
    assert torch.equal(ens.W_enc[0], ens.W_enc[2])
    assert torch.equal(ens.W_enc[0], Ensemble(8, 20, [3], seed=2).W_enc[0])
    ens.reset_member(2, attempt=1)  # a reinitialisation is the member's own
    assert not torch.equal(ens.W_enc[0], ens.W_enc[2])
