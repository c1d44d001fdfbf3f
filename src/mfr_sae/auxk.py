"""AuxK (Gao et al. 2024, appendix A.2): latents that have not fired for a while reconstruct what their member
leaves over, through their own largest pre-activations, so that they take a gradient again.

For member n with dead latents D: e = target - x_hat (no gradient), e_hat = the top min(k_aux, |D|) ReLU'd
pre-activations among D times their unit decoder rows (no b_dec), and loss_n = ||e - e_hat||^2 / ||e - mean(e)||^2
over the batch (the residual's own variance normalises it, as in OpenAI's code and dictionary_learning; SAELens
leaves it unnormalised, sparsify divides by the input's). The trainer adds sae.aux_coef x the mean over members.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mfr_sae.ensemble import Ensemble
from mfr_sae.kernels import gather_rows, given_product, unit_rows


def auxk_loss(
    ensemble: Ensemble, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int, dead_pre: Tensor | None = None
) -> Tensor:
    """The AuxK loss of each member [N]: x [B, d] the input, residual [N, B, d] what each member left over (no
    gradient), dead [N, h] the latents that take part. A member with no dead latent contributes 0. dead_pre [B, R]
    (optional): the dead latents' pre-activations (in the order of dead.flatten().nonzero(), no gradient) as the
    ensemble's forward pass read them (`Ensemble.forward(x, read_latents)`), so that they are not computed again."""
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
    pre = torch.addmm(bias, x, encoder.T) if dead_pre is None else given_product(dead_pre, x, encoder, bias)
    pre = padded(pre, -torch.inf, dim=1).transpose(0, 1)  # [N, B, width]; padding: -inf, never kept
    if k_aux < width:  # each sample's k_aux largest (with fewer dead latents, all of them)
        acts, idx = pre.topk(k_aux, dim=2)
        pre = torch.zeros_like(pre).scatter(2, idx, acts)
    acts, decoder = pre.relu(), padded(decoder)  # [N, B, width], [N, width, d]
    dtype = torch.promote_types(residual.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # the error in fp32
        acts, decoder, residual = acts.to(dtype), decoder.to(dtype), residual.to(dtype)
        if width <= residual.shape[-1]:
            # ||e_hat - e||^2 = <A, A G - 2 e D^T> + ||e||^2 with e_hat = A D, G = D D^T [N, width, width]: no
            # [N, B, d] tensor formed (the cheaper way while the dead latents are fewer than d)
            along = torch.bmm(residual, decoder.transpose(1, 2))  # e D^T [N, B, width]
            gram = torch.bmm(decoder, decoder.transpose(1, 2))
            norm = torch.linalg.vector_norm(residual, dim=(1, 2))
            error = (acts * (torch.bmm(acts, gram) - 2 * along)).sum((1, 2)) + norm.square()
        else:  # the gram would cost B width^2
            error = torch.linalg.vector_norm(torch.bmm(acts, decoder) - residual, dim=(1, 2)).square()
        spread = torch.linalg.vector_norm(residual - residual.mean(1, keepdim=True), dim=(1, 2)).square()
    loss: Tensor = error.clamp_min(0) * (counts > 0) / spread.clamp_min(torch.finfo(dtype).tiny)
    return loss  # (rounding could take the expanded error a hair below 0)
