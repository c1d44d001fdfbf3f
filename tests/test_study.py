import json

import pytest

from mfr_sae.cli import main
from mfr_sae.study_catalogue import BASELINE, DEFAULT_SETTING, settings


def test_study_end_to_end_tunes_then_judges_on_held_out_data_and_reuses_its_runs(tmp_path, monkeypatch):
    import mfr_sae.study_catalogue as catalogue

    tiny = ["train.n_samples=3072", "eval.n_samples=1000"]
    monkeypatch.setattr(catalogue, "COMMON", catalogue.COMMON + tiny)
    two = (DEFAULT_SETTING, "mnn 0.3*recon")  # to keep the test short
    out = tmp_path / "study"
    # learnable marked large, to see --large-replicates reach it without training another dataset
    monkeypatch.setitem(catalogue.DATASETS, "learnable", {**catalogue.DATASETS["learnable"], "large": True})
    args = ["study", "--quick", "--replicates", "3", "--tune-replicates", "2", "--large-replicates", "2"]
    args += [
        "--candidates",
        ",".join(two),
        "--data",
        "learnable",
        "--architectures",
        "topk,batchtopk",
        "--out",
        str(out),
    ]
    assert main([*args, "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    assert lines[0] == "# MFR study: a setting chosen on tuning data, judged on held-out data"  # the default path
    assert lines[2].startswith("Chosen on the tuning split (learnable, 2 replicates): ")
    assert lines[4].startswith("**held-out learnable: ") and "the baseline" in lines[4]
    assert (out / "fig_fvu_mcc.png").stat().st_size > 0 and "(fig_fvu_mcc.png)" in report
    saved = json.loads((out / "results.json").read_text())
    assert (saved["judged_on"], saved["tuned"], saved["judged_split"]["first_replicate"]) == ("heldout", True, 100)
    assert set(saved["tuning"]["learnable"]["rows"]) == {BASELINE, *two}
    heldout = saved["datasets"]["learnable"]
    assert set(heldout["rows"]) == {BASELINE, DEFAULT_SETTING, *([saved["chosen"]] if saved["chosen"] else [])}
    assert heldout["config"]["data"]["seed"] == 1 and saved["tuning"]["learnable"]["config"]["data"]["seed"] == 0
    assert set(heldout["rows"][DEFAULT_SETTING]["tests"]) == {
        "gt_mcc",
        "fvu",
        "twin_frac",
        "gt_distinct",
        "silent_frac",
        "pairwise_mmcs_hungarian",
        "consensus_mcc",
        "across_pw_mcc",
    }
    assert "p_holm_all" in heldout["rows"][DEFAULT_SETTING]["tests"]["gt_mcc"]
    assert len(heldout["values"][BASELINE]["gt_mcc"]) == 2 and heldout["replicates"] == 2
    assert saved["replicates"] == 3 and "--large-replicates 2" in report
    assert len(saved["tuning"]["learnable"]["values"][BASELINE]["gt_mcc"]) == 2
    run = json.loads((out / "heldout" / "learnable" / "baseline" / "rep1" / "results.json").read_text())
    assert (run["config"]["data"]["seed"], run["config"]["train"]["seed"]) == (1, 101) and not (out / "test").exists()
    # the architecture axis: BatchTopK alone against BatchTopK with the defaults, in the same Holm family
    batchtopk = saved["datasets"]["learnable batchtopk"]
    assert (
        set(batchtopk["rows"]) == {BASELINE, DEFAULT_SETTING}
        and batchtopk["config"]["sae"]["architecture"] == "batchtopk"
    )
    assert batchtopk["rows"][BASELINE]["measures"]["gt_mcc"] != heldout["rows"][BASELINE]["measures"]["gt_mcc"]
    assert (out / "batchtopk" / "heldout" / "learnable" / "baseline" / "rep1" / "results.json").is_file()
    assert (
        "--architectures topk,batchtopk --data learnable " in report and "## Held-out learnable batchtopk: " in report
    )
    assert lines[6].startswith("**held-out learnable batchtopk: ")
    # a second run reuses every finished run (nothing retrained: the results files stay as they were)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("results.json") if "rep" in p.parent.name}
    assert main([*args, "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # a folder of another setting is refused, naming the field, not mixed in
    monkeypatch.setattr(catalogue, "COMMON", catalogue.COMMON + ["train.lr=0.002"])
    assert main([*args, "--no-progress"]) == 2
    assert main(["study", "--data", "nope", "--out", str(out)]) == 2
    assert main(["study", "--large-replicates", "1", "--out", str(out)]) == 2
    assert main(["study", "--candidates", "hungarian 9*auto", "--out", str(out)]) == 2
    assert main(["study", "--tune-on", "learnable,nope", "--out", str(out)]) == 2
    assert main(["study", "--architectures", "jumprelu", "--out", str(out)]) == 2


def test_study_judge_on_test_trains_only_the_baseline_and_the_defaults_on_the_test_split(tmp_path):
    """`--judge-on test`: no tuning and no choice; the baseline and the frozen defaults alone on the test split
    (true features data.seed 2, replicates 200..), for TopK and each of --architectures, runs under OUT/test/."""
    out = tmp_path / "study"
    args = ["study", "--quick", "--judge-on", "test", "--replicates", "2", "--data", "learnable"]
    args += ["--architectures", "topk,batchtopk", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    saved = json.loads((out / "results.json").read_text())
    assert (saved["judged_on"], saved["tuned"], saved["chosen"], saved["tuning"]) == ("test", False, None, {})
    assert saved["judged_split"] == {"feature_seed": 2, "first_replicate": 200}
    assert [s["name"] for s in saved["settings"]] == [BASELINE, DEFAULT_SETTING]
    assert set(saved["datasets"]) == {"learnable", "learnable batchtopk"}
    judged = {s.folder for s in settings() if s.name in (BASELINE, DEFAULT_SETTING)}
    for key, folder in (("learnable", out), ("learnable batchtopk", out / "batchtopk")):
        data = saved["datasets"][key]
        assert set(data["rows"]) == {BASELINE, DEFAULT_SETTING} and data["split"] == "test"
        assert data["config"]["data"]["seed"] == 2 and "p_holm_all" in data["rows"][DEFAULT_SETTING]["tests"]["gt_mcc"]
        assert {p.name for p in (folder / "test" / "learnable").iterdir()} == judged
        for replicate in (0, 1):
            run = json.loads(
                (folder / "test" / "learnable" / "baseline" / f"rep{replicate}" / "results.json").read_text()
            )
            cfg = run["config"]
            assert (cfg["data"]["seed"], cfg["data"]["stream_seed"], cfg["train"]["seed"]) == (
                2,
                200 + replicate,
                200 + replicate,
            )
    assert saved["datasets"]["learnable batchtopk"]["config"]["sae"]["architecture"] == "batchtopk"
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"test", "batchtopk"}  # no tuning, no held-out runs
    lines = (out / "report.md").read_text().splitlines()
    assert lines[0] == "# MFR study: the frozen defaults of mfr.* judged once on the test split"
    assert lines[2].startswith("Nothing was chosen: no tuning ran.") and "data.seed 2, replicates 200.." in lines[2]
    assert lines[4].startswith("**test learnable: ") and lines[6].startswith("**test learnable batchtopk: ")
    assert "--judge-on test " in lines[8] and "--tune-on" not in lines[8]
    assert any(line.startswith("## Test learnable: ") for line in lines) and not any(
        "held-out" in line for line in lines[:9]
    )
    # the test split tunes nothing: candidates are refused, not ignored
    assert main([*args, "--candidates", DEFAULT_SETTING]) == 2


def test_the_16k_verdict_in_quick_form_judges_the_benchmark_metrics_and_learning_curves(tmp_path):
    """synthsaebench-16k (its quick form: the recipe at 1,024 features): on the test split, the dataset as it stands
    (TopK + AuxK) and Matryoshka, each with and without the defaults; F1 and explained variance tested beside MCC,
    and learning curves (MCC, agreed and confirmed fractions against vectors seen) in results.json and the report."""
    pytest.importorskip("sae_lens")
    out = tmp_path / "study"
    args = ["study", "--quick", "--judge-on", "test", "--data", "synthsaebench-16k", "--replicates", "2"]
    args += ["--large-replicates", "2", "--architectures", "topk,matryoshka", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["datasets"]) == {"synthsaebench-16k", "synthsaebench-16k matryoshka"}
    data = results["datasets"]["synthsaebench-16k"]
    assert data["config"]["data"]["kind"] == "synthsaebench" and data["config"]["sae"]["aux_coef"] == 0.03125
    tests = data["rows"][DEFAULT_SETTING]["tests"]
    assert {"gt_mcc", "gt_f1", "gt_explained_variance"} <= set(tests)
    curves = data["curves"]
    assert set(curves) == {BASELINE, DEFAULT_SETTING}
    assert [p["samples"] for p in curves[BASELINE]] == [10_240, 20_480]  # eval.every 20 steps of 512, and the end
    assert all(0 <= p["agreed_frac"] <= 1 and 0 <= p["gt_mcc"] <= 1 for p in curves[BASELINE])
    assert "confirmed_frac" in curves[DEFAULT_SETTING][-1] and "confirmed_frac" not in curves[BASELINE][-1]
    matryoshka = results["datasets"]["synthsaebench-16k matryoshka"]["config"]["sae"]
    assert matryoshka["architecture"] == "matryoshka"
    report = (out / "report.md").read_text()
    assert "Learning curves (synthsaebench-16k;" in report and "fig_learning_curves.png" in report
    assert (out / "fig_learning_curves.png").stat().st_size > 0
    assert "--architectures topk,matryoshka --data synthsaebench-16k" in report and "| F1 |" in report
    assert "kind=synthsaebench, preset=synthsaebench-1k" in report
    assert "the preset's own true features, whatever data.seed" in report and "data.seed 2" not in report
