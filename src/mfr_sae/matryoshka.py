"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose latents are nested prefixes
([0, w_1), [0, w_2), ..., [0, h)); in training each prefix reconstructs the input from its own latents alone and
the loss is the mean over prefixes of their MSE (SAELens sums them; the mean keeps the loss, and beta=auto, on
the scale of one reconstruction), so that the first latents learn the most general features. Saved as BatchTopK
is: a JumpReLU SAE (the widths only under `mfr_sae` in cfg.json)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mfr_sae.architecture import Members, register
from mfr_sae.batchtopk import BatchTopK


def prefix_widths(d_sae: int, widths: Sequence[int]) -> list[int]:
    """The prefixes' widths: as given, with d_sae last (added if missing); none given: h/16, h/4, h (those of them
    that are at least 1 and below h: a small h has fewer prefixes)."""
    if widths:
        chosen = list(widths) if widths[-1] == d_sae else [*widths, d_sae]
    else:
        chosen = sorted({w for w in (d_sae // 16, d_sae // 4) if 0 < w < d_sae}) + [d_sae]
    if any(w <= 0 for w in chosen) or any(a >= b for a, b in zip(chosen, chosen[1:])):
        raise ValueError(f"sae.matryoshka_widths={list(widths)}: must increase strictly within 1..{d_sae}")
    return chosen


@register
class Matryoshka(BatchTopK):
    name = "matryoshka"

    @dataclass
    class Options:
        widths: list[int] = field(default_factory=list)
        """the nested prefixes' widths, increasing, d_sae last (added if missing); empty: d_sae/16, d_sae/4,
        d_sae."""

    def __init__(self, d_sae: int, options: Mapping[str, Any] | None = None):
        super().__init__(d_sae, options)
        self.opts.widths = prefix_widths(d_sae, self.opts.widths)

    def prefix_ends(self, ensemble: Members) -> Tensor | None:
        if not ensemble.training:  # as saved: one reconstruction
            return None
        return torch.tensor(self.opts.widths, device=ensemble.W_enc.device)
