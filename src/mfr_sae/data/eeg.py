"""EEG recordings as vectors (paper Section 4.2; docs/design.md section 1), read with MNE-Python.

EDF/BDF (the TUH corpus is EDF), FIF and BrainVision files, or a folder of them. Per file: keep the EEG
channels chosen (`common`: those present in every file; a standard montage's name; or a list), band-pass
0.5-45 Hz with MNE's Butterworth IIR filter (order 5, applied forward and backward: zero phase), resample
to one rate, cut windows (`window_s` long every `hop_s`), z-score every channel of every window, and
flatten channels x samples into one vector. Files that do not fit (missing channels, shorter than a
window, unreadable) are skipped with the reason logged and returned, never silently.

Denoising (the paper's task): the SAE sees a noisy window (`add_noise` of `eeg_noise.py`, seeded per
batch) and is scored against the clean one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mfr_sae.data.eeg_noise import add_noise
from mfr_sae.data.vectors import DataError
from mfr_sae.extras import require
from mfr_sae.seeding import EEG_EVAL_NOISE, EEG_ORDER_STREAM, EEG_TRAIN_NOISE, seeded_generator

if TYPE_CHECKING:
    from mne.io import BaseRaw

log = logging.getLogger(__name__)
SUFFIXES = (".edf", ".bdf", ".fif", ".vhdr")


def find_recordings(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{path}: no EDF, BDF, FIF or BrainVision (.vhdr) files in this folder")
        return files
    if not path.is_file():
        raise DataError(f"EEG file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: expected an .edf, .bdf, .fif or .vhdr file, or a folder of them")
    return [path]


def require_mne() -> ModuleType:
    return require("mne", "reading EEG recordings")


def read_raw(path: Path) -> BaseRaw:
    """The recording's EEG channels, loaded (MNE Raw)."""
    mne = require_mne()
    try:
        raw = mne.io.read_raw(path, preload=True, verbose="error")
    except Exception as err:
        raise DataError(f"{path}: cannot read ({str(err).splitlines()[0][:160]})") from None
    return raw.pick("eeg")


def select_channels(files: list[list[str]], channels: str | list[str]) -> list[str]:
    """The channels kept: a list as given; `common`: those in every file, in the first file's order; the
    name of an MNE standard montage (`colin27_1020`, `biosemi64`, ...): its channels found in every file,
    in the montage's order."""
    if not isinstance(channels, str):
        return list(channels)
    if channels == "common":
        order = files[0] if files else []
    else:
        mne = require_mne()
        try:
            order = mne.channels.make_standard_montage(channels).ch_names
        except ValueError:
            raise DataError(
                f"data.channels={channels!r}: neither `common`, a list of names, nor an MNE "
                f"montage ({', '.join(mne.channels.get_builtin_montages()[:6])}, ...)"
            ) from None
    return [c for c in order if all(c in names for names in files)]


@dataclass
class EEGWindows:
    """Clean windows [n_windows, n_channels, n_samples], for each the recording it comes from and its
    first sample, and what was made of each file."""

    windows: np.ndarray
    channels: list[str]
    sfreq: float
    recording: np.ndarray
    starts: np.ndarray
    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def vectors(self) -> np.ndarray:
        return self.windows.reshape(len(self.windows), -1)


def band_pass(raw: BaseRaw, l_freq: float = 0.5, h_freq: float = 45.0, order: int = 5) -> BaseRaw:
    """Butterworth band-pass of the given order, zero phase (MNE applies it forward and backward)."""
    return raw.filter(
        l_freq, h_freq, method="iir", iir_params={"order": order, "ftype": "butter"}, phase="zero", verbose="error"
    )


def window_starts(n_samples: int, length: int, hop: int) -> np.ndarray:
    return np.arange(0, n_samples - length + 1, hop)


def cut_windows(data: np.ndarray, length: int, hop: int) -> np.ndarray:
    """[channels, time] -> [windows, channels, length], a window every `hop` samples."""
    starts = window_starts(data.shape[1], length, hop)
    return np.stack([data[:, s : s + length] for s in starts]) if len(starts) else np.empty((0, len(data), length))


def zscore(windows: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Every channel of every window to mean 0, sd 1."""
    mean = windows.mean(axis=-1, keepdims=True)
    sd = windows.std(axis=-1, keepdims=True)
    scored: np.ndarray = (windows - mean) / np.maximum(sd, eps)
    return scored


def load_eeg(
    path: str | Path,
    channels: str | list[str] = "common",
    sfreq: float = 250.0,
    window_s: float = 1.0,
    hop_s: float = 1.0,
    l_freq: float = 0.5,
    h_freq: float = 45.0,
    order: int = 5,
) -> EEGWindows:
    """Read, filter, resample, window and z-score every usable recording under `path`."""
    raws, skipped = [], []
    recordings = find_recordings(path)
    require_mne()  # before any file: read_raw's errors skip a file, a missing MNE must stop the run
    for file in recordings:
        try:
            raws.append((file, read_raw(file)))
        except DataError as err:
            skipped.append({"file": str(file), "reason": str(err)})
    names = select_channels([raw.ch_names for _, raw in raws], channels)
    length, hop = round(window_s * sfreq), round(hop_s * sfreq)
    parts, recording, starts = [], [], []
    files: list[dict[str, Any]] = []
    for file, raw in raws:
        missing = [c for c in names if c not in raw.ch_names]
        if missing or not names:
            skipped.append(
                {
                    "file": str(file),
                    "reason": f"missing channels {missing[:5]}" if missing else "no EEG channels in common",
                }
            )
            continue
        if raw.n_times / raw.info["sfreq"] < window_s:
            skipped.append(
                {
                    "file": str(file),
                    "reason": f"{raw.n_times / raw.info['sfreq']:.2f} s, shorter than one {window_s} s window",
                }
            )
            continue
        raw = band_pass(raw.pick(names), l_freq, h_freq, order)
        if raw.info["sfreq"] != sfreq:
            raw = raw.resample(sfreq, verbose="error")
        windows = zscore(cut_windows(raw.get_data(), length, hop))
        parts.append(windows.astype(np.float32))
        starts.append(window_starts(raw.n_times, length, hop))
        recording.append(np.full(len(windows), len(files)))
        files.append(
            {
                "file": str(file),
                "windows": len(windows),
                "samples": int(raw.n_times),
                "minutes": float(raw.n_times / sfreq / 60),
            }
        )
    for entry in skipped:
        log.warning("skipped %s: %s", entry["file"], entry["reason"])
    if not parts:
        raise DataError(f"{path}: no usable EEG recording ({'; '.join(s['reason'] for s in skipped)[:300]})")
    return EEGWindows(
        np.concatenate(parts), names, sfreq, np.concatenate(recording), np.concatenate(starts), files, skipped
    )


def split_holdout(eeg: EEGWindows, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and held-out windows: the last `fraction` of every recording is held out;
    windows that straddle the cut are dropped, so no held-out sample is ever trained on."""
    length = eeg.windows.shape[-1]
    cut = np.array([int((1 - fraction) * f["samples"]) for f in eeg.files])[eeg.recording]
    train = np.flatnonzero(eeg.starts + length <= cut)
    held = np.flatnonzero(eeg.starts >= cut)
    if not len(train) or not len(held):
        raise DataError(
            f"the EEG recordings are too short to hold out {fraction:.0%} of each and train on "
            f"the rest with {length}-sample windows"
        )
    return train, held


class EEGData:
    """Denoising pairs from EEG recordings: batches of (noisy, clean) windows flattened to vectors.

    The stream is a seeded permutation of the training windows per epoch, and each batch's noise is
    seeded by (seed, step), so a resumed run sees the same pairs. The SAE is trained on the noisy
    vectors with its loss against the clean ones; `noise=none` makes the two equal (reconstruction)."""

    ground_truth = None

    def __init__(
        self,
        path: str | Path,
        channels: str | list[str] = "common",
        sfreq: float = 250.0,
        window_s: float = 1.0,
        hop_s: float = 1.0,
        holdout_fraction: float = 0.1,
        noise: str = "none",
        snr_db: float = 0.0,
        line_freq: float = 50.0,
        seed: int = 0,
    ):
        self.eeg = load_eeg(path, channels, sfreq, window_s, hop_s)
        train, held = split_holdout(self.eeg, holdout_fraction)
        vectors = torch.from_numpy(self.eeg.vectors)
        self.train, self.held = vectors[train], vectors[held]
        self.window_shape = self.eeg.windows.shape[1:]
        self.d = vectors.shape[1]
        self.noise, self.snr_db, self.line_freq, self.seed = noise, snr_db, line_freq, seed
        self.holdout_fraction = holdout_fraction

    def corrupt(self, clean: Tensor, *key: int) -> Tensor:
        """The noisy copy of clean vectors, seeded by (seed, *key)."""
        windows = clean.numpy().reshape(len(clean), *self.window_shape)
        noisy = add_noise(
            windows, self.noise, self.snr_db, self.eeg.sfreq, seed=[self.seed, *key], line_freq=self.line_freq
        )
        return torch.from_numpy(noisy.reshape(len(clean), -1))

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """(noisy, clean) batches from step `start_step` on; epochs repeat with new orders."""
        n = len(self.train)
        epoch, position = divmod(start_step * batch_size, n)
        order = torch.randperm(n, generator=seeded_generator(self.seed, EEG_ORDER_STREAM, epoch))
        step = start_step
        while True:
            parts, needed = [], batch_size
            while needed:
                take = order[position : position + needed]
                parts.append(take)
                needed -= len(take)
                position += len(take)
                if position == n:
                    epoch, position = epoch + 1, 0
                    order = torch.randperm(n, generator=seeded_generator(self.seed, EEG_ORDER_STREAM, epoch))
            clean = self.train[torch.cat(parts)]
            yield self.corrupt(clean, EEG_TRAIN_NOISE, step), clean
            step += 1

    def eval_vectors(self, n: int) -> tuple[Tensor, Tensor]:
        """(noisy, clean): the first min(n, held-out) held-out windows, with their own seeded noise."""
        clean = self.held[:n]
        return self.corrupt(clean, EEG_EVAL_NOISE), clean

    def describe(self) -> dict[str, Any]:
        """What was read: files, channels, rate, windows for training and evaluation, skipped files."""
        return {
            "files": self.eeg.files,
            "skipped": self.eeg.skipped,
            "channels": self.eeg.channels,
            "n_channels": len(self.eeg.channels),
            "sfreq": self.eeg.sfreq,
            "window_samples": int(self.window_shape[1]),
            "train_windows": len(self.train),
            "holdout_windows": len(self.held),
            "holdout_fraction": self.holdout_fraction,
            "noise": self.noise,
            "snr_db": self.snr_db,
        }
