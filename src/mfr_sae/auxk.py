"""AuxK (Gao et al. 2024, appendix A.2): latents that have not fired for a while reconstruct what their member
leaves over, through their own largest pre-activations, so that they take a gradient again.

For member n with dead latents D: e = target - x_hat (no gradient), e_hat = the top min(k_aux, |D|) ReLU'd
pre-activations among D times their unit decoder rows (no b_dec), and loss_n = ||e - e_hat||^2 / ||e - mean(e)||^2
over the batch (the residual's own variance normalises it, as in OpenAI's code and dictionary_learning; SAELens
leaves it unnormalised, sparsify divides by the input's). The trainer adds sae.aux_coef x the mean over members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mfr_sae.ensemble import Ensemble
from mfr_sae.row_norms import unit_rows
from mfr_sae.sparse_grads import gather_rows, given_product


def auxk_loss(
    ensemble: Ensemble, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int, dead_pre: Tensor | None = None
) -> Tensor:
    """The AuxK loss of each member [N]: x [B, d] the input, residual [N, B, d] what each member left over (no
    gradient), dead [N, h] the latents that take part. A member with no dead latent contributes 0. dead_pre [B, R]
    (optional): the dead latents' pre-activations (in the order of dead.flatten().nonzero(), no gradient) as the
    ensemble's forward pass read them (`Ensemble.forward(x, read_latents)`), so that they are not computed again
    (unless they were read in a lower precision than x's, under autocast)."""
    n_members, d_sae = dead.shape
    counts = dead.sum(1)
    width = int(counts.max())
    if not width:
        return x.new_zeros(n_members)
    # the dead rows of all members gathered once, with sparse gradients (a few rows of [N, h, d], added onto the
    # reconstruction's dense ones), then laid out [N, width, ...], each member's block padded, for batched products
    rows = dead.flatten().nonzero().squeeze(1)
    member = rows // d_sae
    slot = member * width + torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[member]
    encoder = gather_rows(ensemble.W_enc, rows)
    decoder = unit_rows(encoder if ensemble.W_dec is None else gather_rows(ensemble.W_dec, rows))

    def padded(values: Tensor, fill: float = 0.0, dim: int = 0) -> Tensor:
        shape = list(values.shape)
        shape[dim] = n_members * width
        out = values.new_full(shape, fill).index_copy(dim, slot, values)
        return out.view(*shape[:dim], n_members, width, *shape[dim + 1 :])

    bias = ensemble.b_enc.flatten()[rows]
    if ensemble.b_dec is not None:  # W (x - b_dec) + b_enc
        bias = bias - (encoder * ensemble.b_dec[member]).sum(-1)
    if dead_pre is not None and dead_pre.dtype != x.dtype:  # read under autocast (bf16): the top k_aux is
        dead_pre = None  # picked among values of the input's precision, as without autocast
    pre = torch.addmm(bias, x, encoder.T) if dead_pre is None else given_product(dead_pre, x, encoder, bias)
    pre = padded(pre, -torch.inf, dim=1).transpose(0, 1)  # [N, B, width]; padding: -inf, never kept
    decoder = padded(decoder)  # [N, width, d]
    dtype = torch.promote_types(residual.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # the error in fp32
        pre, decoder, residual = pre.to(dtype), decoder.to(dtype), residual.to(dtype)
        error = _reconstruction_error(pre, decoder, residual, k_aux)
        spread = torch.linalg.vector_norm(residual - residual.mean(1, keepdim=True), dim=(1, 2)).square()
    loss: Tensor = error.clamp_min(0) * (counts > 0) / spread.clamp_min(torch.finfo(dtype).tiny)
    return loss  # (rounding could take the expanded error a hair below 0)


class _ReconstructionError(torch.autograd.Function):
    """||A D - e||^2 per member, A the ReLU of each sample's k_aux largest of pre [N, B, width], D [N, width, d] unit
    rows, e [N, B, d] (no gradient), with the backward written out: while width <= d, as <A, A G - 2 e D^T> + ||e||^2
    (G = D D^T), so that no [N, B, d] tensor is formed; past that directly (the gram would cost B width^2)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, decoder: Tensor, residual: Tensor, k_aux: int) -> Tensor:
        if k_aux < pre.shape[2]:
            values, idx = pre.topk(k_aux, dim=2)
            acts = torch.zeros_like(pre).scatter_(2, idx, values.relu_())
        else:
            acts = pre.relu()
        ctx.gram = pre.shape[2] <= residual.shape[2]
        error: Tensor
        if ctx.gram:
            along = torch.bmm(residual, decoder.transpose(1, 2))  # e D^T [N, B, width]
            fit = torch.bmm(acts, torch.bmm(decoder, decoder.transpose(1, 2))).sub_(along)  # A G - e D^T
            norm = torch.linalg.vector_norm(residual, dim=(1, 2))
            error = (acts * (fit - along)).sum((1, 2)) + norm.square()
        else:
            fit = torch.bmm(acts, decoder).sub_(residual)  # A D - e [N, B, d]
            error = torch.linalg.vector_norm(fit, dim=(1, 2)).square()
        ctx.save_for_backward(acts, decoder, residual, fit)
        return error

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        saved: tuple[Tensor, ...] = ctx.saved_tensors
        acts, decoder, residual, fit = saved
        scale = 2 * grad.view(-1, 1, 1)
        if ctx.gram:  # d/dA = 2 (A G - e D^T), d/dD = 2 (A^T A D - A^T e)
            grad_acts = fit * scale
            grad_decoder = torch.bmm(torch.bmm(acts.transpose(1, 2), acts), decoder)
            grad_decoder = grad_decoder.sub_(torch.bmm(acts.transpose(1, 2), residual)).mul_(scale)
        else:  # d/dA = 2 (A D - e) D^T, d/dD = 2 A^T (A D - e)
            grad_acts = torch.bmm(fit, decoder.transpose(1, 2)).mul_(scale)
            grad_decoder = torch.bmm(acts.transpose(1, 2), fit).mul_(scale)
        return grad_acts.masked_fill_(acts <= 0, 0), grad_decoder, None, None  # A > 0: kept, and past the ReLU


_reconstruction_error: Callable[[Tensor, Tensor, Tensor, int], Tensor] = _ReconstructionError.apply
