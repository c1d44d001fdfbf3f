"""Learnable synthetic data with hierarchy and correlated features: parents fire with Zipf probabilities, and
each parent's children fire only with it.

Features 0 .. P-1 are parents, P = n_features / (1 + children); parent i fires on its own with probability
p_i = c / (i + 1)^s (zipf.py), and each of its `children` children (features P + i * children + j) fires
when the parent does, with probability `child_probability`, never without it. c is set so that the
expected number of active features, parents and children, is `mean_active`. Magnitudes are U[min_magnitude,
1) for every active feature. Children of a parent co-occur with it and with each other, so a latent can
absorb a child into its parent (feature absorption) or split a parent across its children: a harder test
than independent firing, as in SAELens's hierarchical synthetic data and SynthSAEBench.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mfr_sae.data.synthetic import FeatureStream
from mfr_sae.data.zipf import zipf_probabilities
from mfr_sae.seeding import TRAIN_STREAM


class HierarchicalData(FeatureStream):
    """Parents with Zipf firing, children that fire only with their parent (see the module's docstring)."""

    def __init__(
        self,
        d: int = 128,
        n_features: int = 1024,
        mean_active: float = 6.0,
        exponent: float = 0.3,
        children: int = 3,
        child_probability: float = 0.3,
        min_magnitude: float = 0.0,
        normalize_features: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        stream_seed: int | None = None,
    ):
        super().__init__(d, n_features, normalize_features, seed, device, stream_seed)
        if children < 1 or n_features % (1 + children):
            raise ValueError(f"n_features={n_features} must be a multiple of 1 + children={children}")
        if not 0 < child_probability <= 1:
            raise ValueError(f"child_probability={child_probability} must be in (0, 1]")
        if not 0 <= min_magnitude < 1:
            raise ValueError(f"min_magnitude={min_magnitude} must be in [0, 1)")
        self.children, self.child_probability, self.min_magnitude = children, child_probability, min_magnitude
        self.n_parents = n_features // (1 + children)
        # each firing parent brings 1 + children * child_probability active features on average
        parent_mean = mean_active / (1 + children * child_probability)
        self.parent_probabilities = zipf_probabilities(self.n_parents, parent_mean, exponent).float().to(self.device)

    def sample_codes(self, batch_size: int, stream: int, index: int) -> Tensor:
        """The magnitudes of every feature in one batch, zero where it is off: [B, n_features]."""
        uniform = torch.rand(batch_size, self.n_features, generator=self.generator(stream, index), device=self.device)
        parents, kids = uniform[:, : self.n_parents], uniform[:, self.n_parents :]
        # one draw per feature: u < p says whether it fires (a child: and its parent), u / p is then U[0, 1)
        parent_fires = parents < self.parent_probabilities
        kid_fires = (kids < self.child_probability) & parent_fires.repeat_interleave(self.children, dim=1)
        fires = torch.cat([parent_fires, kid_fires], dim=1)
        scale = torch.cat(
            [self.parent_probabilities, self.parent_probabilities.new_full((len(kids[0]),), self.child_probability)]
        )
        magnitude = self.min_magnitude + (1 - self.min_magnitude) * uniform / scale
        return magnitude.masked_fill_(~fires, 0)

    def sample(self, batch_size: int, stream: int = TRAIN_STREAM, index: int = 0) -> Tensor:
        """One batch of vectors [B, d]: the active features' directions weighted by their magnitudes."""
        return self.sample_codes(batch_size, stream, index) @ self.features
