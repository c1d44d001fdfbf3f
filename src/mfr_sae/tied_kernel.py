"""The tied ensemble's kernel: encoder, selection and the tied decoder (unit-norm encoder rows) in one autograd
function (`tied_topk`), whose backward writes the weight gradient of both ends in one sparse product, with no
dense normalised copy of the weights; with prefix ends (Matryoshka) it reconstructs every prefix at once. Under
`torch.autocast` its products run in the autocast dtype, as the untied kernels' (kernels.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.kernels import Selector, autocast_to, encoder_select, member_offsets, topk_selector
from mfr_sae.row_norms import inverse_norms
from mfr_sae.sparse_grads import add_sparse_product


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
