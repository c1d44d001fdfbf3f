"""Gradients that stay sparse: out + S @ dense for a sparse S, one CSR product (`add_sparse_product`, the kernels'
weight gradients; `csr_matrix`); rows gathered with a sparse gradient (`gather_rows`); and the gradient of a
product whose value was computed elsewhere (`given_product`: the pre-activations a fused kernel read for AuxK).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def add_sparse_product(out: Tensor, rows: Tensor, cols: Tensor, values: Tensor, dense: Tensor) -> Tensor:
    """out + S @ dense, out [..., d] taken as its rows [R, d], S [R, len(dense)] the sparse matrix of
    the (row, col, value) entries (distinct, the columns of each row listed ascending: a stable sort by row keeps
    them so), in out's dtype and shape. S is taken as CSR: its product is one MKL/cuSPARSE call (2x a COO
    product here), added onto out in place. MKL has no bf16 sparse product: under CPU autocast the sum is taken
    in fp32. The result is out itself, not a view of it, where the dtype allows: autograd adds a sparse gradient
    onto a weight's dense one in place only then (onto a view it copies the whole weight)."""
    dtype = out.dtype
    if out.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    result = out.to(dtype).contiguous()
    flat = result.view(-1, out.shape[-1])
    order = torch.argsort(rows, stable=True)
    crow = rows.new_zeros(len(flat) + 1)
    torch.cumsum(torch.bincount(rows, minlength=len(flat)), 0, out=crow[1:])
    sparse = csr_matrix(crow, cols[order], values[order].to(dtype), (len(flat), len(dense)))
    flat.addmm_(sparse, dense.to(dtype))
    return result.to(out.dtype)


def csr_matrix(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """torch.sparse_csr_tensor without its warning that CSR support is in beta (and without invariant checks:
    the callers build valid ones)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _GatherRows(torch.autograd.Function):
    """weight [..., d] -> its rows at the flat indices `rows` [R, d], whose gradient is sparse: a dense one would
    zero and add a whole weight-sized tensor for a few rows (AuxK's dead latents)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.shape = weight.shape
        ctx.save_for_backward(rows)
        return weight.reshape(-1, weight.shape[-1])[rows]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        shape = ctx.shape
        indices = torch.stack(torch.unravel_index(rows, shape[:-1])) if len(shape) > 2 else rows.unsqueeze(0)
        return torch.sparse_coo_tensor(indices, grad, shape, is_coalesced=True, check_invariants=False), None


_gather_rows: Callable[[Tensor, Tensor], Tensor] = _GatherRows.apply  # typed: torch's `apply` is not


class _GivenProduct(torch.autograd.Function):
    """x W^T + b as computed elsewhere (`value`, without a gradient), given the gradient of that product."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None, Tensor | None]:
        saved: tuple[Tensor, ...] = ctx.saved_tensors
        x, weight = saved
        grad = grad.to(weight.dtype)  # under autocast the value's dtype; the weights' gradients in theirs
        grad_x = grad @ weight if ctx.needs_input_grad[1] else None
        grad_weight = grad.T @ x.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return None, grad_x, grad_weight, grad.sum(0) if ctx.needs_input_grad[3] else None


_given_product: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = _GivenProduct.apply  # typed: `apply` is not


def given_product(value: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """value [B, R] = x [B, d] weight^T [d, R] + bias [R], already computed (`also_reading`), with the gradient of
    the product with respect to x, weight and bias: its forward is not run again."""
    return _given_product(value, x, weight, bias)


def gather_rows(weight: Tensor, rows: Tensor) -> Tensor:
    """weight.flatten(0, -2)[rows] for distinct rows in increasing order, with a sparse gradient (the rows
    alone): added onto a dense gradient it costs the rows, not the weight; alone, `.grad` is sparse."""
    return _gather_rows(weight, rows)
