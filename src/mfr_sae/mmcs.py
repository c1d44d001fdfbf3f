"""MMCS between the decoders of an ensemble's members (docs/design.md section 4), and its matched form.

MMCS(a, b) = (mean_i max_j cos(A_i, B_j) + mean_j max_i cos(A_i, B_j)) / 2 (`max`), or the mean cosine of another
matching of the rows (matching.py). The gradient of a max flows only through its arg-max, so it splits in two:
the matching, without autograd (matching.py), and the mean cosine of the matched rows, sum(D * (L @ D)) over the
links L the matches make (links.py). With the matches of the current weights this is exactly the mean pairwise
MMCS (`matched_mmcs`); `dense_mmcs` is the naive reference (full h x h similarities with autograd).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.links import linked_similarity, links_between
from mfr_sae.matching import match_all, member_pairs

AGREED_COSINE = 0.8  # a latent agrees with another member at this cosine: mfr.confirm_cosine's default


def matched_mmcs(weight: Tensor, matches: Tensor) -> Tensor:
    """Mean over member pairs of MMCS from fixed matches ([P, 2, h], `match_all`), differentiable; weight
    [N, h, d]: decoder rows of any norm (the cosines are taken of their directions). O(P h d)."""
    n, h, d = weight.shape
    links = links_between(dict(zip(member_pairs(n), matches)), range(n), range(n), h, len(matches), weight.device)
    return linked_similarity(weight, links.matmul_unit(weight.detach().reshape(-1, d))).sum()


def dense_mmcs(decoder: Tensor, min_cosine: float = -1.0) -> Tensor:
    """The naive `max` MMCS of every member pair, full similarity matrices with autograd: [P]. Thresholded
    form: a max cosine below min_cosine counts 0."""

    def kept_mean(best: Tensor) -> Tensor:
        return best.masked_fill(best < min_cosine, 0).mean() if min_cosine > -1 else best.mean()

    per_pair = []
    for a, b in member_pairs(len(decoder)):
        sims = decoder[a] @ decoder[b].T
        per_pair.append((kept_mean(sims.max(dim=1).values) + kept_mean(sims.max(dim=0).values)) / 2)
    return torch.stack(per_pair)


@torch.no_grad()
def pairwise_mmcs(decoder: Tensor) -> dict[str, float | None]:
    """Mean over member pairs of MMCS, `max` and `hungarian` variants, and `agreed_frac` (None for a single
    member)."""
    if len(decoder) < 2:
        return {"pairwise_mmcs": None, "pairwise_mmcs_hungarian": None, "agreed_frac": None}
    best = match_all(decoder, "max")  # each row's best partner in the other member of each pair
    return {
        "pairwise_mmcs": matched_mmcs(decoder, best).item(),
        "pairwise_mmcs_hungarian": matched_mmcs(decoder, match_all(decoder, "hungarian")).item(),
        "agreed_frac": agreed_fraction(decoder, best),
    }


@torch.no_grad()
def agreed_fraction(decoder: Tensor, best: Tensor | None = None, cosine: float = AGREED_COSINE) -> float:
    """Share of all members' latents [N, h, d] that some latent of another member is at cosine >= `cosine` with:
    what MFR's confirmation counts as confirmed, measured alike with the penalty on or off (the baseline's own
    agreement), so that both arms' learning curves show when the members come to agree. best: the `max` matches
    ([P, 2, h], `match_all`; made here when not given): each row's best partner, whose cosine is its largest."""
    best = match_all(decoder, "max") if best is None else best
    unit = F.normalize(decoder.float(), dim=-1)
    top = torch.full(decoder.shape[:2], -math.inf, device=decoder.device)
    for (a, b), (a_to_b, b_to_a) in zip(member_pairs(len(decoder)), best):
        top[a] = top[a].maximum((unit[a] * unit[b][a_to_b]).sum(-1))
        top[b] = top[b].maximum((unit[b] * unit[a][b_to_a]).sum(-1))
    return (top >= cosine).float().mean().item()
