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
from mfr_sae.kernels import unit_rows


def auxk_loss(ensemble: Ensemble, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """The AuxK loss of each member [N]: x [B, d] the input, residual [N, B, d] what each member left over (no
    gradient), dead [N, h] the latents that take part. A member with no dead latent contributes 0."""
    losses = []
    for n in range(ensemble.n_members):
        rows = dead[n].nonzero().squeeze(1)
        if not len(rows):
            losses.append(x.new_zeros(()))
            continue
        inputs = x if ensemble.b_dec is None else x - ensemble.b_dec[n]
        pre = torch.addmm(ensemble.b_enc[n, rows], inputs, ensemble.W_enc[n, rows].T)  # [B, |D|]
        acts, idx = pre.topk(min(k_aux, len(rows)), dim=1)
        decoder = unit_rows(ensemble.decoder_weight[n, rows])
        e_hat = F.embedding_bag(idx, decoder, per_sample_weights=acts.relu(), mode="sum")
        dtype = torch.promote_types(residual.dtype, torch.float32)  # bf16 products (autocast): summed in fp32
        e = residual[n].to(dtype)
        spread = (e - e.mean(0)).pow(2).sum().clamp_min(torch.finfo(dtype).tiny)
        losses.append((e_hat.to(dtype) - e).pow(2).sum() / spread)
    return torch.stack(losses)
