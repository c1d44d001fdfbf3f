"""Sources of training vectors. Each has `d`, `batches(batch_size, start_step)` (a deterministic
stream, so a resumed run sees the same batches), `eval_vectors(n)` (held out) and `ground_truth`
(true feature directions [n_true, d], or None when unknown). A denoising source (EEG) yields
(input, target) pairs instead of vectors: the SAE reads the input and is scored against the target.
`make_source` builds the source a config names; `run_source` that of a run, with its ground truth."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from mfr_sae.config import ConfigError, DataConfig, RunConfig
from mfr_sae.data.hierarchy import HierarchicalData
from mfr_sae.data.synthetic import SyntheticData
from mfr_sae.data.vectors import DataError, VectorsData, load_ground_truth
from mfr_sae.data.zipf import ZipfData


class VectorSource(Protocol):
    d: int

    @property
    def ground_truth(self) -> Tensor | None: ...

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[Batch]: ...

    def eval_vectors(self, n: int) -> Batch: ...


Batch = Tensor | tuple[Tensor, Tensor]


def split_batch(batch: Batch) -> tuple[Tensor, Tensor]:
    """(input, target): a plain batch is its own target."""
    return batch if isinstance(batch, tuple) else (batch, batch)


def make_source(cfg: DataConfig, device: str | torch.device = "cpu") -> VectorSource:
    """The data source a config names."""
    stream_seed = None if cfg.stream_seed < 0 else cfg.stream_seed
    if cfg.kind == "synthetic" and cfg.firing == "hierarchical":
        return HierarchicalData(
            cfg.d,
            cfg.n_features,
            cfg.mean_active,
            cfg.zipf_exponent,
            cfg.children,
            cfg.child_probability,
            cfg.min_magnitude,
            cfg.normalize_features,
            cfg.seed,
            device,
            stream_seed,
        )
    if cfg.kind == "synthetic" and cfg.firing == "independent":
        return ZipfData(
            cfg.d,
            cfg.n_features,
            cfg.mean_active,
            cfg.zipf_exponent,
            cfg.min_magnitude,
            cfg.normalize_features,
            cfg.seed,
            device,
            stream_seed,
        )
    if cfg.kind == "synthetic":
        return SyntheticData(
            cfg.d,
            cfg.n_features,
            cfg.n_groups,
            cfg.n_active,
            cfg.decay,
            cfg.normalize_features,
            cfg.seed,
            device,
            stream_seed,
        )
    if cfg.kind == "vectors":
        return VectorsData(cfg.path, cfg.seed, cfg.holdout, cfg.shuffle_buffer)
    if cfg.kind == "activations":
        from mfr_sae.data.activations import ActivationCache

        return ActivationCache(cfg.path, cfg.seed, cfg.holdout, cfg.shuffle_buffer, cfg.verify)
    if cfg.kind == "eeg":
        from mfr_sae.data.eeg import EEGData

        return EEGData(
            cfg.path,
            cfg.channels,
            cfg.sfreq,
            cfg.window_s,
            cfg.hop_s,
            cfg.holdout_fraction,
            cfg.noise,
            cfg.snr_db,
            cfg.line_freq,
            cfg.seed,
        )
    raise ValueError(f"data.kind={cfg.kind!r} is not a known source")


def run_source(
    cfg: RunConfig, device: torch.device, source: VectorSource | None = None
) -> tuple[VectorSource, Tensor | None, str | None]:
    """What a run trains on and is scored against: `source` (or the one cfg.data names), with data.d set from
    its vectors (synthetic: checked against them); the ground truth, eval.ground_truth's file (on `device`)
    else the source's own; and how that file was read (None for the source's own)."""
    source = source if source is not None else make_source(cfg.data, device)
    if cfg.data.kind != "synthetic":
        cfg.data.d = source.d
    elif source.d != cfg.data.d:
        raise ConfigError(f"data.d={cfg.data.d} but the data source gives vectors of size {source.d}")
    ground_truth, layout = source.ground_truth, None
    if cfg.eval.ground_truth:
        ground_truth, layout = load_ground_truth(cfg.eval.ground_truth, cfg.data.d)
        ground_truth = ground_truth.to(device)
    return source, ground_truth, layout


__all__ = [
    "Batch",
    "DataError",
    "SyntheticData",
    "VectorSource",
    "VectorsData",
    "load_ground_truth",
    "make_source",
    "run_source",
    "split_batch",
    "ZipfData",
]
