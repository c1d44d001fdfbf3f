"""`mfr-sae study-lm`: do the defaults of mfr.* give better SAEs than the baseline on a real language model's
activations, over independent seeds?

There is no ground truth here, so the measures are those a user of an LM SAE reads: FVU on held-out
activations; loss recovered and KL with each member spliced into the model, on held-out text
(`eval.lm_sequences`); the members' one-to-one agreement inside a run (above 0.99 they are copies); and
agreement ACROSS seeds (PW-MCC of member m of one seed's ensemble against member m of another's: do
independently initialised runs find the same latents?). The ensemble is the paper's Section 4.1 shape: 5 TopK
members with k in {6, 12, 18, 24, 30}, h = 4d, batch 500, lr 1e-3.

Seed s is one replicate: its own shuffle of the cache (data.seed) and its own initialisation (train.seed),
shared by its baseline and MFR runs, so tests are paired over seeds. The seeds share the text: they are
independent in order and initialisation, not in data. The defaults were chosen on synthetic data (`mfr-sae
study`): the language model is held out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from mfr_sae.checkpoint import load
from mfr_sae.compare import agreement_matrix, paired_agreement
from mfr_sae.config import RunConfig, load_config
from mfr_sae.data.activations import build_cache, read_manifest
from mfr_sae.extras import require
from mfr_sae.files import atomic_write_text, write_json
from mfr_sae.report import fmt_num, fmt_p, markdown_table
from mfr_sae.reproduce import RunTracker, describe_runs, machine
from mfr_sae.stats import holm, paired_permutation_test, paired_test
from mfr_sae.study_analysis import describe
from mfr_sae.study_report import commit, interval

KS = [6, 12, 18, 24, 30]
SHAPE = ("sae.n_members=5", f"sae.k={KS}", "train.batch_size=500", "train.lr=1e-3", "train.checkpoint_every=500")
ARMS = {"baseline": "mfr.enabled=false", "mfr": "mfr.enabled=true"}  # MFR: the defaults of mfr.*
EXPANSION = 4  # h = 4d, as the paper's GPT-2 SAEs (768 -> 3,072)
# per run, means over its members; the tested ones (Holm over them) first, by what better means
TESTED = {"fvu": False, "frac_recovered": True, "kl": False}  # measure -> higher is better
MEASURES = (*TESTED, "mse", "silent_frac", "twin_frac")
RUN_MEASURES = ("pairwise_mmcs_hungarian",)
PER_K = ("fvu", "frac_recovered")  # by k: described, not tested
FULL_TOKENS, QUICK_TOKENS = 2_000_000, 100_000  # training tokens a run


def run_config(cache: Path, d: int, seed: int, arm: str, tokens: int, holdout: int, extra: Sequence[str]) -> RunConfig:
    """One arm of seed `seed` on the cache."""
    return load_config(
        None,
        [
            "data.kind=activations",
            f"data.path={cache}",
            f"data.holdout={holdout}",
            f"data.seed={seed}",
            *SHAPE,
            f"sae.d_sae={EXPANSION * d}",
            f"train.n_samples={tokens}",
            f"train.seed={seed}",
            f"eval.n_samples={holdout}",
            ARMS[arm],
            *extra,
        ],
    )


def study_lm(
    out: str | Path,
    model: str,
    text: str,
    hook: str = "blocks.0.hook_mlp_out",
    tokens: int = FULL_TOKENS,
    cache_tokens: int | None = None,
    seeds: int = 3,
    holdout: int = 10_000,
    context: int = 128,
    progress: bool = True,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Cache `cache_tokens` activations (default: `tokens` + `holdout`, one pass; fewer means several passes
    over the cache), train the baseline and the defaults of mfr.* for each seed on `tokens` vectors, and write
    out/report.md and out/results.json. `extra` (section.field=value) changes every run."""
    require("transformers", "mfr-sae study-lm")  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cached = cache_tokens if cache_tokens is not None else tokens + holdout
    cache = build_cache(model, hook, text, out / "cache", cached, context=context, progress=progress)
    manifest = read_manifest(cache, verify=False)
    tracker = RunTracker(2 * seeds, out, progress, bars=progress)
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    decoders: dict[str, list[Tensor]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            cfg = run_config(cache, manifest["d"], seed, arm, tokens, holdout, extra)
            run_dir = out / f"seed{seed}" / arm
            results[arm].append(tracker.run(f"seed {seed}: {arm}", cfg, run_dir))
            decoders[arm].append(load(run_dir).decoder().detach())
    summary = {
        "model": model,
        "text": text,
        "hook": hook,
        "module": manifest["module"],
        "d": manifest["d"],
        "tokens": tokens,
        "cache_tokens": cached,
        "context": context,
        "seeds": seeds,
        "lm_tokens": (results["baseline"][0]["lm"] or {}).get("tokens"),
        "config": results["mfr"][0]["config"],
        "machine": machine(),
        "commit": commit(),
        **analyse(results, decoders),
        "runs": tracker.summary(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "results.json", summary)
    write_report(out, summary)
    return summary


def member_values(results: list[dict[str, Any]], key: str, k: int | None = None) -> list[float | None]:
    """Per seed, the mean of `key` over the members (over those with this `k` when given)."""
    values = []
    for run in results:
        chosen = [m.get(key) for m in run["members"] if k is None or m["k"] == k]
        values.append(None if any(v is None for v in chosen) else float(np.mean(chosen)))
    return values


def analyse(results: dict[str, list[dict[str, Any]]], decoders: dict[str, list[Tensor]]) -> dict[str, Any]:
    """Per arm, each measure over seeds; MFR against the baseline, paired over seeds (Holm over TESTED); per k,
    the paired differences of FVU and loss recovered; agreement across seeds (permutation test)."""
    seeds = len(results["baseline"])
    values = {
        arm: {key: member_values(runs, key) for key in MEASURES}
        | {key: [run[key] for run in runs] for key in RUN_MEASURES}
        for arm, runs in results.items()
    }
    tests = {key: paired_test(values["mfr"][key], values["baseline"][key]) for key in (*MEASURES, *RUN_MEASURES)}
    for key, p in zip(TESTED, holm([tests[key]["t_test_p"] for key in TESTED])):
        tests[key]["p_holm"] = p
    per_k = []
    for k in KS:
        row: dict[str, Any] = {"k": k}
        for key in PER_K:
            arms = {arm: member_values(results[arm], key, k) for arm in ARMS}
            row |= {f"{key}_{arm}": values for arm, values in arms.items()}
            row[f"{key}_diff"] = paired_test(arms["mfr"], arms["baseline"])
        per_k.append(row)
    matrix = paired_agreement(decoders["mfr"], decoders["baseline"], agreement_matrix(decoders["baseline"]))
    across = {
        arm: [float(np.nanmean(np.delete(block[r], r))) for r in range(seeds)]
        for arm, block in (("mfr", matrix[:seeds, :seeds]), ("baseline", matrix[seeds:, seeds:]))
    }
    return {
        "values": values,
        "tests": tests,
        "per_k": per_k,
        "collapsed": [run["collapsed"] for run in results["mfr"]],
        "across_seeds": {
            "matrix": matrix.tolist(),
            "per_seed": across,
            "test": paired_permutation_test(matrix, seeds),
        },
    }


def _mean_ci(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    d = describe(present)
    return f"{fmt_num(d['mean'])} {interval(d['ci95'])}"


def _diff(test: dict[str, Any]) -> str:
    if test["mean_diff"] is None:
        return "-"
    return f"{test['mean_diff']:+.3g} {interval(test['ci95'])}"


def verdict(s: dict[str, Any]) -> list[str]:
    """The verdict's sentences: each tested measure, better or worse or no difference (Holm), and collapse."""
    words = {"fvu": "FVU", "frac_recovered": "loss recovered", "kl": "KL"}
    lines = []
    for key, higher in TESTED.items():
        t = s["tests"][key]
        p = t.get("p_holm")
        if p is None:
            said = f"no test ({t['note'] or 'n/a'})"
        elif p < 0.05:
            said = "**better**" if (t["mean_diff"] > 0) == higher else "**worse**"
        else:
            said = "no significant difference"
        lines.append(
            f"- {words[key]}: MFR {said}, difference {_diff(t)} (Holm p {fmt_p(p)}, paired t over {t['n']} seeds)."
        )
    copies = sum(s["collapsed"])
    lines.append(
        f"- Collapse: {copies} of {s['seeds']} MFR runs had members that became copies (one-to-one MMCS > 0.99); "
        f"members' one-to-one MMCS {_mean_ci(s['values']['mfr']['pairwise_mmcs_hungarian'])} against the "
        f"baseline's {_mean_ci(s['values']['baseline']['pairwise_mmcs_hungarian'])}."
    )
    a = s["across_seeds"]["test"]
    lines.append(
        f"- Agreement across seeds (PW-MCC, member m of one seed against member m of another): MFR "
        f"{fmt_num(a['treated_mean'])}, baseline {fmt_num(a['control_mean'])} (permutation p {fmt_p(a['p'])}; "
        f"with {a['n']} seeds it cannot go below {fmt_num(a['min_p'])})."
    )
    return lines


def write_report(out: Path, s: dict[str, Any]) -> None:
    rows = [
        {
            "measure": key,
            "baseline [95% CI]": _mean_ci(s["values"]["baseline"][key]),
            "MFR [95% CI]": _mean_ci(s["values"]["mfr"][key]),
            "MFR - baseline [95% CI]": _diff(s["tests"][key]),
            "p (t)": fmt_p(s["tests"][key]["t_test_p"]),
            "Holm p": fmt_p(s["tests"][key].get("p_holm")),
        }
        for key in (*MEASURES, *RUN_MEASURES)
    ]
    per_k = [
        {
            "k": row["k"],
            "FVU baseline": _mean_ci(row["fvu_baseline"]),
            "FVU MFR": _mean_ci(row["fvu_mfr"]),
            "FVU diff": _diff(row["fvu_diff"]),
            "recovered baseline": _mean_ci(row["frac_recovered_baseline"]),
            "recovered MFR": _mean_ci(row["frac_recovered_mfr"]),
            "recovered diff": _diff(row["frac_recovered_diff"]),
        }
        for row in s["per_k"]
    ]
    lines = [
        "# Study: the defaults of mfr.* against the baseline on a language model's activations",
        "",
        f"Generated by `mfr-sae study-lm` on {s['machine']}, commit {s['commit']}. "
        f"{describe_runs(s['runs'], s['seconds'])}",
        "",
        f"Model `{s['model']}`, hook `{s['hook']}` (module `{s['module']}`, d = {s['d']}), text `{s['text']}`: "
        f"{s['cache_tokens']:,} cached tokens (context {s['context']}, BOS not cached), {s['tokens']:,} training "
        f"tokens per run ({s['tokens'] / s['cache_tokens']:.1f} passes over the cache), {s['seeds']} seeds, each "
        f"its own shuffle and initialisation, shared by its two arms. Each run: 5 TopK members, k = {KS}, "
        f"h = {EXPANSION * s['d']:,}; MFR: the defaults of mfr.*. Loss recovered on "
        f"{s['lm_tokens'] or 0:,} held-out tokens (the text after the cached part).",
        "",
        "## Verdict",
        "",
        *verdict(s),
        "",
        "## Means over seeds (each run: the mean over its 5 members)",
        "",
        markdown_table(rows, list(rows[0])),
        "",
        "Tested (paired t over seeds, Holm over these three): fvu, frac_recovered, kl. The other rows are "
        "described, not tested. `frac_recovered` = (CE_zero - CE_sae) / (CE_zero - CE_clean).",
        "",
        "## By k (mean over seeds [95% CI]; described, not tested)",
        "",
        markdown_table(per_k, list(per_k[0])),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))
