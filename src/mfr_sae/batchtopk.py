"""BatchTopK (Bussmann et al. 2024): in training each member keeps the k x B largest ReLU'd pre-activations of a
batch of B vectors (k per sample on average, more where a sample needs them); saved as a JumpReLU SAE that keeps
the pre-activations above one threshold per member, estimated during training: the smallest positive activation
the first batch kept, then a running mean of each batch's at rate 0.01 a step (SAELens's rate; its start at 0 would
leave a short run's threshold far too low; dictionary_learning starts as here). Across data-parallel replicas the
batch is each process's slice of it (as with DDP in SAELens), and the threshold the same on all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mfr_sae.architectures import Architecture, register
from mfr_sae.kernels import Selector

if TYPE_CHECKING:  # (distributed imports the config, which imports this)
    from mfr_sae.distributed import Shard
    from mfr_sae.ensemble import Ensemble

THRESHOLD_RATE = 0.01  # SAELens's topk_threshold_lr
UNSET = -1.0  # a threshold not yet estimated (JumpReLU with it is ReLU)


def batch_topk(pre: Tensor, ks: list[int]) -> tuple[Tensor, Tensor]:
    """pre [B, N, h] -> each member's k_n x B largest ReLU'd entries over the batch, as (values, idx) [N, B, k'],
    the kept ones first in each sample and zeros after them (k': the most any sample keeps). Each sample's best
    k_cap are the candidates, k_cap doubled until no sample can hold a kept entry beyond them: exact."""
    batch, n_members, d_sae = pre.shape
    k_cap = min(d_sae, 2 * max(ks))
    while True:
        values, idx = pre.topk(k_cap, dim=-1)  # sorted: each sample's candidates in descending order
        values, idx = values.transpose(0, 1).relu(), idx.transpose(0, 1)  # [N, B, k_cap]
        flat = values.reshape(n_members, -1)
        chosen = [flat[n].topk(k * batch) for n, k in enumerate(ks)]
        lowest = torch.stack([c.values[-1] for c in chosen])  # the smallest kept value of each member
        last = values[..., -1]  # a sample's entries beyond its candidates are at most its last one
        if k_cap == d_sae or bool(((last < lowest[:, None]) | (last <= 0)).all()):
            break
        k_cap = min(d_sae, 2 * k_cap)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    for n, c in enumerate(chosen):
        kept[n, c.indices] = True
    kept = kept.view_as(values)
    order = kept.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)  # kept first, in value order
    width = max(int(kept.sum(-1).max()), 1)
    order = order[..., :width]
    values = values.gather(-1, order) * kept.gather(-1, order)
    return values.contiguous(), idx.gather(-1, order).contiguous()


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

    def selector(self, ensemble: Ensemble) -> tuple[Selector, Tensor | None]:
        if ensemble.training:
            return (lambda pre: batch_topk(pre, ensemble.ks)), None
        return (lambda pre: jumprelu(pre, ensemble.threshold)), None

    @torch.no_grad()
    def after_step(self, ensemble: Ensemble, acts: Tensor, shard: Shard) -> None:
        """The threshold's running mean moves towards the smallest positive activation each member kept."""
        smallest = torch.where(acts > 0, acts, torch.inf).flatten(1).amin(1).float()
        smallest = shard.min_replicas(smallest)
        fired = torch.isfinite(smallest)  # a member that kept nothing positive leaves its threshold
        threshold = ensemble.threshold
        moved = torch.where(threshold == UNSET, smallest, threshold + THRESHOLD_RATE * (smallest - threshold))
        threshold.copy_(torch.where(fired, moved, threshold))

    def saelens_fields(self, ensemble: Ensemble, i: int) -> dict[str, object]:
        return {}

    def saved_tensors(self, ensemble: Ensemble, i: int) -> dict[str, Tensor]:
        """SAELens's JumpReLU keeps one threshold per latent: the member's one, repeated."""
        return {"threshold": ensemble.threshold[i].expand(ensemble.d_sae)}

    def load_tensors(self, ensemble: Ensemble, i: int, tensors: dict[str, Tensor]) -> None:
        ensemble.threshold[i] = tensors["threshold"].max()
