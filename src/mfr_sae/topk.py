"""TopK (Gao et al. 2024; the paper's SAE): each sample keeps each member's k largest pre-activations, in training
and once saved. Members may differ in k: the slots beyond a member's own k are masked."""

from __future__ import annotations

from torch import Tensor

from mfr_sae.architecture import Architecture, Members, register
from mfr_sae.kernels import Selector, topk_selector


@register
class TopK(Architecture):
    name = "topk"
    saved_as = "topk"

    def selector(self, ensemble: Members) -> tuple[Selector, Tensor | None]:
        uniform = len(set(ensemble.ks)) == 1
        return topk_selector(ensemble.k_max, sorted=not uniform), None if uniform else ensemble.k_mask

    def saelens_fields(self, ensemble: Members, i: int) -> dict[str, object]:
        return {"k": ensemble.ks[i], "rescale_acts_by_decoder_norm": False}
