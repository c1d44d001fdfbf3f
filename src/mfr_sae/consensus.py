"""The consensus of an ensemble: one decoder from the aligned members.

Every member is matched one-to-one to member 0 (`metrics.hungarian_matches`); a latent of member 0 whose
partner in EVERY other member is at cosine >= `min_cosine` is a feature the members agree on, and its row
becomes the normalised mean of the matched rows (the members' independent errors partly cancel); the other
rows stay member 0's. Independently initialised members that agree are evidence of a real feature, so the
consensus may recover the truth better than any one member (issue 26 asks whether it does: the study
measures `consensus_mcc` for every setting, the baseline's independent members included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mfr_sae.metrics import ground_truth_metrics, hungarian_matches

AGREE_COSINE = 0.9  # the cosine at which two latents are the same feature (as twin_frac's threshold)


@torch.no_grad()
def consensus_decoder(decoder: Tensor, min_cosine: float = AGREE_COSINE) -> tuple[Tensor, Tensor]:
    """(the consensus rows [h, d], unit norm; which rows all members agree on [h] bool) of the decoders
    [N, h, d] of one ensemble (members of one size)."""
    unit = F.normalize(decoder.detach().float(), dim=-1)
    total, agreed = unit[0].clone(), torch.ones(len(unit[0]), dtype=torch.bool, device=unit.device)
    matchings = hungarian_matches([(unit[0], member, False) for member in unit[1:]])
    for member, (rows, cols, cosines) in zip(unit[1:], matchings):
        rows_t, cols_t = torch.from_numpy(rows).to(unit.device), torch.from_numpy(cols).to(unit.device)
        total[rows_t] += member[cols_t]
        agrees = torch.zeros_like(agreed)
        agrees[rows_t] = torch.from_numpy(cosines >= min_cosine).to(unit.device)
        agreed &= agrees
    return torch.where(agreed.unsqueeze(1), F.normalize(total, dim=-1), unit[0]), agreed


def consensus_mcc(decoder: Tensor, truth: Tensor, min_cosine: float = AGREE_COSINE) -> float:
    """MCC to the true features [n, d] of the consensus of the decoders [N, h, d]."""
    return ground_truth_metrics(consensus_decoder(decoder, min_cosine)[0], truth.to(decoder.device))["gt_mcc"]
