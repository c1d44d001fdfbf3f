"""SynthSAEBench (Chanin et al. 2026, arXiv 2602.14687) as a data source: vectors drawn on the fly from a
`sae_lens.synthetic.SyntheticModel` (the optional extra `[synth]`), with its true features and each sample's true
feature activations known, for the benchmark's metrics (mfr_sae.gt_metrics).

A sample: the feature activations a [n_features] (Zipfian firing, correlated through a low-rank Gaussian copula,
gated by trees of parents and mutually exclusive children, magnitudes that vary by feature and by sample) and the
vector x = a F + bias (F: the unit feature vectors [n_features, d], nearly orthogonalised).

Presets (`PRESETS`, one recipe at several sizes): `synthsaebench-16k` is the published SynthSAEBench-16k model
(the configuration of decoderesearch/synth-sae-bench-experiments, experiments/create_synth_bench_16k_model.py, and
of SAELens docs/synth_sae_bench.md). The hub's copy (decoderesearch/synth-sae-bench-16k-v2) cannot be reached
here, so it is built from that configuration: the same seeds, hierarchy, correlation, probabilities and
magnitudes, and feature vectors equal to sae-lens's own build up to float rounding (`orthogonalize`). The smaller
presets keep the recipe (one tree root per 128 features, the same firing, correlation, magnitudes and bias) and
train in minutes on a few CPU cores.

Determinism: sae-lens draws from torch's global generator, so each batch is drawn inside `torch.random.fork_rng`
with the global generator seeded from (stream_seed, stream, index): batch i of the training stream is the same
whatever came before (a resumed run sees the same batches), the caller's global random state is left as it was,
and the evaluation stream never overlaps the training stream.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.extras import require
from mfr_sae.seeding import EVAL_STREAM, TRAIN_STREAM, seeded_generator

if TYPE_CHECKING:
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

# models built in this process, by (config, device, exact): a study's runs share one (45 s to build at 16k)
_BUILT: dict[tuple[str, str, bool], SyntheticModel] = {}
EVAL_CHUNK = 1024  # held-out vectors are drawn in batches of this size (so n vectors are a prefix of n + m)
FEATURES_PER_ROOT = 128  # the recipe: 16,384 features under 128 tree roots
# name -> (num_features, hidden_dim) of the recipe (`recipe`)
PRESETS: dict[str, tuple[int, int]] = {
    "synthsaebench-16k": (16_384, 768),  # the published SynthSAEBench-16k
    "synthsaebench-4k": (4_096, 192),  # a quarter of it: 16k's ratio of features to dimensions (21.3)
    "synthsaebench-1k": (1_024, 256),  # small and less superposed (4 features a dimension): minutes on 2 cores
}


def synth_module() -> Any:
    """sae_lens.synthetic, or MissingExtra naming the extra `[synth]`."""
    require("sae_lens", "data.kind=synthsaebench")
    return importlib.import_module("sae_lens.synthetic")


def recipe(num_features: int, hidden_dim: int) -> SyntheticModelConfig:
    """SynthSAEBench-16k's configuration at another size: Zipfian firing (exponent 0.5, probabilities 0.4 down to
    5e-4), num_features / 128 tree roots of branching 4 and depth 3 whose children are mutually exclusive, with
    compensated probabilities and children scaled by their parent, low-rank correlation (rank 25, scale 0.1),
    orthogonalisation (100 steps at lr 3e-4), mean magnitudes 5.0 -> 4.0, their spread folded-normal (0.5, 0.5),
    bias of norm 0.5, seed 42."""
    s = synth_module()
    return s.SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=hidden_dim,
        firing_probability=s.ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=s.HierarchyConfig(
            total_root_nodes=max(1, num_features // FEATURES_PER_ROOT),
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=s.OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=s.LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=s.LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=s.FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )


def synthsaebench_config(preset: str, overrides: Mapping[str, Any] | None = None) -> SyntheticModelConfig:
    """The SyntheticModelConfig of a preset with any of its fields overridden. `overrides` holds fields by name,
    nested as SyntheticModelConfig.to_dict() nests them (`{"hierarchy": {"max_depth": 2}}`) or as dotted names
    (`{"hierarchy.max_depth": 2}`). A nested config merges field by field; one given a different `generator_name`
    (`{"firing_probability": {"generator_name": "linear", "max_prob": 0.3, "min_prob": 0.01}}`), a number for a
    magnitude, or null (no hierarchy, correlation or orthogonalisation) replaces the old one whole. An unknown
    preset or field, or a value sae-lens refuses, is a ValueError that names it."""
    if preset not in PRESETS:
        raise ValueError(f"data.preset={preset!r} is not a SynthSAEBench preset (known: {', '.join(PRESETS)})")
    s = synth_module()
    base = recipe(*PRESETS[preset]).to_dict()
    merged = _merge(base, _undot(overrides or {}), "")
    try:
        return s.SyntheticModelConfig.from_dict(merged)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"the overrides of {preset} make no valid SyntheticModelConfig: {err}") from None


def _undot(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "a": {"c": 2}} -> {"a": {"b": 1, "c": 2}}."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = str(key).split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {key!r}: {part!r} is also set to a value")
            node = child
        if isinstance(value, Mapping):
            value = _undot(value)
            if isinstance(node.get(last), dict):
                value = {**node[last], **value}
        node[last] = value
    return nested


def _merge(base: Any, override: Any, path: str) -> Any:
    if not isinstance(override, Mapping):
        return override
    if not isinstance(base, dict) or override.get("generator_name", base.get("generator_name")) != base.get(
        "generator_name"
    ):
        return dict(override)  # a new config (or a value that was not a config): replaced whole
    unknown = sorted(set(override) - set(base))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(
            f"SyntheticModelConfig has no field {', '.join(where + u for u in unknown)} "
            f"(fields{' of ' + path if path else ''}: {', '.join(sorted(base))})"
        )
    return {**base, **{k: _merge(base[k], v, f"{path}.{k}" if path else k) for k, v in override.items()}}


def orthogonalize(embeddings: Tensor, num_steps: int, lr: float) -> Tensor:
    """sae-lens's `orthogonalize_embeddings` (unit rows, then Adam on sum_{i != j} (e_i.e_j)^2 +
    n sum_i (e_i.e_i - 1)^2, then unit rows again) with the loss's gradient written out:
    4 (E (E^T E) - diag(G) E + n (diag(G) - 1) E), G = E E^T, which costs n d^2 a step instead of sae-lens's
    n^2 d (at 16,384 x 768, 21x less; about an hour of 2 CPU cores for sae-lens's). The result equals sae-lens's
    up to float rounding (tests/test_synthsaebench.py). At the 4k preset every row's cosine with sae-lens's row is
    >= 0.9999997, as sae-lens's own builds with chunk 512 and 1,024 are to each other; the mean |difference| is
    2e-7 where the orthogonalisation moves entries by 7e-3 on average; a few entries differ by up to 5e-4 (as much
    as float32 and float64 builds of this function differ: where a gradient is near 0, Adam steps by its sign)."""
    n = embeddings.shape[0]
    e = embeddings.detach().clone()
    e = e / e.norm(p=2, dim=1, keepdim=True).clamp(min=1e-8)
    e.requires_grad_(True)
    optimizer = torch.optim.Adam([e], lr=lr)
    for _ in range(num_steps):
        with torch.no_grad():
            diag = e.pow(2).sum(dim=1, keepdim=True)
            e.grad = 4 * (e @ (e.T @ e) - diag * e + n * (diag - 1) * e)
        optimizer.step()
    with torch.no_grad():
        unit: Tensor = e / e.norm(p=2, dim=1, keepdim=True).clamp(min=1e-8)
    return unit.detach().clone()


def build_model(cfg: SyntheticModelConfig, device: str | torch.device = "cpu", exact: bool = False) -> SyntheticModel:
    """The SyntheticModel of a config. exact=False: its feature vectors orthogonalised by `orthogonalize` (the same
    model up to float rounding, in minutes on a CPU instead of hours); exact=True: by sae-lens itself."""
    s = synth_module()
    if cfg.seed is None:
        raise ValueError("a SynthSAEBench model needs a seed (seed: null would draw a different model each time)")
    device = str(device)
    if exact or cfg.orthogonalization is None:
        return s.SyntheticModel(cfg, device=device)
    ortho = cfg.orthogonalization

    def initializer(feature_dict: Any) -> None:
        feature_dict.feature_vectors.data = orthogonalize(feature_dict.feature_vectors, ortho.num_steps, ortho.lr)

    # every other part of the model draws from generators of its own seeds, so building the feature dictionary
    # first draws the same model as sae-lens's constructor
    feature_dict = s.FeatureDictionary(
        num_features=cfg.num_features,
        hidden_dim=cfg.hidden_dim,
        bias=cfg.bias,
        initializer=initializer,
        device=device,
        seed=cfg.seed,
    )
    return s.SyntheticModel(cfg, feature_dict=feature_dict, device=device)


def shared_model(cfg: SyntheticModelConfig, device: torch.device, exact: bool = False) -> SyntheticModel:
    """`build_model`, once per process for each (config, device, exact): sampling never changes the model (every
    batch is drawn from its own seed), so the runs of a study read one copy."""
    key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), str(device), exact)
    if key not in _BUILT:
        _BUILT.clear()  # one model at a time: at 16k it holds ~60 MB
        _BUILT[key] = build_model(cfg, device, exact)
    return _BUILT[key]


@dataclass
class HeldOut:
    """Held-out samples: the vectors [n, d] and the true feature activations, one sparse [EVAL_CHUNK, n_features]
    tensor a batch (the last one cut to n)."""

    vectors: Tensor
    activations: list[Tensor]

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(vectors [b, d], true feature activations [b, n_features], dense) batch by batch."""
        start = 0
        for sparse in self.activations:
            acts = sparse.to_dense()
            yield self.vectors[start : start + len(acts)], acts
            start += len(acts)


class SynthSAEBenchData:
    """Vectors of a SynthSAEBench model (the module's docstring). `preset`: a name of PRESETS; `overrides`: fields of
    its SyntheticModelConfig (`synthsaebench_config`); or `config`, a SyntheticModelConfig, instead of both.
    stream_seed: of the sample stream (default the model's seed): replicates that share the model, not the samples.
    exact: build the model with sae-lens's own orthogonalisation (`build_model`)."""

    def __init__(
        self,
        preset: str = "synthsaebench-1k",
        overrides: Mapping[str, Any] | None = None,
        stream_seed: int | None = None,
        device: str | torch.device = "cpu",
        config: SyntheticModelConfig | None = None,
        exact: bool = False,
    ):
        self.config = config if config is not None else synthsaebench_config(preset, overrides)
        self.preset = None if config is not None else preset
        self.device = torch.device(device)
        self.model = shared_model(self.config, self.device, exact)
        self.d: int = self.config.hidden_dim
        self.n_features: int = self.config.num_features
        self.stream_seed: int = self.config.seed if stream_seed is None else stream_seed
        self._held_out: HeldOut | None = None

    @property
    def ground_truth(self) -> Tensor:
        """The true feature vectors, one per row: [n_features, d] (unit norm)."""
        vectors: Tensor = self.model.feature_dict.feature_vectors.detach()
        return vectors

    @property
    def bias(self) -> Tensor:
        """The offset every vector carries: [d]."""
        bias: Tensor = self.model.feature_dict.bias.detach()
        return bias

    def sample(self, batch_size: int, stream: int = TRAIN_STREAM, index: int = 0) -> tuple[Tensor, Tensor]:
        """One batch: (vectors [B, d], true feature activations [B, n_features]); the same (stream, index) always
        gives the same batch. The vectors are sae-lens's feature_dict(acts) = acts F + bias summed over the active
        features alone (equal up to rounding; at 16k features 12x faster than its dense product)."""
        seed = seeded_generator(self.stream_seed, stream, index).initial_seed()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            acts: Tensor = self.model.activation_generator.sample(batch_size)
        with torch.no_grad():
            rows, cols = acts.nonzero(as_tuple=True)  # row-major: each sample's features together
            starts = torch.searchsorted(rows, torch.arange(batch_size, device=rows.device))
            x = F.embedding_bag(cols, self.ground_truth, starts, mode="sum", per_sample_weights=acts[rows, cols])
            return x + self.bias, acts

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[Tensor]:
        """Training batches from step `start_step` on."""
        step = start_step
        while True:
            yield self.sample(batch_size, TRAIN_STREAM, step)[0]
            step += 1

    def held_out(self, n: int) -> HeldOut:
        """n held-out samples with their true activations, drawn in batches of EVAL_CHUNK from the evaluation
        stream (kept, so eval_vectors and the metrics read the same samples without drawing them twice)."""
        have = self._held_out
        if have is None or len(have.vectors) < n:
            vectors, activations = [], []
            for i in range(-(-n // EVAL_CHUNK)):
                x, acts = self.sample(EVAL_CHUNK, EVAL_STREAM, i)
                vectors.append(x)
                activations.append(acts.to_sparse())
            have = self._held_out = HeldOut(torch.cat(vectors), activations)
        full, rest = divmod(n, EVAL_CHUNK)
        chunks = have.activations[:full] + ([have.activations[full].to_dense()[:rest].to_sparse()] if rest else [])
        return HeldOut(have.vectors[:n], chunks)

    def eval_vectors(self, n: int) -> Tensor:
        """n held-out vectors [n, d] (those of `held_out(n)`)."""
        return self.held_out(n).vectors
