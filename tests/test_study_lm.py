import json

import pytest

pytest.importorskip("transformers")

from mfr_sae.cli import main
from mfr_sae.evaluate import HEADLINE
from mfr_sae.study_lm import KS, study_lm

PROBE_DATASET = "131_temp_cat_Typical Time"  # a short sae-probes task
SMALL = ["train.batch_size=100", "eval.lm_sequences=4", "mfr.match_every=5"]


def run_small(tmp_path, tiny_gpt2, extra=()):
    model_dir, corpus = tiny_gpt2
    return study_lm(
        tmp_path,
        str(model_dir),
        str(corpus),
        tokens=3000,
        cache_tokens=1500,  # two passes over the cache
        seeds=2,
        holdout=300,
        context=32,
        progress=False,
        extra=[*SMALL, *extra],
    )


def test_study_lm_pairs_the_defaults_with_the_baseline_over_seeds(tiny_gpt2, tmp_path):
    # confirmation at 0.4: on 30 steps of a tiny model no latent reaches the defaults' 0.8, and nothing is pulled
    summary = run_small(tmp_path, tiny_gpt2, ["mfr.confirm_cosine=0.4", "mfr.max_cosine=0.4"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tests"]["fvu"]["n"] == 2 and saved["cache_tokens"] == 1500 and saved["d"] == 32
    for arm in ("baseline", "mfr"):
        run = json.loads((tmp_path / "seed1" / arm / "results.json").read_text())
        assert run["config"]["data"]["seed"] == 1 and run["config"]["train"]["seed"] == 1
        assert run["config"]["sae"]["d_sae"] == 128 and run["config"]["mfr"]["enabled"] == (arm == "mfr")
        assert [m["k"] for m in run["members"]] == KS
        assert all(m["frac_recovered"] is not None for m in run["members"])
    # each arm's measures per seed, and the paired difference is theirs
    fvu = summary["values"]
    assert summary["tests"]["fvu"]["mean_diff"] == pytest.approx(
        sum(m - b for m, b in zip(fvu["mfr"]["fvu"], fvu["baseline"]["fvu"])) / 2
    )
    assert not summary["tests"]["fvu"]["identical_arms"] and summary["tests"]["fvu"]["p_holm"] is not None
    assert [row["k"] for row in summary["per_k"]] == KS
    across = summary["across_seeds"]
    assert len(across["matrix"]) == 4 and across["test"]["n"] == 2 and across["test"]["min_p"] == 0.5
    report = (tmp_path / "report.md").read_text()
    assert "## Verdict" in report and "Holm p" in report and "2 seeds" in report and "2.0 passes" in report


def test_an_mfr_arm_with_no_pull_is_the_baseline_of_its_seed(tiny_gpt2, tmp_path):
    """beta 0: the MFR arm trains as the baseline; paired on the same data and initialisation, every difference
    is exactly 0 (a broken pairing, e.g. another shuffle or initialisation per arm, would differ)."""
    summary = run_small(tmp_path, tiny_gpt2, ["mfr.beta=0"])
    for key in ("fvu", "frac_recovered", "kl"):
        assert summary["tests"][key]["identical_arms"], key
    assert "no test (all differences zero" in (tmp_path / "report.md").read_text()


def test_study_lm_needs_two_seeds(tmp_path, capsys):
    code = main(["study-lm", "--out", str(tmp_path), "--seeds", "1", "--no-progress"])
    assert code == 2 and "--seeds 1" in capsys.readouterr().err


def test_study_lm_evaluate_tests_probing_and_absorption_beside_reconstruction(tiny_gpt2_256, tmp_path, capsys):
    """--evaluate: each run's evaluation.json (as `mfr-sae evaluate` writes it), the probing AUCs in the Holm family
    beside FVU, loss recovered and KL; the tiny model knows too few letters, so absorption is not measurable: no
    test, and the report says why with the filter's numbers."""
    pytest.importorskip("sae_probes")
    model_dir, corpus = tiny_gpt2_256
    args = ["study-lm", "--out", str(tmp_path), "--model", str(model_dir), "--text", str(corpus)]
    args += ["--hook", "blocks.1.hook_resid_post", "--tokens", "3000", "--cache-tokens", "1500", "--seeds", "2"]
    args += ["--context", "32"]
    args += ["--evaluate", "--probe-datasets", PROBE_DATASET, "--probe-cache", str(tmp_path / "acts")]
    args += ["--absorption-words", "100000", "--no-progress"]  # more than the vocabulary's 131: all of them
    for override in [*SMALL, "sae.n_members=2", "sae.k=[4,8]", "sae.d_sae=64", "data.holdout=300"]:
        args += ["--set", override]
    assert main([*args, "--set", "eval.n_samples=300"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["tested"]) == ["fvu", "frac_recovered", "kl", *HEADLINE]
    for arm in ("baseline", "mfr"):
        evaluation = json.loads((tmp_path / "seed1" / arm / "evaluation.json").read_text())
        aucs = [m["by_k"]["16"]["test_auc"] for m in evaluation["probing"]["members"]]
        assert summary["values"][arm]["probe_auc_k16"][1] == pytest.approx(sum(aucs) / 2)
    probing = summary["tests"]["probe_auc_k1"]
    assert probing["n"] == 2 and "p_holm" in probing
    assert summary["tests"]["absorption_fraction"]["n"] == 0  # not measurable: no pairs
    assert [row["k"] for row in summary["per_k"]] == [4, 8]  # the runs' own ks
    assert summary["evaluation"]["letters"]["letters_passing"] < 20
    report = (tmp_path / "report.md").read_text()
    assert "Holm over these 7" in report and "absorption not measurable here" in report
    assert "sparse probing AUC, 16 latents: MFR" in capsys.readouterr().out
