import pytest
import torch

from mfr_sae.kernels import reference_decode, reference_encode
from mfr_sae.tied_kernel import tied_topk


@pytest.mark.parametrize("ks", [[4, 4, 4], [2, 4, 11]])
def test_fused_tied_reconstruction_matches_the_reference_values_and_gradients(kernel_inputs, ks):
    x, w, bias, _ = kernel_inputs()
    target = torch.randn(3, 17, 6, dtype=torch.float64)
    k = max(ks)
    mask = (torch.arange(k) < torch.tensor(ks).view(-1, 1)).view(3, 1, k).double()
    uniform = len(set(ks)) == 1

    def reference(x, w, bias):
        acts, idx = reference_encode(x, w, bias, k)
        acts = acts if uniform else acts * mask
        return reference_decode(acts, idx, torch.nn.functional.normalize(w, dim=-1)), acts

    out, acts, _ = tied_topk(x, w, bias, k, None if uniform else mask)
    ref_out, ref_acts = reference(x, w, bias)
    torch.testing.assert_close(out, ref_out)
    assert not acts.requires_grad and torch.allclose(acts.sort(-1).values, ref_acts.sort(-1).values)
    grads = torch.autograd.grad((out - target).pow(2).sum(), [x, w, bias])
    ref_grads = torch.autograd.grad((ref_out - target).pow(2).sum(), [x, w, bias])
    for name, g, r in zip(["x", "W", "b_enc"], grads, ref_grads):
        torch.testing.assert_close(g, r, msg=f"gradient of {name}")
    assert torch.autograd.gradcheck(lambda x, w, b: tied_topk(x, w, b, k, None if uniform else mask)[0], (x, w, bias))


def test_fused_tied_reconstruction_under_bf16_autocast_returns_fp32_gradients_close_to_fp32():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=gen)
    w = torch.randn(2, 96, 32, generator=gen, requires_grad=True)
    bias = torch.zeros(2, 96, requires_grad=True)

    def run(autocast):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out, _, _ = tied_topk(x, w, bias, 8)
        return out, torch.autograd.grad((out.float() - x).pow(2).mean(), [w, bias])

    (out, grads), (ref_out, ref_grads) = run(True), run(False)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    assert (out.float() - ref_out).norm() / ref_out.norm() < 0.1
    for name, g, r in zip(["W_enc", "b_enc"], grads, ref_grads):
        assert 0 < (g - r).norm() / r.norm() < 0.25, name  # bf16 products; near ties swap a few latents
