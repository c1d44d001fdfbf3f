"""Learnable synthetic data: true features that fire independently, with Zipf-distributed probabilities.

The paper's generator (synthetic.py) activates 36 of the ~43 features of one group in every sample, so
no SAE isolates single features there (RESULTS.md). Here, as in the toy models of Sharkey et al. 2022
and Elhage et al. 2022, feature i fires on its own with probability p_i = c / (i + 1)^s (the Zipf
exponent s; c set so that the expected number of active features is `mean_active`, p_i capped at 1),
with a magnitude drawn from U[min_magnitude, 1); x = sum of the active features' magnitudes times their
(unit-norm by default) directions. A TopK SAE with h >= n recovers most features here, so gains and
losses of a method can show. Features are numbered by frequency: feature 0 is the most common.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mfr_sae.data.synthetic import FeatureStream
from mfr_sae.seeding import TRAIN_STREAM


def zipf_probabilities(n_features: int, mean_active: float, exponent: float) -> Tensor:
    """p_i = c / (i + 1)^exponent with sum p_i = mean_active, each p_i <= 1: [n_features] (float64)."""
    if not 0 < mean_active <= n_features:
        raise ValueError(f"mean_active={mean_active} must be in (0, n_features={n_features}]")
    weights = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-exponent)
    probs = torch.zeros(n_features, dtype=torch.float64)
    capped = torch.zeros(n_features, dtype=torch.bool)
    for _ in range(n_features):  # water-filling: cap at 1, spread the rest over the uncapped features
        free = ~capped
        probs[free] = weights[free] * (mean_active - capped.sum()) / weights[free].sum()
        over = free & (probs > 1)
        if not over.any():
            break
        capped |= over
        probs[capped] = 1.0
    return probs


class ZipfData(FeatureStream):
    """Independent per-feature firing with Zipf probabilities (see the module's docstring)."""

    def __init__(
        self,
        d: int = 256,
        n_features: int = 2048,
        mean_active: float = 6.0,
        exponent: float = 1.0,
        min_magnitude: float = 0.0,
        normalize_features: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        stream_seed: int | None = None,
    ):
        super().__init__(d, n_features, normalize_features, seed, device, stream_seed)
        if not 0 <= min_magnitude < 1:
            raise ValueError(f"min_magnitude={min_magnitude} must be in [0, 1)")
        self.min_magnitude = min_magnitude
        self.probabilities = self.firing_probabilities(mean_active, exponent).float().to(self.device)

    def firing_probabilities(self, mean_active: float, exponent: float) -> Tensor:
        """Each feature's probability of firing (given whatever `fires` also asks): [n_features]."""
        return zipf_probabilities(self.n_features, mean_active, exponent)

    def fires(self, uniform: Tensor) -> Tensor:
        """Which features fire, from one U[0, 1) draw per feature: [B, n_features] bool."""
        return uniform < self.probabilities

    def sample_codes(self, batch_size: int, stream: int, index: int) -> Tensor:
        """The magnitudes of every feature in one batch, zero where it is off: [B, n_features]."""
        uniform = torch.rand(batch_size, self.n_features, generator=self.generator(stream, index), device=self.device)
        # one draw does both: u < p_i says whether feature i fires, and given that, u / p_i is U[0, 1)
        fires = self.fires(uniform)
        magnitude = self.min_magnitude + (1 - self.min_magnitude) * uniform / self.probabilities
        return magnitude.masked_fill_(~fires, 0)

    def sample(self, batch_size: int, stream: int = TRAIN_STREAM, index: int = 0) -> Tensor:
        """One batch of vectors [B, d]: the active features' directions weighted by their magnitudes."""
        return self.sample_codes(batch_size, stream, index) @ self.features
