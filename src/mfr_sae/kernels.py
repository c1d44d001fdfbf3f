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


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int, sorted: bool):
        n_members, d_sae, d_in = weight.shape
        pre = torch.baddbmm(bias.unsqueeze(1), x.expand(n_members, *x.shape), weight.transpose(1, 2))
        acts, idx = pre.topk(k, dim=-1, sorted=sorted)
        acts = acts.relu_()
        ctx.save_for_backward(x, weight, acts, idx)
        ctx.mark_non_differentiable(idx)
        return acts, idx

    @staticmethod
    def backward(ctx, grad_acts: Tensor, _grad_idx: Tensor | None):
        x, weight, acts, idx = ctx.saved_tensors
        n_members, d_sae, d_in = weight.shape
        batch = x.shape[0]
        grad = grad_acts * (acts > 0)  # ReLU after TopK
        rows = (idx + member_offsets(n_members, d_sae, idx.device)).reshape(-1)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            cols = torch.arange(batch, device=idx.device).view(1, -1, 1).expand_as(idx).reshape(-1)
            sparse = torch.sparse_coo_tensor(torch.stack([rows, cols]), grad.reshape(-1),
                                             (n_members * d_sae, batch), is_coalesced=False,
                                             check_invariants=False)
            grad_weight = torch.sparse.mm(sparse, x).view_as(weight)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.new_zeros(n_members * d_sae).index_add_(0, rows, grad.reshape(-1))
            grad_bias = grad_bias.view(n_members, d_sae)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(rows.view(-1, idx.shape[-1]), weight.reshape(-1, d_in),
                                     per_sample_weights=grad.reshape(-1, idx.shape[-1]), mode="sum")
            grad_x = grad_x.view(n_members, batch, d_in).sum(0)
        return grad_x, grad_weight, grad_bias, None, None


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """ReLU(TopK(x W^T + b)) for every member at once.

    x [B, d], weight [N, h, d] (one latent per row), bias [N, h] -> (acts [N, B, k], idx [N, B, k]).
    """
    return _TopKEncode.apply(*autocast_to(x, weight, bias), k, sorted)


def sparse_decode(acts: Tensor, idx: Tensor, decoder: Tensor) -> Tensor:
    """sum_j acts[n, b, j] * decoder[n, idx[n, b, j]]: a gather of k rows per sample -> [N, B, d]."""
    n_members, d_sae, d_in = decoder.shape
    acts, decoder = autocast_to(acts, decoder)
    rows = idx + member_offsets(n_members, d_sae, idx.device)
    out = F.embedding_bag(rows.reshape(-1, idx.shape[-1]), decoder.reshape(-1, d_in),
                          per_sample_weights=acts.reshape(-1, idx.shape[-1]), mode="sum")
    return out.view(n_members, -1, d_in)


class _UnitRows(torch.autograd.Function):
    """w / ||w|| per row, with the backward in one expression: (g - (g . u) u) / ||w||."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(weight, dim=-1, keepdim=True).clamp_min_(1e-12)
        unit = weight / norm
        ctx.save_for_backward(unit, norm)
        return unit

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        unit, norm = ctx.saved_tensors
        along = (grad * unit).sum(dim=-1, keepdim=True)
        return grad.addcmul(unit, along, value=-1).div_(norm)


def unit_rows(weight: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (as F.normalize), with a cheaper backward."""
    return _UnitRows.apply(weight)


def reference_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-autograd TopK encoder (dense gradient), the reference for tests."""
    pre = torch.einsum("bd,nhd->nbh", x, weight) + bias.unsqueeze(1)
    acts, idx = pre.topk(k, dim=-1, sorted=True)
    return acts.relu(), idx


def reference_decode(acts: Tensor, idx: Tensor, decoder: Tensor) -> Tensor:
    """Dense decoder: scatter the k activations into [N, B, h] and multiply by the decoder."""
    dense = acts.new_zeros(*acts.shape[:2], decoder.shape[1]).scatter(2, idx, acts)
    return torch.bmm(dense, decoder)
