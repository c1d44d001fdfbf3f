"""The run configuration's sections: dataclasses whose docstrings (the string literal under each field) are its
help text, the values some fields may take, and the paper's MFR setting. Defaults are the paper's synthetic
setting (docs/design.md sections 1-4). RunConfig, the sections together and their validation, is in `run.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """Where vectors come from: `synthetic` (ground-truth features, docs/design.md section 1), `vectors` (your
    files), `activations` (a cache built by `mfr-sae cache`), `eeg` (recordings, denoising) or `synthsaebench`
    (SynthSAEBench's ground truth, drawn by sae-lens: the extra [synth])."""
    path: str = ""
    """vectors: a .npy file, a .safetensors file, or a folder of such shards, each [n_vectors, d];
    activations: the cache folder; eeg: an EDF/BDF/FIF/BrainVision file or a folder of them."""
    verify: bool = True
    """activations: check every shard's SHA-256 against the cache manifest before training."""
    holdout: int = 10_000
    """vectors: this many rows at the end of the data are kept out of training, for evaluation."""
    shuffle_buffer: int = 131_072
    """vectors: rows per shuffle buffer (drawn as 8 chunks of contiguous rows from random places)."""
    d: int = 256
    """Dimension of the input vectors (synthetic; other sources take it from their data)."""
    n_features: int = 512
    """Number of true features (columns of the feature matrix F, d x n)."""
    firing: str = "groups"
    """synthetic: how a sample picks its features: `groups` (the paper: one group, n_active of its features
    drawn by weight), `independent` (each feature fires on its own with a Zipf probability, magnitude
    U[min_magnitude, 1): learnable ground truth, where a TopK baseline recovers most features) or
    `hierarchical` (parents fire with Zipf probabilities, each with `children` children that fire only with
    it: correlated features, where latents can absorb or split them)."""
    mean_active: float = 6.0
    """synthetic, independent and hierarchical: expected number of active features per sample."""
    children: int = 3
    """synthetic, hierarchical: children per parent; n_features must be a multiple of 1 + children."""
    child_probability: float = 0.3
    """synthetic, hierarchical: a child fires with this probability when its parent fires (never without)."""
    zipf_exponent: float = 1.0
    """synthetic, independent: feature i fires with probability proportional to (i + 1)^-zipf_exponent."""
    min_magnitude: float = 0.0
    """synthetic, independent: an active feature's magnitude is drawn from U[min_magnitude, 1)."""
    n_groups: int = 12
    """Features are split into this many groups; every feature belongs to exactly one."""
    n_active: int = 36
    """Active features per sample, drawn without replacement from one group."""
    decay: float = 0.99
    """Feature j of a group (0-based) is drawn with weight decay**j."""
    normalize_features: bool = False
    """Scale the true features to unit L2 norm (off in the paper)."""
    seed: int = 0
    """Seed of the feature matrix and of the sample stream (and of the EEG noise)."""
    stream_seed: int = -1
    """synthetic: seed of the sample stream alone (replicates that share the true features); -1: data.seed."""
    channels: str | list[str] = "common"
    """eeg: the EEG channels kept: `common` (those in every file), the name of an MNE standard montage
    (`colin27_1020`, `biosemi64`, ...: its channels that every file has), or a list of names."""
    sfreq: float = 250.0
    """eeg: every recording is resampled to this rate (Hz), after the 0.5-45 Hz band-pass."""
    window_s: float = 1.0
    """eeg: window length in seconds; a vector is one window, channels x samples, z-scored per channel."""
    hop_s: float = 1.0
    """eeg: seconds between the starts of consecutive windows (less than window_s: overlapping windows)."""
    holdout_fraction: float = 0.1
    """eeg: the last this fraction of every recording is kept out of training, for evaluation."""
    noise: str = "none"
    """eeg: corruption of the input (denoising; the loss is against the clean window): none, white, line,
    emg or pops."""
    snr_db: float = 0.0
    """eeg: signal-to-noise ratio of the corrupted input, in dB, exact per window."""
    line_freq: float = 50.0
    """eeg: mains frequency of `line` noise (50 or 60 Hz)."""
    preset: str = "synthsaebench-16k"
    """synthsaebench: the model: `synthsaebench-16k` (the published benchmark: 16,384 features in 768
    dimensions), or the same recipe smaller, `synthsaebench-4k` (4,096 in 192) or `synthsaebench-1k` (1,024 in
    256). Its seed is the model's (42; data.seed is not read); data.stream_seed seeds the samples (-1: 42)."""
    synth: dict[str, Any] = field(default_factory=dict)
    """synthsaebench: fields of the preset's sae_lens SyntheticModelConfig to change, nested as its to_dict
    nests them or dotted (`{num_features: 2048, hierarchy.max_depth: 2}`)."""


@dataclass
class SAEConfig:
    architecture: str = "topk"
    """`topk` (each sample keeps its k largest latents; the paper), `batchtopk` (a batch of B keeps its k x B
    largest: k per sample on average; saved as SAELens's JumpReLU with the threshold estimated in training) or
    `matryoshka` (BatchTopK whose nested prefixes of latents, matryoshka_widths, each reconstruct on their own).
    An architecture's own options are keys `sae.<architecture>_<option>` (e.g. sae.matryoshka_widths)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The architectures' own options that were set, by key (`matryoshka_widths`); written as `sae.<key>`."""
    n_members: int = 2
    """Number of SAEs trained together (the ensemble)."""
    d_sae: int = 512
    """Hidden size h of every member."""
    k: int | list[int] = 36
    """Active latents per sample: one number for all members, or a list with one per member."""
    tied: bool = True
    """Decoder rows are the unit-normalised encoder rows (the paper). False: a separate decoder."""
    decoder_bias: bool = False
    """Learn a decoder bias b_dec, subtracted from the input before encoding (SAELens convention)."""
    shared_init: bool = False
    """Start every member from one shared initialisation (member 0's); reinitialisations stay distinct."""
    aux_coef: float = 0.0
    """AuxK (Gao et al. 2024): weight of the auxiliary loss in which dead latents (aux_dead_window) reconstruct
    what their member leaves over through their own top aux_k activations, so that they learn again (`aux_loss`
    in the log); 1/32 in the paper; 0: off."""
    aux_k: int = 0
    """AuxK: dead latents that take part in each sample's auxiliary reconstruction; 0: data.d // 2 (as SAELens
    and sparsify)."""
    aux_dead_window: int = 100_000
    """AuxK: a latent is dead for it once it has not fired on the last this-many training vectors (SAELens: 1,000
    steps; sparsify: 10M tokens; eval.dead_window is what the log's dead_frac counts)."""


@dataclass
class TrainConfig:
    n_samples: int = 10_000_000
    """Vectors seen in total; steps = n_samples // batch_size."""
    batch_size: int = 10_000
    """Vectors per step, shared by all members."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default; the paper names AdamW without a value)."""
    seed: int = 0
    """Seed of the members' initialisation."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ..."""
    dist_timeout_s: float = 600.0
    """torchrun: seconds a collective waits for the other processes before the run stops with an error."""
    autocast: bool = False
    """bf16 autocast of the encoder and decoder products, and bf16 decoder rows in the MFR matching and
    matched penalty (mfr.match_every >= 1; half the bytes between processes); weights, gradients and
    AdamW stay fp32. Faster on GPUs and on CPUs with bf16 units; slower on CPUs without them
    (bench/RESULTS.md)."""
    log_every: int = 10
    """Steps between lines in metrics.jsonl."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at the end); `--resume` restarts from the last one."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (needs `pip install wandb`); empty: off."""


@dataclass
class MFRConfig:
    """Defaults (`mfr-sae study`, RESULTS.md): confirmation. A greedy one-to-one matching re-made every 100 steps;
    only latents that no other member confirms (no latent of another member at cosine >= 0.8) are pulled, only
    towards confirmed matches, up to a 0.7 ceiling, never towards a direction their own member already has at
    0.7 (the twin guard at the ceiling), at beta 0.3*auto. On held-out learnable data they beat the baseline at
    h = 1,024 and at h = 4,096 with FVU no worse; at the paper's GPT-2 shape on its synthetic data they recover
    more true features than the baseline and reconstruct better, the members agreeing one-to-one at about 0.92.
    The paper's form is PAPER_MFR."""

    enabled: bool = False
    """Mutual Feature Regularization (penalty and reinitialisation); false: the baseline, same code."""
    beta: float | str = "0.3*auto"
    """Penalty coefficient; `auto` (the paper) makes the penalty equal the reconstruction loss at the start and
    keeps that beta; `0.1*auto` a fraction of it; `0.1*recon` follows the reconstruction loss as it is now:
    beta = 0.1 x (running mean of the members' reconstruction loss) / (1 - MMCS at the first step), so members
    as far apart as at the start pay a tenth of the current loss (logged as `beta_effective`); a number sets
    it. 0: no penalty."""
    warmup_steps: int = 100
    """The penalty's weight ramps from 0 to beta along a cosine over this many steps."""
    mmcs: str = "greedy"
    """Similarity of two decoders: `hungarian` (one-to-one matched latents, an assignment), `mnn` (mutual nearest
    neighbours: a latent is matched only to the latent whose own best match it is; one-to-one, partial, from
    the one similarity product per pair that `max` needs), `mnn_hungarian` (those completed one-to-one by an
    assignment among the latents left over: a whole matching, the assignment only as large as the share of
    latents that are not mutual best matches), `greedy` (one-to-one: pairs taken in descending order of cosine
    among each latent's 16 best partners while both are free, the few latents left over assigned: no large
    assignment at any size) or `max` (the paper: mean max cosine, both
    directions; it rewards folding many latents onto one direction)."""
    min_cosine: float = -1.0
    """Thresholded form: only matched latents whose cosine is at least this (when matched) are pulled
    together, so agreement is used as evidence, not forced; -1: every match (the paper)."""
    max_cosine: float = 0.7
    """Ceiling, against collapse: matched latents whose cosine is above this (when matched) are not pulled
    further (agreement, not identity; below mfr.confirm_cosine the pull alone never confirms a latent);
    1: no ceiling (the paper; `max` at match_every 1 is certified only without one)."""
    twin_guard: float = 0.7
    """A match is not pulled when either latent's partner is already at cosine >= this with another latent of
    the latent's own member: the pull would make a partial copy of a direction the member has (at 0.9, a twin
    as twin_frac counts them; at the 0.7 ceiling, anything the pull could reach: at the GPT-2 shape, 0.9 let
    confirmation lose to the baseline, RESULTS.md); 1: off (the paper)."""
    idle_window: int = 0
    """Pull only idle latents: a latent is pulled towards its matches only once it has not fired on the last
    this-many training vectors; live latents are left to the reconstruction (`pulled_frac` in the log). Where
    many latents idle (rare features) a pulled one can become a twin of a feature its own member has; 0 (the
    default, and the paper): idle or not. 5000 (with idle_to_live) were the defaults until 2026-12-03: they
    gained nothing at h = 4,096, where almost no latent idles (RESULTS.md)."""
    idle_to_live: bool = False
    """With idle_window: an idle latent is pulled only towards matches that fire; two idle latents matched to each
    other (as of the last re-matching) are not pulled together, since neither is evidence of a feature. false:
    towards every match."""
    confirm_cosine: float = 0.8
    """Evidence, not pull: a latent is confirmed when a latent of another member is at cosine >= this with it (as
    measured at each re-matching). Below 1, only unconfirmed latents are pulled, and only towards confirmed matches:
    what members found on their own guides the rest, and with mfr.max_cosine below this the pull alone never
    confirms a latent (`confirmed_frac` in the log). 1: off."""
    match_every: int = 100
    """Recompute the matched feature pairs every this many steps; in between, `match_stale_frac` in the log
    measures how many matches had changed. 1: exact every step (with `max`, certified: only
    rows whose match a bound cannot vouch for are matched again, `match_rematched_frac` in the log);
    0: the naive dense penalty, `max` only."""
    reinit_window: int = 0
    """Check a member for reinitialisation during its first this-many steps after (re)initialisation; 0: never
    (the default: the rule never fired on learnable data and, on SmolLM2 activations, fired at every check
    until its cap: RESULTS.md; the paper's 100 is in PAPER_MFR). results.json's `reinit_count`: how often."""
    reinit_threshold: float = 2.5
    """Re-initialise a member when M = mean_j (|p_j - k/h| / (k/h))^3 exceeds this."""
    reinit_samples: int = 10_000
    """Firing probabilities p_j are measured over the last this-many training vectors."""
    reinit_max: int = 10
    """At most this many reinitialisations per member."""


@dataclass
class EvalConfig:
    every: int = 0
    """Steps between evaluations during training (0: only at the end)."""
    n_samples: int = 20_000
    """Held-out vectors used by each evaluation."""
    batch_size: int = 5_000
    """Vectors per forward pass during evaluation."""
    recovered_threshold: float = 0.9
    """A true feature counts as recovered when some latent has cosine >= this with it."""
    dead_window: int = 1_000_000
    """A latent is dead when it has not fired on the last this-many training vectors."""
    ground_truth: str = ""
    """True feature directions, [n_true, d] (or [d, n_true]) in a .npy or .safetensors file, for any data."""
    lm_sequences: int = 100
    """activations: held-out text sequences for loss recovered (CE clean / zero-ablated / spliced); 0: off."""
    lm_batch_size: int = 8
    """activations: sequences per forward pass of the language model during loss recovered."""


# The paper's MFR (docs/design.md section 4), field by field: what the reproductions and the study's grid build on,
# whatever the defaults of mfr.* are.
PAPER_MFR = [
    "mfr.beta=auto",
    "mfr.warmup_steps=100",
    "mfr.mmcs=max",
    "mfr.min_cosine=-1",
    "mfr.max_cosine=1",
    "mfr.twin_guard=1",
    "mfr.idle_window=0",
    "mfr.idle_to_live=false",
    "mfr.confirm_cosine=1",
    "mfr.match_every=1",
    "mfr.reinit_window=100",
    "mfr.reinit_threshold=2.5",
    "mfr.reinit_samples=10000",
    "mfr.reinit_max=10",
]
DATA_KINDS = ("synthetic", "vectors", "activations", "eeg", "synthsaebench")
FIRING_KINDS = ("groups", "independent", "hierarchical")
MMCS_FORMS = ("hungarian", "mnn_hungarian", "greedy", "mnn", "max")
EEG_NOISE_KINDS = ("none", "white", "line", "emg", "pops")


def beta_parts(beta: float | str) -> tuple[float, str] | None:
    """mfr.beta as (factor, kind): `auto` -> (1, "auto"), `0.02*auto` -> (0.02, "auto"), `0.1*recon` ->
    (0.1, "recon"), 0.5 -> (0.5, "fixed"); None when it is none of these."""
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        return (float(beta), "fixed") if beta >= 0 else None
    text = str(beta).replace(" ", "")
    if text in ("auto", "recon"):
        return 1.0, text
    factor, sep, rest = text.partition("*")
    try:
        value = float(factor)
    except ValueError:
        return None
    return (value, rest) if sep and rest in ("auto", "recon") and value >= 0 else None
