"""Synthetic vectors with known features (paper Section 3.1; docs/design.md section 1).

F holds n true features in d dimensions (entries N(0, 1); stored here one feature per row). The
features are split into groups (sizes differ by at most one, so every feature is in a group); feature j
of a group has weight decay**j. A sample picks one group uniformly, draws `n_active` of its features
without replacement with probability proportional to the weights (a fresh support for every sample),
gives each a coefficient from U[0, 1) and returns x = sum_i c_i F_i.

Batches are generated on the fly from (seed, stream, index), so the stream costs no disk, any batch can
be regenerated (resume), and the training and evaluation streams never overlap.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.seeding import EVAL_STREAM, FEATURE_STREAM, TRAIN_STREAM, seeded_generator


class FeatureStream:
    """An endless seeded stream of sparse combinations of known true features; subclasses say how a
    sample picks its features (`sample`). seed: of the feature matrix (entries N(0, 1), optionally
    unit rows), and of the sample stream unless stream_seed is given (replicates that share the true
    features but not their samples)."""

    def __init__(
        self,
        d: int,
        n_features: int,
        normalize_features: bool,
        seed: int,
        device: str | torch.device,
        stream_seed: int | None,
    ):
        self.d, self.n_features, self.seed = d, n_features, seed
        self.stream_seed = seed if stream_seed is None else stream_seed
        self.device = torch.device(device)
        features = torch.randn(n_features, d, generator=seeded_generator(seed, FEATURE_STREAM))
        if normalize_features:
            features = F.normalize(features, dim=1)
        self.features = features.to(self.device)

    @property
    def ground_truth(self) -> Tensor:
        """True features, one per row: [n_features, d]."""
        return self.features

    def generator(self, stream: int, index: int) -> torch.Generator:
        """The random stream of one batch."""
        return seeded_generator(self.stream_seed, stream, index, device=self.device)

    def sample(self, batch_size: int, stream: int = TRAIN_STREAM, index: int = 0) -> Tensor:
        """One batch of vectors [B, d]; the same (stream, index) always gives the same batch."""
        raise NotImplementedError

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[Tensor]:
        """Training batches from step `start_step` on."""
        step = start_step
        while True:
            yield self.sample(batch_size, TRAIN_STREAM, step)
            step += 1

    def eval_vectors(self, n: int, chunk: int = 10_000) -> Tensor:
        """n held-out vectors from a stream the training never sees."""
        parts = [self.sample(min(chunk, n - start), EVAL_STREAM, i) for i, start in enumerate(range(0, n, chunk))]
        return torch.cat(parts)


class SyntheticData(FeatureStream):
    """The paper's synthetic data: a feature matrix and an endless seeded stream of samples, each from
    one group of features."""

    def __init__(
        self,
        d: int = 256,
        n_features: int = 512,
        n_groups: int = 12,
        n_active: int = 36,
        decay: float = 0.99,
        normalize_features: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        stream_seed: int | None = None,
    ):
        super().__init__(d, n_features, normalize_features, seed, device, stream_seed)
        self.n_active = n_active
        self.groups = [torch.from_numpy(g) for g in np.array_split(np.arange(n_features), n_groups)]
        if n_active > min(len(g) for g in self.groups):
            raise ValueError(f"n_active={n_active} exceeds the smallest group ({min(map(len, self.groups))})")
        width = max(len(g) for g in self.groups)
        # Padded [groups, width] tables; padding gets log-weight -inf so it is never drawn.
        self._members = torch.zeros(n_groups, width, dtype=torch.long)
        self._log_weights = torch.full((n_groups, width), -torch.inf)
        for i, g in enumerate(self.groups):
            self._members[i, : len(g)] = g
            self._log_weights[i, : len(g)] = torch.arange(len(g)) * float(np.log(decay))
        self._members = self._members.to(self.device)
        self._log_weights = self._log_weights.to(self.device)

    def feature_weights(self) -> Tensor:
        """Per-feature draw weight decay**j within its group: [n_features]."""
        weights = torch.empty(self.n_features)
        for g, log_w in zip(self.groups, self._log_weights.cpu()):
            weights[g] = log_w[: len(g)].exp()
        return weights

    def sample_codes(self, batch_size: int, stream: int, index: int) -> tuple[Tensor, Tensor]:
        """Active feature ids and coefficients of one batch: ([B, n_active] long, [B, n_active])."""
        gen = self.generator(stream, index)
        group = torch.randint(len(self.groups), (batch_size,), generator=gen, device=self.device)
        # Gumbel top-k on log-weights draws without replacement proportionally to the weights.
        uniform = torch.rand(batch_size, self._members.shape[1], generator=gen, device=self.device)
        keys = self._log_weights[group] - torch.log(-torch.log(uniform.clamp_min(1e-20)))
        position = keys.topk(self.n_active, dim=1).indices
        ids = self._members[group].gather(1, position)
        coefficients = torch.rand(batch_size, self.n_active, generator=gen, device=self.device)
        return ids, coefficients

    def sample(self, batch_size: int, stream: int = TRAIN_STREAM, index: int = 0) -> Tensor:
        """One batch of vectors [B, d]; the same (stream, index) always gives the same batch."""
        ids, coefficients = self.sample_codes(batch_size, stream, index)
        return F.embedding_bag(ids, self.features, per_sample_weights=coefficients, mode="sum")
