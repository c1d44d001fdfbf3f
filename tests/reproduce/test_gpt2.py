import json

import pytest

pytest.importorskip("transformers")

from mfr_sae.cli import main
from mfr_sae.reproduce.gpt2 import KS, reproduce_gpt2


def test_reproduce_gpt2_on_a_local_tiny_model(tiny_gpt2, tmp_path):
    model_dir, corpus = tiny_gpt2
    small = ["sae.d_sae=64", "train.batch_size=100", "eval.lm_sequences=10", "mfr.match_every=1"]
    reproduce_gpt2(
        tmp_path,
        quick=True,
        model=str(model_dir),
        text=str(corpus),
        progress=False,
        overrides=small,
        tokens=3000,
        holdout=500,
        context=32,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["members"]) == 10
    assert sorted(m["k"] for m in results["members"] if m["mfr"]) == KS
    for member in results["members"]:
        for key in ("k", "mfr", "mse", "ce_clean", "ce_zero", "ce_sae", "frac_recovered", "kl"):
            assert member[key] is not None, key
    assert results["beta"] > 0 and len(results["decoder_distance"]["mfr"]) == 5
    report = (tmp_path / "report.md").read_text()
    assert "Table 1" in report and "0.00132" in report and "Table 2" in report and "data:image" not in report
    assert "![Mean L2 distance" in report and "(fig_decoder_distance.png)" in report and "Trained now: 2" in report
    assert (tmp_path / "fig_decoder_distance.png").stat().st_size > 0


def test_without_the_weights_it_says_what_to_provide(tmp_path, capsys):
    code = main(
        [
            "reproduce",
            "gpt2",
            "--quick",
            "--out",
            str(tmp_path),
            "--model",
            str(tmp_path / "gpt2-missing"),
            "--text",
            str(tmp_path / "owt.txt"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot load model" in err and "pass a local path" in err
