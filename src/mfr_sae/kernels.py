"""The ensemble's TopK encoder and sparse decoder, with backward passes that stay sparse.

TopK keeps k of h latents per sample, so the gradient with respect to the pre-activations has k
non-zeros per row. Plain autograd scatters it into a dense [N, B, h] tensor and multiplies that with
the input (as costly as the forward product); here the encoder's weight gradient is a sparse-dense
product over the k kept entries, and the decoder is a gather of k rows per sample (embedding_bag).

Under `torch.autocast` both run their products in the autocast dtype (bf16): the inputs are cast once
on the way in, so the fp32 master weights receive fp32 gradients through the casts.

`reference_encode` / `reference_decode` are the plain dense versions, kept for tests and benchmarks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


def autocast_to(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on for their device, else unchanged."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def member_offsets(n_members: int, d_sae: int, device: torch.device) -> Tensor:
    """Row offset of each member in the flattened [N * h, d] weight: [N, 1, 1]."""
    return (torch.arange(n_members, device=device) * d_sae).view(-1, 1, 1)


# Which latents a member keeps, from its pre-activations: pre [B, N, h] (a view) -> (values, latent indices), each
# [N, B, k'] and contiguous; values before the ReLU, a slot that keeps nothing holding a value <= 0. TopK keeps
# each sample's k largest (`topk_selector`); other architectures choose otherwise (architectures.py).
Selector = Callable[[Tensor], tuple[Tensor, Tensor]]


def topk_selector(k: int, sorted: bool = False) -> Selector:
    """Each sample's k largest pre-activations of each member (sorted: in descending order)."""

    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        values, idx = pre.topk(k, dim=-1, sorted=sorted)
        return values.transpose(0, 1).contiguous(), idx.transpose(0, 1).contiguous()

    return select


def also_reading(select: Selector, latents: Tensor) -> tuple[Selector, list[Tensor]]:
    """select, which also copies the pre-activations [B, len(latents)] of these latents (flat: member * h + latent)
    into the list returned beside it, without a gradient (`given_product` gives them one): a fused kernel computes
    every pre-activation anyway, and AuxK wants its dead latents'."""
    read: list[Tensor] = []

    def select_reading(pre: Tensor) -> tuple[Tensor, Tensor]:
        read.append(pre.reshape(len(pre), -1).index_select(1, latents))  # (3x faster than [:, latents])
        return select(pre)

    return select_reading, read


def encoder_select(x: Tensor, weight: Tensor, bias: Tensor, select: Selector) -> tuple[Tensor, Tensor]:
    """The kept latents of x W^T + b per member: x [B, d], weight [N, h, d], bias [N, h] -> (values, idx) [N, B, k'].
    One [B, d] x [d, N h] product for all members (faster on CPU than N batched ones), whose [B, N, h]
    view the selection reads in place."""
    n_members, d_sae, d_in = weight.shape
    pre = torch.addmm(bias.reshape(-1), x, weight.reshape(-1, d_in).t())
    return select(pre.view(len(x), n_members, d_sae))


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, select: Selector) -> tuple[Tensor, Tensor]:
        acts, idx = encoder_select(x, weight, bias, select)
        acts = acts.relu_()
        ctx.save_for_backward(x, weight, acts, idx)
        ctx.mark_non_differentiable(idx)
        return acts, idx

    @staticmethod
    def backward(
        ctx: Any, grad_acts: Tensor, _grad_idx: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        saved: tuple[Tensor, ...] = ctx.saved_tensors
        x, weight, acts, idx = saved
        n_members, d_sae, d_in = weight.shape
        batch = x.shape[0]
        grad = grad_acts * (acts > 0)  # ReLU after TopK
        rows = (idx + member_offsets(n_members, d_sae, idx.device)).reshape(-1)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            cols = torch.arange(batch, device=idx.device).view(1, -1, 1).expand_as(idx).reshape(-1)
            grad_weight = add_sparse_product(x.new_zeros(weight.shape), rows, cols, grad.reshape(-1), x)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.new_zeros(n_members * d_sae).index_add_(0, rows, grad.reshape(-1))
            grad_bias = grad_bias.view(n_members, d_sae)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(
                rows.view(-1, idx.shape[-1]),
                weight.reshape(-1, d_in),
                per_sample_weights=grad.reshape(-1, idx.shape[-1]),
                mode="sum",
            )
            grad_x = grad_x.view(n_members, batch, d_in).sum(0)
        return grad_x, grad_weight, grad_bias, None


# typed: torch's `apply` is not
_topk_encode: Callable[[Tensor, Tensor, Tensor, Selector], tuple[Tensor, Tensor]] = _TopKEncode.apply


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor, select: Selector | int) -> tuple[Tensor, Tensor]:
    """ReLU of the kept pre-activations x W^T + b for every member at once (select: a Selector, or k for TopK).

    x [B, d], weight [N, h, d] (one latent per row), bias [N, h] -> (acts [N, B, k'], idx [N, B, k']).
    """
    x, weight, bias = autocast_to(x, weight, bias)
    return _topk_encode(x, weight, bias, topk_selector(select) if isinstance(select, int) else select)


class _TiedTopK(torch.autograd.Function):
    """Encoder, TopK and the tied decoder (unit-norm encoder rows) in one function, so that the weight
    gradient of both ends is written once: one sparse product over the kept (latent, sample) pairs,

        dL/dw_r = sum_b g_pre[b, r] x_b + sum_b a[b, r] / n_r g_b - w_r / n_r^2 sum_b a[b, r] / n_r (g_b . w_r),

    (n_r = ||w_r||, g_b = dL/dx_hat_b), with no dense normalised copy of the weights in either pass.

    With prefix_ends [G] (Matryoshka: latents [0, end_g) are prefix g) it returns the reconstruction of each
    prefix, [G, N, B, d]: a kept latent of group g (end_{g-1} <= index < end_g) is in prefixes g..G-1, so in the
    backward pass its output gradient is theirs summed (each kept latent reads its own row of those sums)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, select: Selector, mask: Tensor | None, ends: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        n_members, d_sae, d_in = weight.shape
        acts, idx = encoder_select(x, weight, bias, select)
        acts = acts.relu_() if mask is None else acts.relu_().mul_(mask)
        flat = weight.reshape(-1, d_in)
        inv_norm = inverse_norms(flat)
        # only the kept (non-zero) slots, ragged: bag n * B + b holds member n's latents of sample b (BatchTopK
        # keeps from 0 to many per sample; its k' slots per sample are mostly zeros)
        slots = acts.reshape(-1).nonzero().squeeze(1)
        bags = slots.div(idx.shape[-1], rounding_mode="floor")
        rows = (idx + member_offsets(n_members, d_sae, idx.device)).reshape(-1)[slots]
        scaled = acts.reshape(-1)[slots] * inv_norm[rows]  # a / n: the weight of each gathered raw row
        counts = torch.bincount(bags, minlength=n_members * len(x))
        offsets = counts.cumsum(0).sub_(counts)
        if ends is None:
            ctx.groups = None
            x_hat = F.embedding_bag(rows, flat, offsets, per_sample_weights=scaled, mode="sum").view(
                n_members, -1, d_in
            )
        else:
            ctx.groups = torch.bucketize(idx.reshape(-1)[slots], ends, right=True)
            parts = [
                F.embedding_bag(rows, flat, offsets, per_sample_weights=scaled * (ctx.groups == g), mode="sum")
                for g in range(len(ends))
            ]
            x_hat = torch.stack(parts).cumsum(0).view(len(ends), n_members, -1, d_in)
        ctx.save_for_backward(x, weight, rows, bags, offsets, inv_norm, scaled)
        ctx.mark_non_differentiable(acts, idx)
        return x_hat, acts, idx

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor, _grad_acts: Tensor | None, _grad_idx: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        saved: tuple[Tensor, ...] = ctx.saved_tensors
        x, weight, rows, bags, offsets, inv_norm, scaled = saved
        n_members, d_sae, d_in = weight.shape
        batch = x.shape[0]
        flat = weight.reshape(-1, d_in).detach()
        # each kept pair's output row: its sample's (one reconstruction), or its group's sum over prefixes
        if ctx.groups is None:
            grad_rows, outputs = grad_out.reshape(-1, d_in), bags
        else:
            grad_rows = grad_out.flip(0).cumsum(0).flip(0).reshape(-1, d_in)
            outputs = bags + ctx.groups * (n_members * batch)
        dot = bag_dots(grad_rows, flat, rows, offsets, outputs)  # g_b . w_r for every kept pair
        grad_pre = dot * inv_norm[rows]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            along = grad_pre.new_zeros(n_members * d_sae).index_add_(0, rows, scaled * dot)
            # the correction -w_r sum a/n (g . w_r) / n^2 first, then both sparse terms added onto it
            correction = weight.detach() * (along * inv_norm.square()).neg_().view(n_members, d_sae, 1)
            grad_weight = add_sparse_product(
                correction,
                rows.repeat(2),
                torch.cat([bags.remainder(batch), outputs + batch]),
                torch.cat([grad_pre, scaled]),
                torch.cat([x, grad_rows]),
            )
        if ctx.needs_input_grad[2]:
            grad_bias = grad_pre.new_zeros(n_members * d_sae).index_add_(0, rows, grad_pre)
            grad_bias = grad_bias.view(n_members, d_sae)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(rows, flat, offsets, per_sample_weights=grad_pre, mode="sum")
            grad_x = grad_x.view(n_members, batch, d_in).sum(0)
        return grad_x, grad_weight, grad_bias, None, None, None


# typed: torch's `apply` is not
_tied_topk: Callable[
    [Tensor, Tensor, Tensor, Selector, Tensor | None, Tensor | None], tuple[Tensor, Tensor, Tensor]
] = _TiedTopK.apply


def bag_dots(grad: Tensor, weight: Tensor, rows: Tensor, offsets: Tensor, outputs: Tensor) -> Tensor:
    """grad[outputs[i]] . weight[rows[i]] for every entry i of a ragged sum-mode embedding_bag (rows, offsets): the
    gradient of the bag with respect to its per-sample weights, without running its forward again (`outputs`:
    each entry's row of grad, its own bag's or another)."""
    dots: Tensor = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad, weight, rows, offsets, outputs, 0, -1
    )
    return dots


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


def tied_topk(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    select: Selector | int,
    mask: Tensor | None = None,
    prefix_ends: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A tied ensemble's reconstruction: x_hat = sum of the kept ReLU(x W^T + b) (select: a Selector, or k for
    TopK) times the unit-norm rows of W. mask [N, 1, k'] (optional; for TopK the selection must then be sorted)
    zeroes the slots beyond a member's k. -> (x_hat [N, B, d], acts [N, B, k'], idx [N, B, k']); acts and idx
    carry no gradient. prefix_ends [G] (Matryoshka): x_hat [G, N, B, d], the reconstruction of each prefix."""
    x, weight, bias = autocast_to(x, weight, bias)
    if isinstance(select, int):
        select = topk_selector(select, sorted=mask is not None)
    return _tied_topk(x, weight, bias, select, None if mask is None else mask.to(x.dtype), prefix_ends)


def sparse_decode(acts: Tensor, idx: Tensor, decoder: Tensor) -> Tensor:
    """sum_j acts[n, b, j] * decoder[n, idx[n, b, j]]: a gather of k rows per sample -> [N, B, d]."""
    n_members, d_sae, d_in = decoder.shape
    acts, decoder = autocast_to(acts, decoder)
    rows = idx + member_offsets(n_members, d_sae, idx.device)
    out = F.embedding_bag(
        rows.reshape(-1, idx.shape[-1]),
        decoder.reshape(-1, d_in),
        per_sample_weights=acts.reshape(-1, idx.shape[-1]),
        mode="sum",
    )
    return out.view(n_members, -1, d_in)


class _MemberMSE(torch.autograd.Function):
    """Mean squared error of each member's reconstruction, its backward one pass: 2 (x_hat - target) / (B d)."""

    @staticmethod
    def forward(ctx: Any, x_hat: Tensor, target: Tensor) -> Tensor:
        diff = x_hat - target
        ctx.save_for_backward(diff)
        rows = diff.view(len(diff), 1, -1)
        return torch.bmm(rows, rows.transpose(1, 2)).view(-1) / rows.shape[-1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        saved: tuple[Tensor, ...] = ctx.saved_tensors
        (diff,) = saved
        grad_x_hat = diff * (grad * (2 / diff[0].numel())).view(-1, 1, 1)
        return grad_x_hat, -grad_x_hat.sum(0) if ctx.needs_input_grad[1] else None


_member_mse: Callable[[Tensor, Tensor], Tensor] = _MemberMSE.apply  # typed: torch's `apply` is not


def member_mse(x_hat: Tensor, target: Tensor) -> Tensor:
    """x_hat [N, B, d], target [B, d] -> the MSE of each member [N]."""
    return _member_mse(x_hat, target)


class _UnitRows(torch.autograd.Function):
    """w / ||w|| per row, with the backward in one expression: (g - (g . u) u) / ||w||."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        norm: Tensor = torch.linalg.vector_norm(weight, dim=-1, keepdim=True).clamp_min_(1e-12)
        unit = weight / norm
        ctx.save_for_backward(unit, norm)
        return unit

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        saved: tuple[Tensor, ...] = ctx.saved_tensors
        unit, norm = saved
        along = (grad * unit).sum(dim=-1, keepdim=True)
        return grad.addcmul(unit, along, value=-1).div_(norm)


_unit_rows: Callable[[Tensor], Tensor] = _UnitRows.apply  # typed: torch's `apply` is not


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


def inverse_norms(rows: Tensor) -> Tensor:
    """1 / ||row|| of every row [..., d] -> [...] (norms clamped at 1e-12, as F.normalize)."""
    norms: Tensor = torch.linalg.vector_norm(rows, dim=-1)
    return norms.clamp_min_(1e-12).reciprocal_()


def unit_rows(weight: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (as F.normalize), with a cheaper backward."""
    return _unit_rows(weight)


def reference_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-autograd TopK encoder (dense gradient), the reference for tests."""
    pre = torch.einsum("bd,nhd->nbh", x, weight) + bias.unsqueeze(1)
    acts, idx = pre.topk(k, dim=-1, sorted=True)
    return acts.relu(), idx


def reference_decode(acts: Tensor, idx: Tensor, decoder: Tensor) -> Tensor:
    """Dense decoder: scatter the k activations into [N, B, h] and multiply by the decoder."""
    dense = acts.new_zeros(*acts.shape[:2], decoder.shape[1]).scatter(2, idx, acts)
    return torch.bmm(dense, decoder)
