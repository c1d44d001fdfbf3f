import json
import re
import shutil

import pytest

from mfr_sae.reproduce.synthetic import METHODS, QUICK, reproduce_synthetic
from mfr_sae.reproduce.synthetic_stats import identical_to_baseline

TINY = [
    "data.d=32",
    "data.n_features=64",
    "data.n_groups=4",
    "data.n_active=3",
    "sae.d_sae=64",
    "sae.k=3",
    "train.n_samples=30000",
    "train.batch_size=1000",
    "eval.every=10",
    "eval.n_samples=2000",
    "mfr.reinit_samples=1000",
    "mfr.warmup_steps=10",
    "mfr.reinit_window=10",
]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """One tiny reproduction with 2 seeds, shared by the tests of this file."""
    out = tmp_path_factory.mktemp("two_seeds")
    return out, reproduce_synthetic(out, quick=True, n_seeds=2, progress=False, overrides=TINY)


def test_an_end_to_end_reproduction_writes_every_file(two_seeds):
    tmp_path, summary = two_seeds
    for name in [
        "report.md",
        "results.json",
        "fig3_agreement.png",
        "fig5_cluster_firing.png",
        "fig7_reinit_metric.png",
        "fig8_recovery.png",
    ]:
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
    assert test["ci95"][0] <= test["mean_diff"] <= test["ci95"][1]
    assert test["wilcoxon_p"] is None  # 2 seeds: the Wilcoxon test cannot reject, so it is not run
    # the shared-initialisation rival: identical members inside an ensemble, not across seeds
    shared = results["methods"]["shared_init"]
    assert min(shared["per_seed"]["within_pw_mcc"]) > 0.9999
    assert len(shared["per_seed_pair"]["across_pw_mcc"]) == 1  # 2 seeds: one pair
    assert max(shared["per_seed_pair"]["across_pw_mcc"]) < 0.99
    # across-seed agreement is tested over seeds (label swaps inside a seed), not over seed pairs
    across = results["tests"]["shared_init vs baseline"]["across_pw_mcc"]
    assert across["n"] == 2 and across["min_p"] == 0.5 and across["p"] in (0.5, 1.0)
    assert across["diff"] == pytest.approx(
        shared["per_seed_pair"]["across_pw_mcc"][0]
        - results["methods"]["baseline"]["per_seed_pair"]["across_pw_mcc"][0]
    )
    # Holm over every test of the tests section that has a p-value
    family = [t for by_key in results["tests"].values() for t in by_key.values()]
    with_p = [t for t in family if t["p"] is not None]
    assert results["multiple_comparisons"]["family_size"] == len(with_p) > 1
    assert all(t["p_holm"] >= t["p"] for t in with_p) and all(t["p_holm"] is None for t in family if t["p"] is None)
    smallest = min(with_p, key=lambda t: t["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, len(with_p) * smallest["p"]))
    assert {w["measure"] for w in results["winners"]} >= {"across_pw_mcc", "gt_mcc"}
    for row in results["winners"]:  # equal means are a tie, never a win
        assert (row["clear win"] == "no (tie)") == (" = " in row["best"])
    # shared_init's within-ensemble agreement is 1 by construction: not tested, never a win
    within = results["tests"]["shared_init vs baseline"]["within_pw_mcc"]
    assert within["p"] is None and "by construction: not a finding" in within["not_tested"]
    assert all(
        w["clear win"] != "yes" for w in results["winners"] if w["best"] == "shared_init" and "within" in w["measure"]
    )
    # a method whose runs are the baseline's (reinit, when no reinitialisation fired) is not tested against it
    identical = identical_to_baseline(results["methods"])
    assert identical == ([] if sum(results["methods"]["reinit"]["per_seed"]["reinit_events"]) else ["reinit"])
    for m in identical:
        assert all(
            t["not_tested"] == "identical arms, not tested" for t in results["tests"][f"{m} vs baseline"].values()
        )
    report = (tmp_path / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("## Setup")[0]
    bullets = [line for line in verdict.splitlines() if line.startswith("- ")]
    assert bullets[0].startswith("- Ground-truth MMCS: MFR ") and "95% CI [" in bullets[0] and "(p = " in bullets[0]
    assert any(line.startswith("- `shared_init`: within_pw_mcc = 1") for line in bullets)
    assert all(f"| {m} (identical to baseline: no reinitialisation fired) |" in report for m in identical)
    assert "the honest test" in report
    assert "## Verdict" in report and "data:image" not in report and report.count("](fig") == 4
    assert "MFR vs baseline" in report and "Holm-adjusted over the family of the" in report
    assert "95% CI" in report and "permutation over seeds" in report
    # a second call reuses the finished runs instead of training again
    before = (tmp_path / "runs" / "mfr-seed0" / "results.json").stat().st_mtime_ns
    reproduce_synthetic(tmp_path, quick=True, n_seeds=2, progress=False, overrides=TINY)
    assert (tmp_path / "runs" / "mfr-seed0" / "results.json").stat().st_mtime_ns == before


def test_one_seed_reports_one_replicate_and_no_p_value(two_seeds, tmp_path):
    # `--seeds 1` used to crash after training (ranking a list of fewer than two methods, no seed pairs);
    # seed 0's finished runs are copied, so nothing is trained here
    for run in (two_seeds[0] / "runs").glob("*-seed0"):
        shutil.copytree(run, tmp_path / "runs" / run.name)
    summary = reproduce_synthetic(tmp_path, quick=True, n_seeds=1, progress=False, overrides=TINY)
    assert summary["seeds"] == [0]
    for by_key in summary["tests"].values():
        for test in by_key.values():
            assert test["n"] <= 1 and test["p"] is None and test["p_holm"] is None
    assert summary["tests"]["mfr vs baseline"]["across_pw_mcc"]["note"].startswith("one replicate")
    assert summary["multiple_comparisons"]["family_size"] == 0
    assert summary["methods"]["mfr"]["per_seed_pair"]["across_pw_mcc"] == []
    across = [w for w in summary["winners"] if w["measure"].startswith("across_")]
    assert across and all(w["best"] == "-" and w["clear win"] == "no test" for w in across)
    report = (tmp_path / "report.md").read_text()
    assert "One seed: one replicate per method, so no test is made and no p-value is given" in report
    assert "too few replicates for a test (n=1)" in report
    assert not re.search(r"p [=<] \d", report)  # no p-value printed anywhere
    section = report.split("## Significance")[1].split("## Figures")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "vs baseline" in line]
    header = next(line for line in section.splitlines() if line.startswith("| comparison")).split(" | ")
    assert rows and all(row[header.index(col)] == "-" for row in rows for col in ("p", "p (Holm)", "Wilcoxon p"))


def test_quick_keeps_the_papers_data_and_saes():
    keys = {o.split("=")[0] for o in QUICK}
    assert not keys & {"data.d", "data.n_features", "data.n_groups", "data.n_active", "sae.d_sae", "sae.k"}


def test_the_report_links_its_figures_with_captions_and_stays_small(two_seeds):
    out = two_seeds[0]
    report = (out / "report.md").read_text()
    assert "data:image" not in report and len(report.encode()) < 50_000
    lines = report.splitlines()
    links = [(i, re.fullmatch(r"!\[(.+)\]\(([^)/]+\.png)\)", line)) for i, line in enumerate(lines)]
    links = [(i, m) for i, m in links if m]
    assert [m.group(2) for _, m in links] == [
        "fig3_agreement.png",
        "fig5_cluster_firing.png",
        "fig7_reinit_metric.png",
        "fig8_recovery.png",
    ]
    for i, m in links:
        assert (out / m.group(2)).stat().st_size > 0
        assert lines[i + 1] == "" and lines[i + 2] == f"*{m.group(1)}*"  # the caption, on one line, under it
    # sds to 2 significant digits; the means of a column of a table all to the same decimals
    for sd in re.findall(r" ± ([\d.]+(?:e[-+]\d+)?)", report):
        assert len(re.sub(r"^[0.]+|e.*|\.", "", sd)) <= 2, sd
    for table in re.findall(r"\n(\| method \|.*?)\n\n", report, re.S):
        header, _, *rows = table.splitlines()
        cells = [row.strip("| ").split(" | ") for row in rows]
        for i, column in enumerate(header.strip("| ").split(" | ")[1:], 1):
            means = [row[i].split(" ± ")[0] for row in cells if row[i] != "n/a"]
            assert len({len(m.partition(".")[2]) for m in means}) == 1, (column, means)


def test_a_second_invocation_reports_its_runs_as_reused_with_the_first_ones_training_time(two_seeds, capsys):
    out, first = two_seeds
    assert {r["how"] for r in first["runs"]["runs"]} == {"trained"}
    assert first["runs"]["train_seconds"] == pytest.approx(
        sum(json.loads(p.read_text())["train_seconds"] for p in (out / "runs").glob("*/results.json")), abs=0.1
    )
    again = reproduce_synthetic(out, quick=True, n_seeds=2, progress=True, overrides=TINY)
    printed = capsys.readouterr().out
    assert f"[mfr, seed 1] reused: {out / 'runs' / 'mfr-seed1'} (run 7 of 8)" in printed
    assert {r["how"] for r in again["runs"]["runs"]} == {"reused"}
    assert again["runs"]["train_seconds"] == first["runs"]["train_seconds"]
    report = (out / "report.md").read_text()
    assert "Trained now: 0." in report and "Reused from an earlier invocation, not trained now: 8 (" in report
    assert all(f"`runs/{m}-seed{s}`" in report for m in METHODS for s in (0, 1))
