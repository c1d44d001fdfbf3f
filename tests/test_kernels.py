import pytest
import torch

from mfr_sae.kernels import reference_decode, reference_encode, sparse_decode, topk_encode, topk_selector


def _inputs(n=3, b=17, d=6, h=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    dec = torch.randn(n, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, w, bias, dec


@pytest.mark.parametrize("k", [1, 4, 11])
def test_fused_encode_decode_matches_dense_reference_values_and_gradients(k):
    x, w, bias, dec = _inputs()
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


def test_relu_after_topk_zeroes_negative_kept_values_and_their_gradient():
    x, w, bias, _ = _inputs()
    bias = torch.full_like(bias, -100.0).requires_grad_()  # every pre-activation negative
    acts, _ = topk_encode(x, w, bias, 3)
    assert (acts == 0).all()
    (gw,) = torch.autograd.grad(acts.sum(), [w])
    assert (gw == 0).all()


def test_gradcheck_of_the_sparse_backward():
    x, w, bias, _ = _inputs(n=2, b=5, d=3, h=7)
    torch.autograd.gradcheck(lambda x, w, b: topk_encode(x, w, b, 2)[0], (x, w, bias))


def test_unit_rows_matches_normalize_in_value_and_gradient():
    from torch.nn import functional as F

    from mfr_sae.kernels import unit_rows

    w = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad((unit_rows(w) * g).sum(), w)
    (ref,) = torch.autograd.grad((F.normalize(w, dim=-1) * g).sum(), w)
    torch.testing.assert_close(unit_rows(w), F.normalize(w, dim=-1))
    torch.testing.assert_close(ours, ref)
    torch.autograd.gradcheck(unit_rows, (w,))


def test_gather_rows_gradient_is_the_rows_alone_and_adds_onto_a_dense_one():
    from mfr_sae.kernels import gather_rows

    w = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([1, 4, 9, 20])
    g = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(gather_rows(w, rows), w.flatten(0, 1)[rows])
    (ours,) = torch.autograd.grad((gather_rows(w, rows) * g).sum(), w)
    (ref,) = torch.autograd.grad((w.flatten(0, 1)[rows] * g).sum(), w)
    assert ours.is_sparse and ours._nnz() == len(rows)
    torch.testing.assert_close(ours.to_dense(), ref)
    # beside a dense gradient (the reconstruction's), the accumulated one is dense and the sum of both
    ((w * w).sum() + (gather_rows(w, rows) * g).sum()).backward()
    assert w.grad is not None and not w.grad.is_sparse
    torch.testing.assert_close(w.grad, 2 * w.detach() + ref)


@pytest.mark.parametrize("kernel", ["topk_encode", "tied_topk"])
def test_a_sparse_gradient_is_added_in_place_into_the_kernels_weight_gradient(kernel):
    # AuxK's and MFR's sparse gradients (a few rows) meet the kernel's dense one; autograd adds them in place only
    # when that dense one is a tensor of its own, not a view: else every step copies the whole [N, h, d] weight
    from mfr_sae.kernels import gather_rows, tied_topk

    x, w, bias, _ = _inputs()
    rows = torch.tensor([2, 9, 30])
    encode = topk_encode if kernel == "topk_encode" else tied_topk
    out = encode(x, w, bias, 4)[0]
    produced = []
    out.grad_fn.register_hook(lambda grad_inputs, _: produced.append(grad_inputs[1].data_ptr()))  # no reference
    (gather_rows(w, rows).sum() + out.sum()).backward()  # the sparse gradient, computed first, waits for the dense
    assert w.grad.data_ptr() == produced[0]  # the sum is in the kernel's own buffer
    (ref,) = torch.autograd.grad(w.flatten(0, 1)[rows].sum() + encode(x, w, bias, 4)[0].sum(), w)
    torch.testing.assert_close(w.grad, ref)


def test_the_kernels_take_a_weight_of_any_strides():
    from mfr_sae.kernels import tied_topk

    x, w, bias, _ = _inputs()
    strided = w.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # [N, h, d], h outermost
    for kernel in (lambda w: tied_topk(x, w, bias, 4)[0], lambda w: topk_encode(x, w, bias, 4)[0]):
        (ours,) = torch.autograd.grad(kernel(strided).sum(), strided)
        (ref,) = torch.autograd.grad(kernel(w).sum(), w)
        torch.testing.assert_close(ours, ref)


def test_given_product_takes_the_gradient_of_the_product_it_was_given():
    from mfr_sae.kernels import given_product

    x, w, bias, _ = _inputs()
    weight, b = w.flatten(0, 1)[:7], bias.flatten()[:7]
    product = torch.addmm(b, x, weight.T)
    g = torch.randn_like(product)
    given = given_product(product.detach(), x, weight, b)
    torch.testing.assert_close(given, product)
    ours = torch.autograd.grad((given * g).sum(), [x, w, bias])
    ref = torch.autograd.grad((product * g).sum(), [x, w, bias])
    for name, a, r in zip(["x", "weight", "bias"], ours, ref):
        torch.testing.assert_close(a, r, msg=name)


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


@pytest.mark.parametrize("ks", [[4, 4, 4], [2, 4, 11]])
def test_fused_tied_reconstruction_matches_the_reference_values_and_gradients(ks):
    from mfr_sae.kernels import tied_topk

    x, w, bias, _ = _inputs()
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
    from mfr_sae.kernels import tied_topk

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


def test_member_mse_is_each_members_mean_squared_error_with_its_gradient():
    from mfr_sae.kernels import member_mse

    x, _, _, dec = _inputs()
    x_hat = dec.detach().clone().requires_grad_()  # [3, 11, 6]: 11 samples of 6 dimensions
    target = x[:11].detach().clone().requires_grad_()
    torch.testing.assert_close(member_mse(x_hat, target), (x_hat - target).pow(2).mean(dim=(1, 2)))
    assert torch.autograd.gradcheck(member_mse, (x_hat, target))
