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
from mfr_sae.kernels import unit_rows


def auxk_loss(ensemble: Ensemble, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """The AuxK loss of each member [N]: x [B, d] the input, residual [N, B, d] what each member left over (no
    gradient), dead [N, h] the latents that take part. A member with no dead latent contributes 0."""
    # the dead rows of all members gathered once (one gather, one gradient written back), member by member
    rows = dead.flatten().nonzero().squeeze(1)
    encoder = ensemble.W_enc.flatten(0, 1)[rows]
    decoder = encoder if ensemble.W_dec is None else ensemble.W_dec.flatten(0, 1)[rows]
    bias = ensemble.b_enc.flatten()[rows]
    decoder = unit_rows(decoder)
    dtype = torch.promote_types(residual.dtype, torch.float32)  # bf16 products (autocast): summed in fp32
    losses, start = [], 0
    for n, count in enumerate(dead.sum(1).tolist()):
        if not count:
            losses.append(x.new_zeros((), dtype=dtype))
            continue
        block = slice(start, start + count)
        start += count
        inputs = x if ensemble.b_dec is None else x - ensemble.b_dec[n]
        pre = torch.addmm(bias[block], inputs, encoder[block].T)  # [B, count]
        acts, idx = pre.topk(min(k_aux, count), dim=1)
        # a dense product: k_aux (d / 2) is near the number of dead latents, where a gather of rows is slower
        e_hat = torch.zeros_like(pre).scatter(1, idx, acts.relu()) @ decoder[block]
        e = residual[n].to(dtype)
        spread = (e - e.mean(0)).pow(2).sum().clamp_min(torch.finfo(dtype).tiny)
        losses.append((e_hat.to(dtype) - e).pow(2).sum() / spread)
    return torch.stack(losses)
