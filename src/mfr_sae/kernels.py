"""The ensemble's TopK encoder and sparse decoder, with backward passes that stay sparse; the selection of the
latents a member keeps, which every kernel reads; each member's MSE, its backward one pass.

TopK keeps k of h latents per sample, so the gradient with respect to the pre-activations has k
non-zeros per row. Plain autograd scatters it into a dense [N, B, h] tensor and multiplies that with
the input (as costly as the forward product); here the encoder's weight gradient is a sparse-dense
product over the k kept entries (sparse_grads.py), and the decoder is a gather of k rows per sample
(embedding_bag). The tied ensemble's fused kernel: tied_kernel.py.

Under `torch.autocast` both run their products in the autocast dtype (bf16): the inputs are cast once
on the way in, so the fp32 master weights receive fp32 gradients through the casts.

`reference_encode` / `reference_decode` are the plain dense versions, kept for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.sparse_grads import add_sparse_product


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


def reference_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-autograd TopK encoder (dense gradient), the reference for tests."""
    pre = torch.einsum("bd,nhd->nbh", x, weight) + bias.unsqueeze(1)
    acts, idx = pre.topk(k, dim=-1, sorted=True)
    return acts.relu(), idx


def reference_decode(acts: Tensor, idx: Tensor, decoder: Tensor) -> Tensor:
    """Dense decoder: scatter the k activations into [N, B, h] and multiply by the decoder."""
    dense = acts.new_zeros(*acts.shape[:2], decoder.shape[1]).scatter(2, idx, acts)
    return torch.bmm(dense, decoder)
