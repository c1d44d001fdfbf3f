"""BatchTopK (Bussmann et al. 2024): in training each member keeps the k x B largest ReLU'd pre-activations of a
batch of B vectors (k per sample on average, more where a sample needs them); saved as a JumpReLU SAE that keeps
the pre-activations above one threshold per member, estimated during training: the smallest positive activation
the first batch kept, then a running mean of each batch's at rate 0.01 a step (SAELens's rate; its start at 0 would
leave a short run's threshold far too low; dictionary_learning starts as here). Across data-parallel replicas the
batch is each process's slice of it (as with DDP in SAELens), and the threshold the same on all.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.architecture import Architecture, Members, Replicas, register
from mfr_sae.kernels import Selector

THRESHOLD_RATE = 0.01  # SAELens's topk_threshold_lr
UNSET = -1.0  # a threshold not yet estimated (JumpReLU with it is ReLU)


def batch_topk(pre: Tensor, ks: list[int]) -> tuple[Tensor, Tensor]:
    """pre [B, N, h] -> each member's k_n x B largest ReLU'd entries over the batch, as (values, idx) [N, B, k'],
    the kept ones first in each sample and zeros after them (k': the most any sample keeps; entries tied with the
    k_n x B-th are all kept). Each sample's best 2 max(k) are the candidates; the member's threshold is the
    k_n x B-th largest candidate, exact once no sample has an entry at or above it beyond its candidates: the few
    samples that might get more candidates (their own top-k again, twice as wide) until none does."""
    batch, n_members, d_sae = pre.shape
    k_cap = min(d_sae, 2 * max(ks))
    values, idx = pre.topk(k_cap, dim=-1)  # sorted: each sample's candidates in descending order
    values = values.relu_()
    while True:
        flat = values.transpose(0, 1).reshape(n_members, -1)
        threshold = torch.stack([flat[n].kthvalue(flat.shape[1] - k * batch + 1).values for n, k in enumerate(ks)])
        last = values[..., -1]  # a sample's entries beyond its candidates are at most its last one
        wider = (last >= threshold) & (last > 0)  # [B, N]: samples that may keep more than their candidates
        if k_cap == d_sae or not bool(wider.any()):
            break
        k_cap = min(d_sae, 2 * k_cap)
        values, idx = F.pad(values, (0, k_cap - values.shape[-1])), widened(idx, k_cap, d_sae)
        values[wider], idx[wider] = pre[wider].topk(k_cap, dim=-1)
        values[wider] = values[wider].relu_()
    kept = (values >= threshold.unsqueeze(-1)) & (values > 0)  # a prefix of each sample's sorted candidates
    width = max(int(kept.sum(-1).max()), 1)
    values = (values * kept)[..., :width].transpose(0, 1).contiguous()
    return values, idx[..., :width].transpose(0, 1).contiguous()


def widened(idx: Tensor, width: int, d_sae: int) -> Tensor:
    """idx [..., c] (distinct latents in each row) -> [..., width]: the same, then the lowest latents not among
    them (slots that keep nothing still name distinct latents, as a top-k's do)."""
    c = idx.shape[-1]
    span = min(d_sae, width + c)  # holds width - c latents outside the row's c
    taken = idx.new_zeros(*idx.shape[:-1], span + 1, dtype=torch.bool)
    taken.scatter_(-1, idx.clamp_max(span), True)  # latents >= span land on the extra last column
    free = (~taken[..., :span]).to(torch.uint8).argsort(dim=-1, descending=True, stable=True)  # ascending latents
    return torch.cat([idx, free[..., : width - c]], dim=-1)


def jumprelu(pre: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """pre [B, N, h] -> the entries above each member's threshold [N] (ReLU'd: SAELens's JumpReLU), as (values,
    idx) [N, B, k'] with zeros after the kept ones (k': the most any sample keeps)."""
    floor = threshold.clamp_min(0).view(1, -1, 1)
    width = max(int((pre > floor).sum(-1).max()), 1)
    values, idx = pre.topk(width, dim=-1)
    keep = values > floor
    return (values * keep).transpose(0, 1).contiguous(), idx.transpose(0, 1).contiguous()


@register
class BatchTopK(Architecture):
    name = "batchtopk"
    saved_as = "jumprelu"

    def state(self, n_members: int) -> dict[str, Tensor]:
        return {"threshold": torch.full((n_members,), UNSET)}

    def selector(self, ensemble: Members) -> tuple[Selector, Tensor | None]:
        if ensemble.training:
            return (lambda pre: batch_topk(pre, ensemble.ks)), None
        return (lambda pre: jumprelu(pre, ensemble.get_buffer("threshold"))), None

    @torch.no_grad()
    def after_step(self, ensemble: Members, acts: Tensor, replicas: Replicas) -> None:
        """The threshold's running mean moves towards the smallest positive activation each member kept."""
        smallest = torch.where(acts > 0, acts, torch.inf).flatten(1).amin(1).float()
        smallest = replicas.min_replicas(smallest)
        fired = torch.isfinite(smallest)  # a member that kept nothing positive leaves its threshold
        threshold = ensemble.get_buffer("threshold")
        moved = torch.where(threshold == UNSET, smallest, threshold + THRESHOLD_RATE * (smallest - threshold))
        threshold.copy_(torch.where(fired, moved, threshold))

    def saelens_fields(self, ensemble: Members, i: int) -> dict[str, object]:
        return {}

    def saved_tensors(self, ensemble: Members, i: int) -> dict[str, Tensor]:
        """SAELens's JumpReLU keeps one threshold per latent: the member's one, repeated."""
        return {"threshold": ensemble.get_buffer("threshold")[i].expand(ensemble.d_sae)}

    def load_tensors(self, ensemble: Members, i: int, tensors: dict[str, Tensor]) -> None:
        ensemble.get_buffer("threshold")[i] = tensors["threshold"].max()
