"""`mfr-sae reproduce gpt2`: 5 baseline and 5 MFR TopK SAEs on a language model's layer-0 MLP output
(paper Section 4.1): k in {6, 12, 18, 24, 30}, h = 3072, batch 500, lr 1e-3, 2,000,000 tokens.

Any causal LM and text work (`--model`, `--text`); the defaults are the paper's (GPT-2 Small and
OpenWebText), which need the Hugging Face hub or a local copy. Steps: an activation cache (reused if it
matches), the two ensembles (finished runs reused, interrupted ones resumed), loss recovered on held-out
text, and DIR/report.md with the paper's Tables 1 and 2 beside the measured numbers and the decoder
distance analysis of the paper's Section 4.3.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mfr_sae.config import PAPER_MFR, load_config
from mfr_sae.data.activations import build_cache, read_manifest
from mfr_sae.extras import require
from mfr_sae.files import write_json
from mfr_sae.report import figure_link, fmt_num, markdown_table
from mfr_sae.reproduce import (
    RunTracker,
    decoder_distances,
    describe_runs,
    figure_distances,
    machine,
    reinit_summary,
    relative,
    relative_diff,
)

KS = [6, 12, 18, 24, 30]
# Paper Tables 1 (MSE) and 2 (cross-entropy with the SAE spliced in), MFR and baseline, by k.
PAPER_MSE = {
    6: (0.00132, 0.00160),
    12: (0.00121, 0.00135),
    18: (0.00116, 0.00122),
    24: (0.00114, 0.00112),
    30: (0.00114, 0.00105),
}
PAPER_CE = {6: (10.121, 10.798), 12: (9.782, 10.300), 18: (9.367, 9.742), 24: (10.136, 10.505), 30: (9.624, 10.527)}
# The paper's printed relative differences: Table 1 divides by the MFR value, Table 2 by the baseline.
PAPER_MSE_DIFF = {6: -21.21, 12: -11.57, 18: -5.17, 24: 1.75, 30: 7.89}
PAPER_CE_DIFF = {6: -6.27, 12: -5.03, 18: -3.85, 24: -3.51, 30: -8.58}
PAPER_CE_CLEAN, PAPER_CE_ZERO = 3.12, 132.27
FULL = {"tokens": 2_000_000, "lm_sequences": 1000, "match_every": 1}
# --quick: the same SAEs on 100,000 tokens (200 steps), matches recomputed every 10 steps (bench/RESULTS.md), and
# the firing probabilities of the reinitialisation check over 10 batches, not 20, so that its phase (at most 10
# checks per member) ends halfway: with 20, a member re-initialised 10 times is re-initialised at the last step.
QUICK = {"tokens": 100_000, "lm_sequences": 20, "match_every": 10, "reinit_samples": 5000}
FIGURE = (
    "fig_decoder_distance.png",
    "Mean L2 distance of each member's decoder to the other members' decoders, "
    "by k, baseline beside MFR (paper Section 4.3).",
)


def run_overrides(cache: Path, mfr: bool, setting: dict[str, int], holdout: int) -> list[str]:
    return [
        *PAPER_MFR,
        "data.kind=activations",
        f"data.path={cache}",
        f"data.holdout={holdout}",
        "sae.n_members=5",
        f"sae.k={KS}",
        "sae.d_sae=3072",
        "train.batch_size=500",
        "train.lr=1e-3",
        f"train.n_samples={setting['tokens']}",
        "train.checkpoint_every=200",
        f"eval.n_samples={holdout}",
        f"eval.lm_sequences={setting['lm_sequences']}",
        f"mfr.enabled={str(mfr).lower()}",
        f"mfr.match_every={setting['match_every']}",
        *([f"mfr.reinit_samples={setting['reinit_samples']}"] if "reinit_samples" in setting else []),
    ]


def reproduce_gpt2(
    out: str | Path,
    quick: bool = False,
    model: str = "gpt2",
    text: str = "Skylion007/openwebtext",
    hook: str = "blocks.0.hook_mlp_out",
    progress: bool = True,
    overrides: Sequence[str] = (),
    tokens: int | None = None,
    holdout: int = 10_000,
    context: int = 128,
) -> dict[str, Any]:
    """Cache, train both ensembles, score them on the LM, and write report.md, results.json and the
    figure. `tokens` overrides the training tokens; `holdout` vectors are cached beyond them for eval."""
    require("transformers", "mfr-sae reproduce gpt2")  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setting = dict(QUICK if quick else FULL)
    if tokens is not None:
        setting["tokens"] = tokens
    started = time.perf_counter()
    cache = build_cache(
        model, hook, text, out / "cache", setting["tokens"] + holdout, context=context, progress=progress
    )
    manifest = read_manifest(cache, verify=False)
    results = {}
    tracker = RunTracker(2, out, progress)
    for name, mfr in (("baseline", False), ("mfr", True)):
        cfg = load_config(None, run_overrides(cache, mfr, setting, holdout) + list(overrides))
        results[name] = tracker.run(name, cfg, out / "runs" / name)
    members = [
        {
            **{
                k: m.get(k)
                for k in ("k", "mse", "fvu", "l0", "dead_frac", "ce_clean", "ce_zero", "ce_sae", "frac_recovered", "kl")
            },
            "mfr": name == "mfr",
        }
        for name in ("baseline", "mfr")
        for m in results[name]["members"]
    ]
    dist = {name: decoder_distances(out / "runs" / name) for name in ("baseline", "mfr")}
    figure = out / FIGURE[0]
    figure_distances(dist, KS, figure)
    summary = {
        "experiment": "gpt2",
        "quick": quick,
        "model": model,
        "text": text,
        "hook": hook,
        "module": manifest["module"],
        "tokens": setting["tokens"],
        "match_every": setting["match_every"],
        "context": context,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": tracker.summary(),
        "lm": {name: results[name]["lm"] for name in results},
        "beta": results["mfr"]["beta"],
        "reinit": reinit_summary(results["mfr"]["reinit_events"], len(KS), results["mfr"]["steps"], KS),
        "decoder_distance": dist,
        "members": members,
    }
    write_json(out / "results.json", summary)
    write_report(out, summary, figure)
    return summary


def write_report(out: Path, s: dict[str, Any], figure: Path) -> None:
    by = {(m["mfr"], m["k"]): m for m in s["members"]}
    table1, table2 = [], []
    for k in KS:
        mfr, base = by[(True, k)], by[(False, k)]
        p_mfr, p_base = PAPER_MSE[k]
        # the paper's numbers as it prints them (str: not rounded like the measured ones)
        table1.append(
            {
                "k": k,
                "paper MFR": str(p_mfr),
                "paper baseline": str(p_base),
                "paper diff": f"{PAPER_MSE_DIFF[k]:+.2f}%",
                "measured MFR": mfr["mse"],
                "measured baseline": base["mse"],
                "measured diff": relative(mfr["mse"], base["mse"]),
            }
        )
        c_mfr, c_base = PAPER_CE[k]
        row = {
            "k": k,
            "paper CE MFR": str(c_mfr),
            "paper CE baseline": str(c_base),
            "paper diff": f"{PAPER_CE_DIFF[k]:+.2f}%",
        }
        if mfr.get("ce_sae") is not None:
            row.update(
                {
                    "CE MFR": mfr["ce_sae"],
                    "CE baseline": base["ce_sae"],
                    "diff": relative(mfr["ce_sae"], base["ce_sae"]),
                    "recovered MFR": mfr["frac_recovered"],
                    "recovered baseline": base["frac_recovered"],
                    "KL MFR": mfr["kl"],
                    "KL baseline": base["kl"],
                }
            )
        table2.append(row)
    lm = s["lm"]["baseline"] or {}
    mean_mse = np.mean([relative_diff(by[(True, k)]["mse"], by[(False, k)]["mse"]) for k in KS])
    lines = [
        "# Reproduction: MFR on language-model activations (paper Section 4.1)",
        "",
        f"Generated by `mfr-sae reproduce gpt2{' --quick' if s['quick'] else ''}` on {s['machine']}. "
        f"{describe_runs(s['runs'], s['seconds'])}",
        "",
        f"Model `{s['model']}`, hook `{s['hook']}` (module `{s['module']}`), "
        f"text `{s['text']}`, {s['tokens']:,} training tokens, context {s['context']} (BOS first; its position is not "
        f"used), 5 baseline + 5 MFR TopK SAEs, h=3072, k={KS}, batch 500, lr 1e-3, MFR beta=auto "
        f"(= {fmt_num(s['beta'])}), warmup 100 steps, matches recomputed every {s['match_every']} steps. "
        f"MFR's reinitialisation: {s['reinit']}",
        "",
        *(
            [
                "This is the `--quick` setting: far fewer tokens than the paper's 2,000,000, so the SAEs are "
                "not converged.",
                "",
            ]
            if s["quick"]
            else []
        ),
        "## Verdict",
        "",
        f"Mean relative MSE difference, MFR vs baseline, over the five k: {mean_mse:+.3g}% "
        f"(paper: -5.66%). Clean cross-entropy {fmt_num(lm.get('ce_clean'))} and zero-ablated "
        f"{fmt_num(lm.get('ce_zero'))} on {lm.get('tokens', 0):,} held-out tokens "
        f"(paper: {PAPER_CE_CLEAN} and {PAPER_CE_ZERO}; a zero-ablated loss of 132 is far above the "
        "log-vocabulary loss of a uniform guess, about 10.8 for GPT-2, which suggests the paper's pipeline "
        "differed from the one described).",
        "",
        "## Table 1: reconstruction MSE",
        "",
        markdown_table(table1, list(table1[0])),
        "",
        "## Table 2: cross-entropy with the SAE spliced in, and loss recovered",
        "",
        markdown_table(table2, list(table2[0])),
        "",
        "`recovered` = (CE_zero - CE_sae) / (CE_zero - CE_clean); `KL` = KL(clean || spliced), per token. "
        "Measured differences are (MFR - baseline) / baseline; the paper's, as printed, divide by the MFR "
        "value in Table 1 and by the baseline in Table 2.",
        "",
        "## Decoder distances (paper Section 4.3)",
        "",
        figure_link(figure, FIGURE[1]),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
