"""Absorption of each scored word and the means over letters, as SAEBench 0.6.0 computes them.

sae_bench/evals/absorption/feature_absorption_calculator.py (per word; its loop over words done here on all the
words of a letter at once) and main.py (per letter, then the means over letters).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import Tensor

EPS = 1e-8  # feature_absorption_calculator.py:17: a main latent below this has not fired
FULL_COS = 0.025  # feature_absorption.py:35 (FULL_ABSORPTION_PROBE_COS_THRESHOLD): the top latent's probe cosine
FRACTION_COS = 0.1  # feature_absorption.py:38 (ABSORPTION_FRACTION_PROBE_COS_THRESHOLD): an absorber's probe cosine
SHARE = 0.4  # feature_absorption.py:41 (ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD): absorbers' share
MAX_ABSORBERS = 3  # feature_absorption.py:44 (ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS)


def word_absorption(
    acts: Tensor, latents: Tensor, probe_direction: Tensor, decoder: Tensor, main: list[int]
) -> tuple[list[float], list[bool]]:
    """(absorption fraction, full absorption) of each word, from its model activation [n, d], its SAE latents
    [n, h], the letter's probe direction [d], the decoder rows [h, d] and the letter's main latents."""
    direction = probe_direction.float() / probe_direction.float().norm()
    cos = torch.nn.functional.cosine_similarity(direction, decoder.float(), dim=-1)  # calculator.py:143-149
    latents = latents.float()
    projection = latents * cos  # each latent's part of the probe projection: activation x cosine
    total = acts.float() @ direction
    main_part = projection[:, main].sum(dim=1)
    absorber = cos >= FRACTION_COS
    absorber[main] = False
    candidates = torch.where(absorber & (projection > 0), projection, torch.zeros_like(projection))
    absorbers = candidates.topk(min(MAX_ABSORBERS, projection.shape[1]), dim=1).values.sum(dim=1)
    top = projection.topk(1, dim=1).indices[:, 0]  # the top-projecting latent, main ones included
    fractions, full = [], []
    for i in range(len(total)):
        fractions.append(_fraction(float(total[i]), float(main_part[i]), float(absorbers[i])))
        silent = bool((latents[i, main] < EPS).all())
        full.append(_full(float(total[i]), silent, float(cos[top[i]]), float(projection[i, top[i]])))
    return fractions, full


def _fraction(total: float, main: float, absorbers: float) -> float:
    """calculator.py:199-219: 0 where the main latents carry the projection or the absorbers carry too little of
    it, 1 where the main latents carry none, else the absorbers' part of what absorbers and main latents carry."""
    if main >= total or _ratio(absorbers, total) < SHARE:
        return 0.0
    if main <= 0.0:
        return 1.0
    absorbed = min(absorbers, total - main)
    return min(max(absorbed / (absorbed + main), 0.0), 1.0)


def _full(total: float, main_silent: bool, top_cos: float, top_projection: float) -> bool:
    """calculator.py:97-121: no main latent fired, the top-projecting latent is aligned with the probe, the
    probe projection is not negative, and that latent carries at least SHARE of it."""
    return main_silent and top_cos >= FULL_COS and total >= 0 and _ratio(top_projection, total) >= SHARE


def _ratio(part: float, total: float) -> float:
    """part / total; SAEBench divides Python floats and would raise at total == 0: a zero total here gives inf
    with part's sign (nan for 0 / 0, which passes no threshold)."""
    if total != 0.0:
        return part / total
    return float("nan") if part == 0.0 else (float("inf") if part > 0 else float("-inf"))


def letter_result(fractions: list[float], full: list[bool], main: list[int]) -> dict[str, Any]:
    """One letter's line (main.py _aggregate_results_df): sums over its scored words divided by their number."""
    n = len(fractions)
    return {
        "mean_absorption_fraction": sum(fractions) / n,
        "full_absorption_rate": sum(full) / n,
        "num_full_absorption": sum(full),
        "num_probe_true_positives": n,
        "num_split_features": len(main),
        "split_feats": main,
    }


def means(letters: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The means and sample standard deviations (None for one letter) over letters (main.py:168-179)."""
    columns = {
        "absorption_fraction_score": [r["mean_absorption_fraction"] for r in letters.values()],
        "full_absorption_score": [r["full_absorption_rate"] for r in letters.values()],
        "num_split_features": [float(r["num_split_features"]) for r in letters.values()],
    }
    out: dict[str, float | None] = {}
    for name, values in columns.items():
        out[f"mean_{name}"] = statistics.mean(values)
        out[f"std_dev_{name}"] = statistics.stdev(values) if len(values) > 1 else None
    return out
