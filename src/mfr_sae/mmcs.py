"""MMCS between the decoders of an ensemble's members (docs/design.md section 4), and its matched form.

MMCS(a, b) = (mean_i max_j cos(A_i, B_j) + mean_j max_i cos(A_i, B_j)) / 2 (`max`), or the mean cosine of another
matching of the rows (matching.py). The gradient of a max flows only through its arg-max, so it splits in two:
the matching, without autograd (matching.py), and the mean cosine of the matched rows, sum(D * (L @ D)) over the
links L the matches make (links.py). With the matches of the current weights this is exactly the mean pairwise
MMCS (`matched_mmcs`); `dense_mmcs` is the naive reference (full h x h similarities with autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mfr_sae.links import linked_similarity, links_between
from mfr_sae.matching import match_all, member_pairs


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
    """Mean over member pairs of MMCS, `max` and `hungarian` variants (None for a single member)."""
    if len(decoder) < 2:
        return {"pairwise_mmcs": None, "pairwise_mmcs_hungarian": None}
    return {
        f"pairwise_mmcs{suffix}": matched_mmcs(decoder, match_all(decoder, mode)).item()
        for suffix, mode in [("", "max"), ("_hungarian", "hungarian")]
    }
