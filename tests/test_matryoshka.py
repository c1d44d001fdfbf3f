import pytest
import torch
from torch.nn import functional as F

from mfr_sae.batchtopk import batch_topk
from mfr_sae.config import ConfigError, load_config
from mfr_sae.ensemble import Ensemble
from mfr_sae.matryoshka import prefix_widths
from mfr_sae.tied_kernel import tied_topk


def dense_prefixes(codes, decoder, ends):
    """codes [N, B, h] -> each prefix's reconstruction [G, N, B, d]: its latents [0, end) alone."""
    return torch.stack([torch.bmm(codes[..., :end], decoder[:, :end]) for end in ends])


def test_the_tied_kernel_reconstructs_each_prefix_with_the_gradient_of_the_dense_reference():
    torch.manual_seed(0)
    x = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 12, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    ends = torch.tensor([2, 5, 12])
    select = lambda pre: batch_topk(pre, [3, 4])  # noqa: E731
    prefixes, acts, idx = tied_topk(x, w, bias, select, None, ends)
    assert prefixes.shape == (3, 2, 10, 5)
    codes = acts.new_zeros(2, 10, 12).scatter(2, idx, acts)
    torch.testing.assert_close(prefixes, dense_prefixes(codes, F.normalize(w, dim=-1), ends.tolist()))
    assert not torch.allclose(prefixes[0], prefixes[-1])
    assert torch.autograd.gradcheck(lambda x, w, b: tied_topk(x, w, b, select, None, ends)[0], (x, w, bias))


@pytest.mark.parametrize("tied", [True, False])
def test_a_matryoshka_ensemble_trains_on_prefixes_and_is_saved_as_one_jumprelu(tied):
    torch.manual_seed(1)
    widths = {"matryoshka_widths": [4, 12]}
    ens = Ensemble(6, 32, [2, 3], tied, decoder_bias=True, architecture="matryoshka", architecture_options=widths)
    with torch.no_grad():
        ens.b_dec.normal_()
    x = torch.randn(30, 6)
    out = ens(x)
    assert out.prefixes is not None and out.prefixes.shape == (3, 2, 30, 6)
    torch.testing.assert_close(out.x_hat, out.prefixes[-1])
    codes = out.acts.new_zeros(2, 30, 32).scatter(2, out.idx, out.acts)
    expected = dense_prefixes(codes, ens.decoder(), [4, 12, 32]) + ens.b_dec.unsqueeze(1)
    torch.testing.assert_close(out.prefixes, expected)
    ens.threshold.fill_(0.1)
    with ens.as_saved():
        saved = ens(x)
    assert saved.prefixes is None  # as saved: one reconstruction, JumpReLU
    pre = (x - ens.b_dec.unsqueeze(1)) @ ens.W_enc.transpose(1, 2) + ens.b_enc.unsqueeze(1)
    torch.testing.assert_close(saved.x_hat, torch.bmm(pre.relu() * (pre > 0.1), ens.decoder()) + ens.b_dec.unsqueeze(1))


def test_prefix_widths_default_to_sixteenths_and_quarters_and_are_checked():
    assert prefix_widths(64, []) == [4, 16, 64]
    assert prefix_widths(64, [8, 32]) == [8, 32, 64] == prefix_widths(64, [8, 32, 64])
    assert prefix_widths(8, []) == [2, 8] and prefix_widths(2, []) == [2]  # a small h: fewer prefixes, none empty
    for bad in ([0, 8], [16, 8], [8, 80], [64, 32]):
        with pytest.raises(ValueError, match="matryoshka_widths"):
            prefix_widths(64, bad)
    with pytest.raises(ConfigError, match="matryoshka_widths"):
        load_config(None, ["sae.architecture=matryoshka", "sae.d_sae=64", "sae.matryoshka_widths=[32, 16]"])
    with pytest.raises(ConfigError, match="it needs matryoshka"):
        load_config(None, ["sae.architecture=batchtopk", "sae.matryoshka_widths=[32]"])
    with pytest.raises(ConfigError, match="sae.architecture='jumprelu'"):
        load_config(None, ["sae.architecture=jumprelu"])
