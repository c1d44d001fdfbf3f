"""The report of `mfr-sae study`: report.md (verdict first), results.json and the FVU-MCC figure (drawn by
study_figure.py). The judged split (held-out, or test: the frozen defaults judged once, nothing chosen) is named in
its title, its first lines and every judged table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mfr_sae.files import atomic_write_text, write_json
from mfr_sae.report import figure_link, fmt_diff, fmt_duration, fmt_num, fmt_p, interval, markdown_table
from mfr_sae.reproduce import commit
from mfr_sae.study_analysis import IDENTICAL
from mfr_sae.study_catalogue import ARCHITECTURE_WORDS, DATASET_WORDS, SPLIT_WORDS, SPLITS
from mfr_sae.study_curves import CURVES_CAPTION, CURVES_FIGURE, curves_figure, curves_section
from mfr_sae.study_figure import CAPTION, FIGURE, figure

SAE_KEYS = ("architecture", "n_members", "d_sae", "k", "aux_coef", "matryoshka_widths")
DATA_KEYS = {  # what the report says of a dataset's data, by data.kind (synthetic: by data.firing)
    "synthsaebench": ("kind", "preset", "synth"),
    "independent": ("firing", "d", "n_features", "mean_active", "zipf_exponent", "min_magnitude"),
    "hierarchical": ("firing", "d", "n_features", "children", "child_probability", "mean_active"),
    "groups": ("firing", "d", "n_features", "n_groups", "n_active", "decay"),
}


def verdict_line(name: str, result: dict[str, Any], twin_tolerance: float) -> str:
    """The first-lines sentence for one dataset: the winning setting, or that none won, with numbers."""
    rows = result["rows"]
    best = result["best"]
    if best is None:
        candidates = [n for n in rows if rows[n].get("tests")]
        top = max(candidates, key=lambda n: rows[n]["tests"]["gt_mcc"]["mean_diff"] or -np.inf)
        t = rows[top]["tests"]
        return (
            f"**{name}: no MFR setting beat the baseline** on MCC without losing FVU. Highest mean MCC: "
            f"`{top}`, MCC {_diff(t['gt_mcc'])}, FVU {_diff(t['fvu'])}."
        )
    t = rows[best]["tests"]
    others = [w for w in result["winners"] if w != best]
    line = (
        f"**{name}: `{best}` beats the baseline** on MCC {_diff(t['gt_mcc'])} without losing FVU "
        f"({_diff(t['fvu'])}), twin_frac {_diff(t['twin_frac'])}"
        + (f"; also: {', '.join(f'`{w}`' for w in others)}" if others else "")
        + "."
    )
    pick = result.get("recommended")
    if pick and pick != best:
        line += (
            f" The largest gain whose twin_frac stays within {twin_tolerance:g} of the baseline's: `{pick}`, MCC "
            f"{_diff(rows[pick]['tests']['gt_mcc'])}."
        )
    elif not pick:
        line += f" None of these keeps twin_frac within {twin_tolerance:g} of the baseline's."
    return line


def _diff(test: dict[str, Any]) -> str:
    """`+0.0123 (95% CI [a, b], Holm p = ...)` for a paired test against the baseline."""
    if test.get("not_tested"):
        return str(test["not_tested"])
    if test.get("mean_diff") is None:
        return "no difference measurable"
    return (
        f"{test['mean_diff']:+.3g} (95% CI {interval(test.get('ci95'))}, Holm-corrected p = "
        f"{fmt_p(test.get('p_holm'))})"
    )


def dataset_table(result: dict[str, Any]) -> str:
    rows = []
    for name, row in result["rows"].items():
        m, t = row["measures"], row.get("tests", {})
        across = m.get("across_pw_mcc")
        rows.append(
            {
                "setting": name,
                "MCC": _mean_ci(m["gt_mcc"]),
                "ΔMCC [95% CI]": fmt_diff(t.get("gt_mcc")),
                "Holm p": fmt_p(t["gt_mcc"].get("p_holm_all", t["gt_mcc"]["p_holm"])) if t else "-",
                **{
                    word: f"{fmt_num(m[key]['mean'])}" + (f", Δ {fmt_diff(t.get(key))}" if t else "")
                    for key, word in (("gt_f1", "F1"), ("gt_explained_variance", "var. explained"))
                    if key in m
                },
                "FVU": _mean_ci(m["fvu"]),
                "ΔFVU [95% CI]": fmt_diff(t.get("fvu")),
                "twin_frac": fmt_num(m["twin_frac"]["mean"]),
                "gt_distinct": fmt_num(m["gt_distinct"]["mean"]),
                "silent": fmt_num(m["silent_frac"]["mean"]) if "silent_frac" in m else "-",
                "1:1 MMCS": fmt_num(m["pairwise_mmcs_hungarian"]["mean"]) if "pairwise_mmcs_hungarian" in m else "-",
                "consensus MCC": _mean_ci(m["consensus_mcc"]) if "consensus_mcc" in m else "-",
                "across PW-MCC": "-" if across is None else fmt_num(across["mean"]),
                "Δacross (perm. p)": _across(t.get("across_pw_mcc")),
                "beats baseline": "-" if not t else ("yes" if row["beats_baseline"] else "no"),
            }
        )
    return markdown_table(rows, list(rows[0]))


def _mean_ci(d: dict[str, Any]) -> str:
    return f"{fmt_num(d['mean'])} {interval(d['ci95'])}"


def _across(test: dict[str, Any] | None) -> str:
    """The permutation test of agreement across replicates: its difference and p."""
    if not test:
        return "-"
    return test.get("not_tested") or f"{test['diff']:+.3g} ({fmt_p(test['p'])})"


def holm_family(data: dict[str, Any]) -> str:
    """The settings whose MCC tests a table's Holm p corrects, in words: those with a p, and how many are left
    out as identical to the baseline."""
    tests = [row["tests"]["gt_mcc"] for row in data["rows"].values() if row.get("tests")]
    counted = sum(t.get("t_test_p") is not None for t in tests)
    identical = sum(t.get("not_tested") == IDENTICAL for t in tests)
    family = f"{counted} candidates" if counted == len(tests) else f"{counted} of the {len(tests)} candidates with a p"
    return family + (f" ({identical} {IDENTICAL}: no p)" if identical else "")


def features_words(summary: dict[str, Any], seed: int) -> str:
    """Where a judged split's true features come from: data.seed, except on SynthSAEBench, whose preset fixes
    them (its model has its own seed), so there the split is its replicates alone."""
    kinds = {data["config"]["data"]["kind"] for data in summary["datasets"].values()}
    if kinds == {"synthsaebench"}:
        return "the preset's own true features, whatever data.seed"
    if "synthsaebench" in kinds:
        return f"true features data.seed {seed} (SynthSAEBench: its preset's own)"
    return f"true features data.seed {seed}"


def write_report(out: Path, summary: dict[str, Any]) -> None:
    """results.json, the figure and report.md (its first lines: the setting chosen on tuning data, or that nothing
    was chosen, and whether it, and the defaults, beat the baseline on each judged dataset)."""
    summary = {**summary, "commit": commit()}
    write_json(out / "results.json", summary)
    figure(summary, out / FIGURE)
    curves = curves_figure(summary["datasets"], out / CURVES_FIGURE)
    r, tr, quick, chosen = summary["replicates"], summary["tune_replicates"], summary["quick"], summary["chosen"]
    tune_on = ",".join(summary["tune_on"])
    tried = [s["name"] for s in summary["settings"][1:]]
    split = summary.get("judged_on", "heldout")
    word, seeds = SPLIT_WORDS[split], SPLITS[split]
    features = features_words(summary, seeds["feature_seed"])
    command = (
        f"mfr-sae study{' --quick' if quick else ''} --replicates {r} --large-replicates "
        f"{summary['large_replicates']} "
        + (f"--tune-replicates {tr} --tune-on {tune_on} " if split == "heldout" else "--judge-on test ")
        + (f"--candidates '{','.join(tried)}' " if summary.get("candidates") else "")
        + (
            f"--architectures {','.join(summary['architectures'])} "
            if summary.get("architectures", ["topk"]) != ["topk"]
            else ""
        )
        + f"--data {','.join(dict.fromkeys(h['dataset'] for h in summary['datasets'].values()))} --out {out}"
    )
    if split == "heldout":
        lines = ["# MFR study: a setting chosen on tuning data, judged on held-out data", ""]
        lines += [
            f"Chosen on the tuning split ({tune_on}, {tr} replicates): "
            + (f"`{chosen}`." if chosen else "no candidate gained MCC without losing FVU or twin_frac; none chosen."),
            "",
        ]
    else:
        lines = ["# MFR study: the frozen defaults of mfr.* judged once on the test split", ""]
        lines += [
            "Nothing was chosen: no tuning ran. The baseline and the defaults of mfr.* "
            f"(`{summary['default_setting']}`) alone, on the {word} split ({features}, replicates "
            f"{seeds['first_replicate']}..), which no choice has seen.",
            "",
        ]
    for name, data in summary["datasets"].items():
        lines += [verdict_line(f"{word} {name}", data, summary["twin_tolerance"]), ""]
    lines += [
        f"Command: `{command}`; commit {summary['commit']}; {summary['machine']}; {fmt_duration(summary['seconds'])}."
    ]
    if quick:
        lines += [
            "",
            "This is the `--quick` form (small data and SAEs, short runs): it checks that the study runs; "
            "the full study (without `--quick`) is the evidence.",
        ]
    candidates = "; ".join(f"`{s['name']}`: {', '.join(s['overrides'])}" for s in summary["settings"][1:])
    judged_architectures = summary.get("architectures", ["topk"])
    others = [a for a in judged_architectures if a != "topk"]
    architectures = []
    if others:
        architectures.append(
            f"- Architectures{' beside TopK' if 'topk' in judged_architectures else ''} ({', '.join(others)}): on "
            f"every {word} dataset each one alone (its own baseline) against it with the defaults of mfr.*, on the "
            "same replicates, with the same tests (its MCC test in the same Holm family)."
        )
    judged = (
        [
            f"- Tuning: the baseline and every candidate on the tuning split of {tune_on} (true features "
            f"data.seed 0; replicates 0..{tr - 1}). The pick: of the settings that gain MCC with FVU not worse, "
            "twin_frac near the baseline's and no collapse on every tuning dataset, those that beat the baseline on "
            "every one if any (too few tuning replicates may prove nothing), the largest smallest MCC gain.",
            f"- Held-out: the baseline, the pick and the defaults of mfr.* (`{summary['default_setting']}`) on every "
            "dataset's held-out split (other true features, data.seed 1; other replicates, 100..), which the pick "
            f"never saw: {r} replicates, {summary['large_replicates']} on the large datasets (h above 1,024).",
        ]
        if split == "heldout"
        else [
            f"- Test: no tuning; the baseline and the frozen defaults of mfr.* (`{summary['default_setting']}`) on "
            f"every dataset's test split ({features}; replicates "
            f"{seeds['first_replicate']}..), judged once, never used to choose: {r} replicates, "
            f"{summary['large_replicates']} on the large datasets (h above 1,024).",
        ]
    )
    lines += [
        "",
        "## Design",
        "",
        *judged,
        *architectures,
        "- Replicate r has its own sample stream (data.stream_seed) and initialisation (train.seed); every "
        "setting of replicate r sees the samples and starts from the weights of the baseline of replicate r.",
        f"- {'Candidates' if split == 'heldout' else 'The defaults, spelled out'}: {candidates}.",
        "- Measures, each the mean over an ensemble's members: MCC (mean |cosine| of a one-to-one matching of "
        "latents to true features), FVU on held-out vectors, twin_frac (latents with another latent of the same "
        "SAE at cosine > 0.9), gt_distinct (distinct true features that are some latent's best match), silent "
        "(latents that never fired on the evaluation vectors); 1:1 MMCS: the members' one-to-one agreement "
        "(above 0.99 they are copies of one another: collapsed); across PW-MCC: a replicate's ensemble against "
        "every other replicate's of the same setting (member m with member m), mean over the others; consensus "
        "MCC: the MCC of one decoder built from the members (matched to member 0 one-to-one; rows where every "
        "member agrees at cosine >= 0.9 averaged, the rest member 0's; `mfr_sae/consensus.py`).",
        "- Tests against the baseline, paired over replicates: paired t-test (two-sided) with the 95% CI of "
        "the mean difference for the run measures; for across PW-MCC, an exact permutation test that swaps "
        "each replicate's setting and baseline ensembles (the replicate is the unit, never a seed pair; with "
        f"{r} replicates its smallest p is {fmt_p(2 / 2**r)}, with {summary['large_replicates']} "
        f"{fmt_p(2 / 2 ** summary['large_replicates'])}). {word.capitalize()} MCC: Holm's correction over every "
        f"setting on every {word} dataset (the Holm p of the tables); the other measures within each dataset.",
        "- A setting beats the baseline when its MCC is higher with Holm-corrected p < 0.05 and its FVU is "
        f"not worse: the upper end of the 95% CI of its FVU difference is at most "
        f"{100 * summary['fvu_margin']:g}% of the baseline's FVU. Fit to be the default, it also keeps "
        f"twin_frac within {summary['twin_tolerance']:g} of the baseline's and never collapses.",
        "",
        figure_link(FIGURE, CAPTION),
        "",
        *([figure_link(CURVES_FIGURE, CURVES_CAPTION), ""] if curves else []),
    ]
    for name, data in summary["tuning"].items():
        lines += [
            "",
            f"## Tuning: {name}",
            "",
            dataset_table(data),
            "",
            f"Holm p here: over the {holm_family(data)}; {tr} replicates: the tuning split chooses, it proves nothing.",
        ]
    for name, data in summary["datasets"].items():
        cfg = data["config"]
        kind = cfg["data"]["kind"]  # synthsaebench: the preset's model whatever data.seed (it has its own seed)
        data_keys = (
            DATA_KEYS[kind] if kind in DATA_KEYS else (*DATA_KEYS[cfg["data"]["firing"]], "normalize_features", "seed")
        )
        lines += [
            "",
            f"## {word.capitalize()} {name}: {DATASET_WORDS[data['dataset']]}"
            + ("" if data["architecture"] == "topk" else f"; {ARCHITECTURE_WORDS[data['architecture']]}"),
            "",
            "Data: "
            + ", ".join(f"{k}={cfg['data'][k]}" for k in data_keys)
            + "; SAEs: "
            + ", ".join(f"{k}={v}" for k, v in cfg["sae"].items() if k in SAE_KEYS)
            + "; training: "
            + ", ".join(f"{k}={v}" for k, v in cfg["train"].items() if k in ("n_samples", "batch_size", "lr"))
            + ".",
            "",
            dataset_table(data),
            "",
            "Means with 95% CIs over replicates; Δ: setting minus baseline, paired; Holm p: the MCC test, over "
            f"every {word} comparison with a p (`{IDENTICAL}`: the same numbers in every replicate, no test, "
            "not counted). Δacross: the permutation test's difference of across-replicate PW-MCC, "
            "its p uncorrected (results.json has the Holm-corrected ones).",
            *curves_section(name, data),
        ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
