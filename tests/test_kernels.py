import pytest
import torch

from mfr_sae.kernels import member_mse, reference_decode, reference_encode, sparse_decode, topk_encode, topk_selector
from mfr_sae.sparse_grads import gather_rows
from mfr_sae.tied_kernel import tied_topk


@pytest.mark.parametrize("k", [1, 4, 11])
def test_fused_encode_decode_matches_dense_reference_values_and_gradients(kernel_inputs, k):
    x, w, bias, dec = kernel_inputs()
    target = torch.randn(3, 17, 6, dtype=torch.float64)

    def run(encode, decode):
        acts, idx = encode(x, w, bias, k)
        out = decode(acts, idx, dec)
        loss = (out - target).pow(2).sum()
        grads = torch.autograd.grad(loss, [x, w, bias, dec])
        return out, grads

    out, grads = run(lambda x, w, b, k: topk_encode(x, w, b, topk_selector(k, sorted=True)), sparse_decode)
    ref_out, ref_grads = run(reference_encode, reference_decode)
    torch.testing.assert_close(out, ref_out)
    for name, g, r in zip(["x", "W_enc", "b_enc", "W_dec"], grads, ref_grads):
        torch.testing.assert_close(g, r, msg=f"gradient of {name}")


def test_relu_after_topk_zeroes_negative_kept_values_and_their_gradient(kernel_inputs):
    x, w, bias, _ = kernel_inputs()
    bias = torch.full_like(bias, -100.0).requires_grad_()  # every pre-activation negative
    acts, _ = topk_encode(x, w, bias, 3)
    assert (acts == 0).all()
    (gw,) = torch.autograd.grad(acts.sum(), [w])
    assert (gw == 0).all()


def test_gradcheck_of_the_sparse_backward(kernel_inputs):
    x, w, bias, _ = kernel_inputs(n=2, b=5, d=3, h=7)
    torch.autograd.gradcheck(lambda x, w, b: topk_encode(x, w, b, 2)[0], (x, w, bias))


@pytest.mark.parametrize("kernel", ["topk_encode", "tied_topk"])
def test_a_sparse_gradient_is_added_in_place_into_the_kernels_weight_gradient(kernel_inputs, kernel):
    # AuxK's and MFR's sparse gradients (a few rows) meet the kernel's dense one; autograd adds them in place only
    # when that dense one is a tensor of its own, not a view: else every step copies the whole [N, h, d] weight
    x, w, bias, _ = kernel_inputs()
    rows = torch.tensor([2, 9, 30])
    encode = topk_encode if kernel == "topk_encode" else tied_topk
    out = encode(x, w, bias, 4)[0]
    produced = []
    out.grad_fn.register_hook(lambda grad_inputs, _: produced.append(grad_inputs[1].data_ptr()))  # no reference
    (gather_rows(w, rows).sum() + out.sum()).backward()  # the sparse gradient, computed first, waits for the dense
    assert w.grad.data_ptr() == produced[0]  # the sum is in the kernel's own buffer
    (ref,) = torch.autograd.grad(w.flatten(0, 1)[rows].sum() + encode(x, w, bias, 4)[0].sum(), w)
    torch.testing.assert_close(w.grad, ref)


def test_the_kernels_take_a_weight_of_any_strides(kernel_inputs):
    x, w, bias, _ = kernel_inputs()
    strided = w.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # [N, h, d], h outermost
    for kernel in (lambda w: tied_topk(x, w, bias, 4)[0], lambda w: topk_encode(x, w, bias, 4)[0]):
        (ours,) = torch.autograd.grad(kernel(strided).sum(), strided)
        (ref,) = torch.autograd.grad(kernel(w).sum(), w)
        torch.testing.assert_close(ours, ref)


def test_bf16_autocast_computes_in_bf16_and_returns_fp32_gradients_close_to_the_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=gen)
    w = torch.randn(2, 96, 32, generator=gen, requires_grad=True)
    bias = torch.zeros(2, 96, requires_grad=True)
    dec = torch.randn(2, 96, 32, generator=gen, requires_grad=True)

    def run(autocast):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            acts, idx = topk_encode(x, w, bias, 8)
            out = sparse_decode(acts, idx, dec)
        loss = (out.float() - x).pow(2).mean()
        return out, idx, torch.autograd.grad(loss, [w, bias, dec])

    out, idx, grads = run(True)
    ref_out, ref_idx, ref_grads = run(False)
    assert out.dtype == torch.bfloat16 and ref_out.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)
    assert (idx.sort(-1).values == ref_idx.sort(-1).values).float().mean() > 0.9  # near-ties may swap
    assert (out.float() - ref_out).norm() / ref_out.norm() < 0.1  # bf16 keeps 8 bits of mantissa
    for name, g, r in zip(["W_enc", "b_enc", "W_dec"], grads, ref_grads):
        assert (g - r).norm() / r.norm() < 0.1, name


def test_member_mse_is_each_members_mean_squared_error_with_its_gradient(kernel_inputs):
    x, _, _, dec = kernel_inputs()
    x_hat = dec.detach().clone().requires_grad_()  # [3, 11, 6]: 11 samples of 6 dimensions
    target = x[:11].detach().clone().requires_grad_()
    torch.testing.assert_close(member_mse(x_hat, target), (x_hat - target).pow(2).mean(dim=(1, 2)))
    assert torch.autograd.gradcheck(member_mse, (x_hat, target))
