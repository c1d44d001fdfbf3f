"""Sources of training vectors. Each has `d`, `batches(batch_size, start_step)` (a deterministic
stream, so a resumed run sees the same batches), `eval_vectors(n)` (held out) and `ground_truth`
(true feature directions [n_true, d], or None when unknown)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from collections.abc import Iterator

from mfr_sae.config import DataConfig
from mfr_sae.data.synthetic import SyntheticData
from mfr_sae.data.vectors import DataError, VectorsData, load_ground_truth


class VectorSource(Protocol):
    d: int

    @property
    def ground_truth(self) -> Tensor | None: ...

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[Tensor]: ...

    def eval_vectors(self, n: int) -> Tensor: ...


def make_source(cfg: DataConfig, device: str | torch.device = "cpu") -> VectorSource:
    """The data source a config names."""
    if cfg.kind == "synthetic":
        return SyntheticData(cfg.d, cfg.n_features, cfg.n_groups, cfg.n_active, cfg.decay,
                             cfg.normalize_features, cfg.seed, device)
    if cfg.kind == "vectors":
        return VectorsData(cfg.path, cfg.seed, cfg.holdout, cfg.shuffle_buffer)
    if cfg.kind == "activations":
        from mfr_sae.data.activations import ActivationCache

        return ActivationCache(cfg.path, cfg.seed, cfg.holdout, cfg.shuffle_buffer, cfg.verify)
    raise ValueError(f"data.kind={cfg.kind!r} is not a known source")


__all__ = ["DataError", "SyntheticData", "VectorSource", "VectorsData", "load_ground_truth", "make_source"]
