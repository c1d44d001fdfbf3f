import json
import math

import numpy as np
import pytest
import torch

from mfr_sae.checkpoint import save_checkpoint
from mfr_sae.cli import main
from mfr_sae.compare import compare, decoder_agreement
from mfr_sae.ensemble import Ensemble
from mfr_sae.errors import CheckpointError


def test_a_permuted_copy_agrees_fully():
    a = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    mcc, shared, cos = decoder_agreement(a, a[torch.randperm(50)])
    assert mcc == pytest.approx(1.0) and shared == 1.0 and len(cos) == 50


def test_random_directions_agree_as_chance_predicts():
    gen = torch.Generator().manual_seed(0)
    d, h = 256, 128
    a, b = torch.randn(h, d, generator=gen), torch.randn(h, d, generator=gen)
    mcc, shared, _ = decoder_agreement(a, b)
    # matched cosines of random directions are at most the expected max of h N(0, 1/d) cosines
    assert 0 < mcc < math.sqrt(2 * math.log(h * h) / d)
    assert shared == 0.0
    # one latent each: the matched cosine is a plain random cosine, mean 0, sd 1/sqrt(d)
    single = [
        decoder_agreement(torch.randn(1, d, generator=gen), torch.randn(1, d, generator=gen))[0] for _ in range(400)
    ]
    assert abs(np.mean(single)) < 3 / math.sqrt(d * 400)
    assert np.std(single) == pytest.approx(1 / math.sqrt(d), rel=0.15)


def _run(path, ks, seed, d=16, h=40):
    save_checkpoint(path, Ensemble(d, h, ks, seed=seed))
    return path


def test_compare_runs_member_by_member(tmp_path):
    a = _run(tmp_path / "a", [2, 4], seed=0)
    b = _run(tmp_path / "b", [4, 2], seed=1)
    summary = compare([a, a], tmp_path / "self")
    assert summary["pw_mcc"] == pytest.approx(1.0) and summary["shared_frac"] == 1.0
    summary = compare([a, b], tmp_path / "ab")
    assert [m["k"] for m in summary["members"]] == [2, 4]
    assert summary["pw_mcc"] < 0.9
    saved = json.loads((tmp_path / "ab" / "compare.json").read_text())
    assert set(saved) >= {"pw_mcc", "shared_frac", "members"}
    assert set(saved["members"][0]) >= {"k", "pw_mcc", "shared_frac"}
    assert (tmp_path / "ab" / "matched_cosines.png").stat().st_size > 0


def test_different_shapes_or_no_common_k_are_clear_errors(tmp_path, capsys):
    a = _run(tmp_path / "a", [2], seed=0)
    with pytest.raises(CheckpointError, match="runs differ in d or h"):
        compare([a, _run(tmp_path / "b", [2], seed=0, h=41)], tmp_path / "out")
    with pytest.raises(CheckpointError, match="no k in common"):
        compare([a, _run(tmp_path / "c", [3], seed=0)], tmp_path / "out")
    assert main(["compare", str(a), "--out", str(tmp_path / "out")]) == 2
    assert "at least two runs" in capsys.readouterr().err


def test_compare_reports_each_runs_twin_fraction(tmp_path):
    a = _run(tmp_path / "a", [2, 4], seed=0)
    twinned = Ensemble(16, 40, [2, 4], seed=1)
    with torch.no_grad():
        twinned.W_enc[1, :10] = twinned.W_enc[1, 10:20]  # member 1: latents 0-9 copy latents 10-19
    save_checkpoint(tmp_path / "b", twinned)
    summary = compare([a, tmp_path / "b"], tmp_path / "out")
    assert [t["members"] for t in summary["twin_frac"]] == [[0.0, 0.0], [0.0, 0.5]]
    assert summary["twin_frac"][1]["mean"] == 0.25
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["twin_frac"][1]["run"] == str(tmp_path / "b")


def test_out_holding_a_comparison_is_refused_unless_overwrite(tmp_path, capsys):
    a, b = _run(tmp_path / "a", [2], seed=0), _run(tmp_path / "b", [2], seed=1)
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    first = (out / "compare.json").read_text()
    capsys.readouterr()
    assert main(["compare", str(a), str(a), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert (out / "compare.json").read_text() == first  # untouched
    assert main(["compare", str(a), str(a), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "compare.json").read_text())["pw_mcc"] == pytest.approx(1.0)


def test_the_histogram_labels_each_series_by_run_folder_and_member(tmp_path, monkeypatch):
    import mfr_sae.compare as compare_module

    legends = []
    monkeypatch.setattr(
        compare_module,
        "save_figure",
        lambda fig, path: legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()]),
    )
    a = _run(tmp_path / "seed0" / "mfr", [2, 4], seed=0)
    b = _run(tmp_path / "seed1" / "mfr", [4, 2], seed=1)
    compare([a, b], tmp_path / "out")
    assert legends == [
        [
            "seed0/mfr member 0, seed1/mfr member 1 (k=2)",
            "seed0/mfr member 1, seed1/mfr member 0 (k=4)",
            "threshold 0.7",
        ]
    ]
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [m["member_per_run"] for m in saved["members"]] == [[0, 1], [1, 0]]
