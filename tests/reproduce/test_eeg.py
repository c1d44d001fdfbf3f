import json

import numpy as np
import pytest

mne = pytest.importorskip("mne")

from mfr_sae.cli import main  # noqa: E402
from mfr_sae.reproduce.eeg import KS, reproduce_eeg  # noqa: E402

SMALL = ["sae.d_sae=64", "train.batch_size=64", "train.n_samples=1280", "eval.n_samples=200", "mfr.reinit_samples=128"]


def _recordings(folder, n=2, seconds=60.0, sfreq=200.0):
    """Short FIF recordings made here (alpha-like rhythm plus noise on 6 scalp channels)."""
    folder.mkdir()
    names = ["Fz", "Cz", "Pz", "O1", "Oz", "O2"]
    for i in range(n):
        rng = np.random.default_rng(i)
        t = np.arange(int(seconds * sfreq)) / sfreq
        data = [
            np.sin(2 * np.pi * rng.uniform(8, 12) * t + rng.uniform(0, 6)) + 0.5 * rng.standard_normal(len(t))
            for _ in names
        ]
        raw = mne.io.RawArray(np.array(data) * 1e-5, mne.create_info(names, sfreq, "eeg"), verbose="error")
        raw.save(folder / f"rec{i}_raw.fif", verbose="error")
    return folder


def test_a_quick_eeg_reproduction_writes_every_file(tmp_path):
    data = _recordings(tmp_path / "eeg")
    out = tmp_path / "out"
    reproduce_eeg(out, data, quick=True, seeds=2, noise="line", snr_db=5.0, progress=False, overrides=SMALL)
    for name in (
        "report.md",
        "results.json",
        "fig_mse_by_k.png",
        "fig_decoder_distance.png",
        "fig_denoising_example.png",
    ):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["recordings"]["n_channels"] == 6 and len(results["recordings"]["files"]) == 2
    assert len(results["members"]) == 2 * 10
    for seed in (0, 1):
        for mfr in (False, True):
            assert sorted(m["k"] for m in results["members"] if m["seed"] == seed and m["mfr"] == mfr) == KS
    for member in results["members"]:
        assert member["snr_in_db"] == pytest.approx(5.0, abs=0.01)  # exact per window, so over the set
        assert member["mse_clean"] > 0 and np.isfinite(member["snr_out_db"])
        if not member["mfr"]:
            assert member["reinits"] == 0 and member["last_reinit_step"] is None
    events = sum(m["reinits"] for m in results["members"])
    assert events == results["reinit_events"] and results["train_seconds"] > 0
    report = (out / "report.md").read_text()
    assert "Table 3" in report and "0.42" in report and "line noise at 5 dB SNR" in report
    assert "SNR gain MFR (dB)" in report
    assert "data:image" not in report and report.count("](fig_") == 3 and " ± " in report
    assert "*MSE to the clean window on held-out data by k" in report  # each figure's caption
    # the test is over seeds (per seed, the mean over k of MFR - baseline), never over the k values of a seed
    test = results["mse_test"]
    assert test["unit"] == "seed" and test["n"] == 2 and test["t_test_p"] is not None
    for seed in (0, 1):
        for mfr, key in ((True, "mfr_per_seed"), (False, "baseline_per_seed")):
            mse = [m["mse_clean"] for m in results["members"] if m["seed"] == seed and m["mfr"] == mfr]
            assert test[key][seed] == pytest.approx(np.mean(mse))
    diffs = np.subtract(test["mfr_per_seed"], test["baseline_per_seed"])
    assert test["mean_diff"] == pytest.approx(diffs.mean())
    assert test["ci95"][0] <= test["mean_diff"] <= test["ci95"][1]
    assert test["wilcoxon_p"] is None  # 2 seeds: Wilcoxon cannot go below 0.5
    assert [row["k"] for row in results["mse_by_k"]] == KS
    assert "Test over the 2 seeds" in report and "paired t-test p = " in report
    # a second call reuses the finished runs
    again = reproduce_eeg(out, data, quick=True, seeds=2, noise="line", snr_db=5.0, progress=False, overrides=SMALL)
    assert again["members"] == results["members"]
    assert {r["how"] for r in again["runs"]["runs"]} == {"reused"}
    assert again["train_seconds"] == results["train_seconds"]
    reused = "Reused from an earlier invocation, not trained now: 4 (`runs/seed0/baseline`"
    assert reused in (out / "report.md").read_text()
    # one seed (its runs reused): no test, and no p-value anywhere in the report
    one = reproduce_eeg(out, data, quick=True, seeds=1, noise="line", snr_db=5.0, progress=False, overrides=SMALL)
    assert one["mse_test"]["n"] == 1 and one["mse_test"]["t_test_p"] is None
    assert "not independent replicates" in one["mse_test"]["note"]
    report = (out / "report.md").read_text()
    assert "One seed: no test; the k values are not independent replicates" in report
    assert "p = " not in report and "p-value" not in report


def test_a_folder_without_usable_recordings_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "eeg").mkdir()
    (tmp_path / "eeg" / "a.edf").write_bytes(b"not an edf")
    code = main(
        [
            "reproduce",
            "eeg",
            "--quick",
            "--data",
            str(tmp_path / "eeg"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no usable EEG recording" in err and "cannot read" in err
    assert len(err.strip().splitlines()) == 1
