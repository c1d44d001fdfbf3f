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

from mfr_sae.data.zipf import ZipfData, zipf_probabilities


class HierarchicalData(ZipfData):
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
        if children < 1 or n_features % (1 + children):
            raise ValueError(f"n_features={n_features} must be a multiple of 1 + children={children}")
        if not 0 < child_probability <= 1:
            raise ValueError(f"child_probability={child_probability} must be in (0, 1]")
        self.children, self.child_probability = children, child_probability
        self.n_parents = n_features // (1 + children)
        super().__init__(
            d, n_features, mean_active, exponent, min_magnitude, normalize_features, seed, device, stream_seed
        )

    def firing_probabilities(self, mean_active: float, exponent: float) -> Tensor:
        """The parents' Zipf probabilities, then each child's given its parent: [n_features]."""
        # each firing parent brings 1 + children * child_probability active features on average
        parent_mean = mean_active / (1 + self.children * self.child_probability)
        parents = zipf_probabilities(self.n_parents, parent_mean, exponent)
        return torch.cat([parents, parents.new_full((self.n_features - self.n_parents,), self.child_probability)])

    def fires(self, uniform: Tensor) -> Tensor:
        """A parent fires on its own draw; a child on its own draw and only with its parent."""
        fires = super().fires(uniform)
        fires[:, self.n_parents :] &= fires[:, : self.n_parents].repeat_interleave(self.children, dim=1)
        return fires
