"""RunConfig: the five sections of a run's configuration (`fields.py`) together, what follows from them
(one k per member, the number of steps), and `validate`, which refuses the first value that cannot work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mfr_sae.architecture import option_default
from mfr_sae.architectures import ARCHITECTURES, architecture_named, option_fields
from mfr_sae.config.fields import (
    DATA_KINDS,
    EEG_NOISE_KINDS,
    FIRING_KINDS,
    MMCS_FORMS,
    DataConfig,
    EvalConfig,
    MFRConfig,
    SAEConfig,
    TrainConfig,
    beta_parts,
)
from mfr_sae.errors import ConfigError


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mfr: MFRConfig = field(default_factory=MFRConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def ks(self) -> list[int]:
        """One k per member."""
        k = self.sae.k
        return list(k) if isinstance(k, list) else [k] * self.sae.n_members

    @property
    def n_steps(self) -> int:
        return self.train.n_samples // self.train.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The sections as nested dicts, every architecture's options as keys of `sae` (as they are written)."""
        raw = dataclasses.asdict(self)
        unset = {key: option_default(field_) for key, (_, field_) in option_fields().items()}
        raw["sae"].update(unset | raw["sae"].pop("options"))  # every option, as a run config compares them
        return raw

    def validate(self) -> RunConfig:
        """Raise ConfigError on the first value that cannot work."""
        d, s, t, e = self.data, self.sae, self.train, self.eval
        _check(d.kind in DATA_KINDS, f"data.kind={d.kind!r}: must be one of {', '.join(DATA_KINDS)}")
        _check(d.firing in FIRING_KINDS, f"data.firing={d.firing!r}: must be one of {', '.join(FIRING_KINDS)}")
        for name, value in [
            ("data.d", d.d),
            ("data.n_features", d.n_features),
            ("data.n_groups", d.n_groups),
            ("data.n_active", d.n_active),
            ("sae.n_members", s.n_members),
            ("sae.d_sae", s.d_sae),
            ("train.n_samples", t.n_samples),
            ("train.batch_size", t.batch_size),
            ("eval.n_samples", e.n_samples),
            ("eval.batch_size", e.batch_size),
            ("eval.dead_window", e.dead_window),
        ]:
            _check(value >= 1, f"{name}={value}: must be >= 1")
        if d.kind in ("vectors", "activations"):
            _check(bool(d.path), f"data.kind={d.kind} needs data.path (a file or folder of vectors, or a cache)")
            _check(d.holdout >= 1, f"data.holdout={d.holdout}: must be >= 1")
            _check(d.shuffle_buffer >= 1, f"data.shuffle_buffer={d.shuffle_buffer}: must be >= 1")
        if d.kind == "eeg":
            _check(bool(d.path), "data.kind=eeg needs data.path (an EEG file or a folder of recordings)")
            for name, amount in [("data.sfreq", d.sfreq), ("data.window_s", d.window_s), ("data.hop_s", d.hop_s)]:
                _check(amount > 0, f"{name}={amount}: must be > 0")
            _check(d.sfreq > 90, f"data.sfreq={d.sfreq}: must exceed 90 Hz (twice the 45 Hz band-pass edge)")
            _check(0 < d.holdout_fraction < 1, f"data.holdout_fraction={d.holdout_fraction}: must be in (0, 1)")
            _check(d.noise in EEG_NOISE_KINDS, f"data.noise={d.noise!r}: must be one of {', '.join(EEG_NOISE_KINDS)}")
            _check(
                isinstance(d.channels, (str, list)) and bool(d.channels),
                f"data.channels={d.channels!r}: must be common, an MNE montage name or a list of channel names",
            )
        if d.kind == "synthetic" and d.firing == "hierarchical":
            _check(d.children >= 1, f"data.children={d.children}: must be >= 1")
            _check(
                d.n_features % (1 + d.children) == 0,
                f"data.n_features={d.n_features}: must be a multiple of 1 + data.children={d.children}",
            )
            _check(0 < d.child_probability <= 1, f"data.child_probability={d.child_probability}: must be in (0, 1]")
            n_parents, per_parent = d.n_features // (1 + d.children), 1 + d.children * d.child_probability
            _check(
                0 < d.mean_active <= n_parents * per_parent,
                f"data.mean_active={d.mean_active}: must be in (0, {n_parents * per_parent:g}] (every parent firing)",
            )
        if d.kind == "synthetic" and d.firing in ("independent", "hierarchical"):
            _check(
                d.firing == "hierarchical" or 0 < d.mean_active <= d.n_features,
                f"data.mean_active={d.mean_active}: must be in (0, data.n_features={d.n_features}]",
            )
            _check(d.zipf_exponent >= 0, f"data.zipf_exponent={d.zipf_exponent}: must be >= 0")
            _check(0 <= d.min_magnitude < 1, f"data.min_magnitude={d.min_magnitude}: must be in [0, 1)")
        elif d.kind == "synthetic":
            smallest_group = d.n_features // d.n_groups
            _check(
                d.n_groups <= d.n_features, f"data.n_groups={d.n_groups}: more groups than features ({d.n_features})"
            )
            _check(
                d.n_active <= smallest_group,
                f"data.n_active={d.n_active}: the smallest group has {smallest_group} features",
            )
            _check(0 < d.decay <= 1, f"data.decay={d.decay}: must be in (0, 1]")
        if isinstance(s.k, list):
            _check(len(s.k) == s.n_members, f"sae.k has {len(s.k)} values but sae.n_members={s.n_members}")
        for k in self.ks:
            _check(1 <= k <= s.d_sae, f"sae.k={k}: must be between 1 and sae.d_sae={s.d_sae}")
        self._validate_architecture()
        _check(s.aux_coef >= 0, f"sae.aux_coef={s.aux_coef}: must be >= 0")
        _check(0 <= s.aux_k <= s.d_sae, f"sae.aux_k={s.aux_k}: must be between 0 and sae.d_sae={s.d_sae}")
        _check(s.aux_dead_window >= 1, f"sae.aux_dead_window={s.aux_dead_window}: must be >= 1")
        _check(t.lr > 0, f"train.lr={t.lr}: must be > 0")
        _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
        _check(
            t.n_samples >= t.batch_size,
            f"train.n_samples={t.n_samples} is less than one batch (train.batch_size={t.batch_size})",
        )
        _check(t.log_every >= 1, f"train.log_every={t.log_every}: must be >= 1")
        _check(t.checkpoint_every >= 0, f"train.checkpoint_every={t.checkpoint_every}: must be >= 0")
        _check(e.every >= 0, f"eval.every={e.every}: must be >= 0")
        _check(0 < e.recovered_threshold <= 1, f"eval.recovered_threshold={e.recovered_threshold}: must be in (0, 1]")
        m = self.mfr
        _check(
            beta_parts(m.beta) is not None,
            f"mfr.beta={m.beta!r}: must be auto, recon, a number >= 0, NUMBER*auto or NUMBER*recon",
        )
        _check(-1 <= m.min_cosine <= 1, f"mfr.min_cosine={m.min_cosine}: must be in [-1, 1]")
        _check(-1 <= m.max_cosine <= 1, f"mfr.max_cosine={m.max_cosine}: must be in [-1, 1]")
        _check(-1 <= m.twin_guard <= 1, f"mfr.twin_guard={m.twin_guard}: must be in [-1, 1]")
        _check(0 < m.confirm_cosine <= 1, f"mfr.confirm_cosine={m.confirm_cosine}: must be in (0, 1]")
        _check(
            m.min_cosine < m.max_cosine, f"mfr.min_cosine={m.min_cosine} must be below mfr.max_cosine={m.max_cosine}"
        )
        _check(m.mmcs in MMCS_FORMS, f"mfr.mmcs={m.mmcs!r}: must be one of {', '.join(MMCS_FORMS)}")
        _check(
            m.match_every > 0
            or (m.mmcs == "max" and m.max_cosine >= 1 and m.twin_guard >= 1 and not m.idle_to_live)
            and m.confirm_cosine >= 1,
            f"mfr.match_every=0 (the dense penalty) is `max` without a ceiling, twin guard, idle_to_live or "
            f"confirmation only (mfr.mmcs={m.mmcs}, mfr.max_cosine={m.max_cosine}, mfr.twin_guard={m.twin_guard}, "
            f"mfr.idle_to_live={m.idle_to_live}, mfr.confirm_cosine={m.confirm_cosine}); set mfr.match_every >= 1",
        )
        for name, value in [
            ("mfr.warmup_steps", m.warmup_steps),
            ("mfr.match_every", m.match_every),
            ("mfr.idle_window", m.idle_window),
            ("mfr.reinit_window", m.reinit_window),
            ("mfr.reinit_max", m.reinit_max),
        ]:
            _check(value >= 0, f"{name}={value}: must be >= 0")
        _check(m.reinit_samples >= 1, f"mfr.reinit_samples={m.reinit_samples}: must be >= 1")
        _check(not m.enabled or s.n_members >= 2, "mfr.enabled needs sae.n_members >= 2")
        _check(
            t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
            f"train.device={t.device!r}: must be auto, cpu or cuda[:N]",
        )
        return self

    def _validate_architecture(self) -> None:
        """The architecture's name and its options: options of another architecture keep their defaults."""
        s = self.sae
        try:  # an unknown name, or an option the architecture refuses, named
            architecture_named(s.architecture, s.d_sae, s.options)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        fields = option_fields()
        for key, value in s.options.items():
            _check(key in fields, f"sae.{key}: no architecture has this option")
            owner, field_ = fields[key]
            _check(
                owner is ARCHITECTURES[s.architecture] or value == option_default(field_),
                f"sae.{key} is set but sae.architecture={s.architecture!r} (it needs {owner.name})",
            )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
