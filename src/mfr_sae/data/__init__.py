"""Sources of training vectors. Each has `d`, `batches(batch_size, start_step)` (a deterministic
stream, so a resumed run sees the same batches), `eval_vectors(n)` (held out) and `ground_truth`
(true feature directions [n_true, d], or None when unknown). A denoising source (EEG) yields
(input, target) pairs instead of vectors: the SAE reads the input and is scored against the target.
`make_source` builds the source a config names; `run_source` that of a run, with its ground truth."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class TrueActivations(Protocol):
    """A source that knows each held-out sample's true feature activations (SynthSAEBench): the benchmark's
    metrics (gt_metrics.py) read them."""

    @property
    def ground_truth(self) -> Tensor: ...

    def held_out(self, n: int) -> HeldOutSamples: ...


class HeldOutSamples(Protocol):
    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(vectors [b, d], true feature activations [b, n_features]) batch by batch."""
        ...


def split_batch(batch: Batch) -> tuple[Tensor, Tensor]:
    """(input, target): a plain batch is its own target."""
    return batch if isinstance(batch, tuple) else (batch, batch)


def _groups(cfg: DataConfig, device: str | torch.device, stream_seed: int | None) -> VectorSource:
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


def _zipf_arguments(cfg: DataConfig, device: str | torch.device, stream_seed: int | None) -> dict[str, Any]:
    """What the Zipf-firing sources (ZipfData and its subclasses) take from a config."""
    return dict(
        d=cfg.d,
        n_features=cfg.n_features,
        mean_active=cfg.mean_active,
        exponent=cfg.zipf_exponent,
        min_magnitude=cfg.min_magnitude,
        normalize_features=cfg.normalize_features,
        seed=cfg.seed,
        device=device,
        stream_seed=stream_seed,
    )


def _independent(cfg: DataConfig, device: str | torch.device, stream_seed: int | None) -> VectorSource:
    return ZipfData(**_zipf_arguments(cfg, device, stream_seed))


def _hierarchical(cfg: DataConfig, device: str | torch.device, stream_seed: int | None) -> VectorSource:
    return HierarchicalData(
        children=cfg.children, child_probability=cfg.child_probability, **_zipf_arguments(cfg, device, stream_seed)
    )


def _synthetic(cfg: DataConfig, device: str | torch.device) -> VectorSource:
    stream_seed = None if cfg.stream_seed < 0 else cfg.stream_seed
    return SYNTHETIC_FIRINGS[cfg.firing](cfg, device, stream_seed)


def _vectors(cfg: DataConfig, device: str | torch.device) -> VectorSource:
    return VectorsData(cfg.path, cfg.seed, cfg.holdout, cfg.shuffle_buffer)


def _activations(cfg: DataConfig, device: str | torch.device) -> VectorSource:
    from mfr_sae.data.activations import ActivationCache  # transformers only when asked for

    return ActivationCache(cfg.path, cfg.seed, cfg.holdout, cfg.shuffle_buffer, cfg.verify)


def _synthsaebench(cfg: DataConfig, device: str | torch.device) -> VectorSource:
    from mfr_sae.data.synthsaebench import SynthSAEBenchData  # sae-lens only when asked for

    try:
        return SynthSAEBenchData(cfg.preset, cfg.synth, None if cfg.stream_seed < 0 else cfg.stream_seed, device)
    except ValueError as err:  # an unknown preset or SyntheticModelConfig field, named
        raise ConfigError(str(err)) from None


def _eeg(cfg: DataConfig, device: str | torch.device) -> VectorSource:
    from mfr_sae.data.eeg import EEGData  # mne only when asked for

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


# the registries a config's names select from: data.firing (synthetic) and data.kind; a new source is a module,
# its builder and one entry here (and its name in config/fields.py's lists)
SYNTHETIC_FIRINGS: dict[str, Callable[[DataConfig, str | torch.device, int | None], VectorSource]] = {
    "groups": _groups,
    "independent": _independent,
    "hierarchical": _hierarchical,
}
SOURCES: dict[str, Callable[[DataConfig, str | torch.device], VectorSource]] = {
    "synthetic": _synthetic,
    "vectors": _vectors,
    "activations": _activations,
    "eeg": _eeg,
    "synthsaebench": _synthsaebench,
}


def make_source(cfg: DataConfig, device: str | torch.device = "cpu") -> VectorSource:
    """The data source a config names."""
    if cfg.kind not in SOURCES:
        raise ValueError(f"data.kind={cfg.kind!r} is not a known source")
    return SOURCES[cfg.kind](cfg, device)


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
    "HierarchicalData",
    "SOURCES",
    "SYNTHETIC_FIRINGS",
    "SyntheticData",
    "TrueActivations",
    "VectorSource",
    "VectorsData",
    "load_ground_truth",
    "make_source",
    "run_source",
    "split_batch",
    "ZipfData",
]
