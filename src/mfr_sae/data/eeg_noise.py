"""Noise that corrupts clean EEG windows for denoising (the paper's task): white Gaussian noise, 50/60 Hz line
noise, EMG-like broadband bursts, or electrode pops with baseline wander, scaled per window to a target SNR
in dB (`add_noise`), and the SNR of an estimate against the clean windows (`snr_db`)."""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfiltfilt

from mfr_sae.config import EEG_NOISE_KINDS as NOISE_KINDS
from mfr_sae.data.vectors import DataError


def _scaled(noise: np.ndarray, clean: np.ndarray, snr_db: float) -> np.ndarray:
    """Noise rescaled per window so that 10 log10(P_clean / P_noise) = snr_db exactly."""
    p_clean = (clean**2).mean(axis=(1, 2), keepdims=True)
    p_noise = np.maximum((noise**2).mean(axis=(1, 2), keepdims=True), 1e-20)
    scaled: np.ndarray = noise * np.sqrt(p_clean / p_noise / 10 ** (snr_db / 10))
    return scaled


def add_noise(
    clean: np.ndarray, kind: str, snr_db: float, sfreq: float, seed: int | list[int] = 0, line_freq: float = 50.0
) -> np.ndarray:
    """Noisy copies of clean windows [n, channels, samples] at the target SNR (dB); seeded by `seed`."""
    if kind not in NOISE_KINDS:
        raise DataError(f"noise {kind!r}: must be one of {', '.join(NOISE_KINDS)}")
    if kind == "none":
        return clean.copy()
    rng = np.random.default_rng(seed)
    n, channels, samples = clean.shape
    t = np.arange(samples) / sfreq
    if kind == "white":
        noise = rng.standard_normal(clean.shape)
    elif kind == "line":  # mains hum: a sinusoid per channel, random phase and amplitude
        phase = rng.uniform(0, 2 * np.pi, (n, channels, 1))
        noise = rng.uniform(0.5, 1.5, (n, channels, 1)) * np.sin(2 * np.pi * line_freq * t + phase)
    elif kind == "emg":  # muscle: broadband (20 Hz up) noise in bursts of 50-300 ms
        sos = butter(4, min(20 / (sfreq / 2), 0.99), btype="high", output="sos")
        broadband = sosfiltfilt(sos, rng.standard_normal(clean.shape), axis=-1)
        envelope = np.zeros(clean.shape)
        for i in range(n):
            for _ in range(rng.integers(1, 4)):
                width = int(rng.uniform(0.05, 0.3) * sfreq)
                start = rng.integers(0, max(1, samples - width))
                envelope[i, :, start : start + width] += np.hanning(width)[: samples - start]
        noise = broadband * envelope
    else:  # pops: a step that decays on one channel, plus slow baseline wander on all
        noise = np.sin(
            2 * np.pi * rng.uniform(0.05, 0.4, (n, channels, 1)) * t + rng.uniform(0, 2 * np.pi, (n, channels, 1))
        )
        for i in range(n):
            ch, start = rng.integers(channels), rng.integers(samples)
            noise[i, ch, start:] += 5 * np.exp(-(t[start:] - t[start]) / 0.1)
    noisy: np.ndarray = (clean + _scaled(noise, clean, snr_db)).astype(clean.dtype)
    return noisy


def snr_db(clean: np.ndarray, estimate: np.ndarray) -> float:
    """10 log10(P_clean / P_(estimate - clean)) over all windows."""
    return float(10 * np.log10((clean**2).mean() / max(((estimate - clean) ** 2).mean(), 1e-20)))
