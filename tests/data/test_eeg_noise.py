import numpy as np
import pytest

from mfr_sae.data.eeg import zscore
from mfr_sae.data.eeg_noise import NOISE_KINDS, add_noise, snr_db

SFREQ = 250.0


@pytest.mark.parametrize("kind", [k for k in NOISE_KINDS if k != "none"])
@pytest.mark.parametrize("target", [-5.0, 0.0, 10.0])
def test_each_noise_model_hits_its_snr(kind, target):
    clean = zscore(np.random.default_rng(1).standard_normal((20, 4, 250)))
    noisy = add_noise(clean, kind, target, SFREQ, seed=2)
    assert snr_db(clean, noisy) == pytest.approx(target, abs=1e-3)
    assert not np.array_equal(noisy, clean)
    assert np.array_equal(add_noise(clean, "none", target, SFREQ), clean)


def test_line_noise_sits_at_the_mains_frequency():
    clean = np.zeros((1, 1, 250)) + 1e-3
    noise = add_noise(clean, "line", 0.0, SFREQ, line_freq=60.0)[0, 0] - clean[0, 0]
    spectrum = np.abs(np.fft.rfft(noise))
    assert np.fft.rfftfreq(250, 1 / SFREQ)[spectrum.argmax()] == pytest.approx(60.0)
