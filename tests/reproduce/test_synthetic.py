import json

from mfr_sae.reproduce.synthetic import QUICK, reproduce_synthetic

TINY = ["data.d=32", "data.n_features=64", "data.n_groups=4", "data.n_active=3", "sae.d_sae=64",
        "sae.k=3", "train.n_samples=30000", "train.batch_size=1000", "eval.every=10",
        "eval.n_samples=2000", "mfr.reinit_samples=1000", "mfr.warmup_steps=10", "mfr.reinit_window=10"]


def test_an_end_to_end_reproduction_writes_every_file(tmp_path):
    summary = reproduce_synthetic(tmp_path, quick=True, n_seeds=2, progress=False, overrides=TINY)
    for name in ["report.md", "results.json", "fig3_agreement.png", "fig5_cluster_firing.png",
                 "fig7_reinit_metric.png", "fig8_recovery.png"]:
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    assert set(results["methods"]) == {"baseline", "reinit", "mfr", "shared_init"}
    per_seed = results["methods"]["mfr"]["per_seed"]
    assert len(per_seed["gt_mmcs"]) == 2 and all(0 < v <= 1 for v in per_seed["gt_mmcs"])
    # MFR's penalty pulls the two members together; the baseline's do not move together
    assert min(per_seed["pairwise_mmcs"]) > max(results["methods"]["baseline"]["per_seed"]["pairwise_mmcs"])
    test = results["tests"]["mfr vs baseline"]["gt_mmcs"]
    assert test["n"] == 2 and test["t_test_p"] is not None
    # the shared-initialisation rival: identical members inside an ensemble, not across seeds
    shared = results["methods"]["shared_init"]
    assert min(shared["per_seed"]["within_pw_mcc"]) > 0.9999
    assert len(shared["per_seed_pair"]["across_pw_mcc"]) == 1  # 2 seeds: one pair
    assert max(shared["per_seed_pair"]["across_pw_mcc"]) < 0.99
    assert {w["measure"] for w in results["winners"]} >= {"across_pw_mcc", "gt_mcc"}
    assert "the honest test" in (tmp_path / "report.md").read_text()
    report = (tmp_path / "report.md").read_text()
    assert "## Verdict" in report and report.count("data:image/png;base64,") == 4
    assert "MFR vs baseline" in report
    # a second call reuses the finished runs instead of training again
    before = (tmp_path / "runs" / "mfr-seed0" / "results.json").stat().st_mtime_ns
    reproduce_synthetic(tmp_path, quick=True, n_seeds=2, progress=False, overrides=TINY)
    assert (tmp_path / "runs" / "mfr-seed0" / "results.json").stat().st_mtime_ns == before


def test_quick_keeps_the_papers_data_and_saes():
    keys = {o.split("=")[0] for o in QUICK}
    assert not keys & {"data.d", "data.n_features", "data.n_groups", "data.n_active", "sae.d_sae", "sae.k"}
