import torch

from mfr_sae.sparse_grads import gather_rows, given_product


def test_gather_rows_gradient_is_the_rows_alone_and_adds_onto_a_dense_one():
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


def test_given_product_takes_the_gradient_of_the_product_it_was_given(kernel_inputs):
    x, w, bias, _ = kernel_inputs()
    weight, b = w.flatten(0, 1)[:7], bias.flatten()[:7]
    product = torch.addmm(b, x, weight.T)
    g = torch.randn_like(product)
    given = given_product(product.detach(), x, weight, b)
    torch.testing.assert_close(given, product)
    ours = torch.autograd.grad((given * g).sum(), [x, w, bias])
    ref = torch.autograd.grad((product * g).sum(), [x, w, bias])
    for name, a, r in zip(["x", "weight", "bias"], ours, ref):
        torch.testing.assert_close(a, r, msg=name)
