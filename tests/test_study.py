import json

from mfr_sae.cli import main
from mfr_sae.study_catalogue import BASELINE, DEFAULT_SETTING


def test_study_end_to_end_tunes_then_judges_on_held_out_data_and_reuses_its_runs(tmp_path, monkeypatch):
    import mfr_sae.study_catalogue as catalogue

    tiny = ["train.n_samples=3072", "eval.n_samples=1000"]
    monkeypatch.setattr(catalogue, "COMMON", catalogue.COMMON + tiny)
    two = (DEFAULT_SETTING, "mnn 0.3*recon")  # to keep the test short
    out = tmp_path / "study"
    # learnable marked large, to see --large-replicates reach it without training another dataset
    monkeypatch.setitem(catalogue.DATASETS, "learnable", {**catalogue.DATASETS["learnable"], "large": True})
    args = ["study", "--quick", "--replicates", "3", "--tune-replicates", "2", "--large-replicates", "2"]
    args += ["--candidates", ",".join(two), "--data", "learnable", "--architectures", "batchtopk", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    assert lines[2].startswith("Chosen on the tuning split (learnable, 2 replicates): ")
    assert lines[4].startswith("**held-out learnable: ") and "the baseline" in lines[4]
    assert (out / "fig_fvu_mcc.png").stat().st_size > 0 and "(fig_fvu_mcc.png)" in report
    saved = json.loads((out / "results.json").read_text())
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
    assert (out / "heldout" / "learnable" / "baseline" / "rep1" / "results.json").is_file()
    # the architecture axis: BatchTopK alone against BatchTopK with the defaults, in the same Holm family
    batchtopk = saved["datasets"]["learnable batchtopk"]
    assert (
        set(batchtopk["rows"]) == {BASELINE, DEFAULT_SETTING}
        and batchtopk["config"]["sae"]["architecture"] == "batchtopk"
    )
    assert batchtopk["rows"][BASELINE]["measures"]["gt_mcc"] != heldout["rows"][BASELINE]["measures"]["gt_mcc"]
    assert (out / "batchtopk" / "heldout" / "learnable" / "baseline" / "rep1" / "results.json").is_file()
    assert "--architectures batchtopk --data learnable " in report and "## Held-out learnable batchtopk: " in report
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
