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
from torch.nn import functional as F

from mfr_sae.ensemble import Ensemble
from mfr_sae.kernels import gather_rows, unit_rows


def auxk_loss(ensemble: Ensemble, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """The AuxK loss of each member [N]: x [B, d] the input, residual [N, B, d] what each member left over (no
    gradient), dead [N, h] the latents that take part. A member with no dead latent contributes 0."""
    # the dead rows of all members gathered once (one gather, one gradient written back), member by member
    # (sparse gradients: a few rows of [N, h, d], added onto the reconstruction's dense ones)
    rows = dead.flatten().nonzero().squeeze(1)
    encoder = gather_rows(ensemble.W_enc, rows)
    decoder = encoder if ensemble.W_dec is None else gather_rows(ensemble.W_dec, rows)
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
        if k_aux < count:  # each sample's k_aux largest (with fewer dead latents, all of them)
            acts, idx = pre.topk(k_aux, dim=1)
            pre = torch.zeros_like(pre).scatter(1, idx, acts)
        # a dense product: k_aux (d / 2) is near the number of dead latents, where a gather of rows is slower
        e_hat = pre.relu() @ decoder[block]
        losses.append(F.mse_loss(e_hat.to(dtype), residual[n].to(dtype), reduction="sum"))
    residual = residual.to(dtype)
    spread = (residual - residual.mean(1, keepdim=True)).pow(2).sum((1, 2))  # the residual's variance, x B d
    return torch.stack(losses) / spread.clamp_min(torch.finfo(dtype).tiny)
