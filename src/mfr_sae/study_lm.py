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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from mfr_sae.checkpoint import load
from mfr_sae.compare import agreement_matrix, paired_agreement
from mfr_sae.config import RunConfig, load_config
from mfr_sae.data.activations import build_cache, read_manifest
from mfr_sae.evaluate import DESCRIBED, HEADLINE, EvaluationOptions, Evaluator, headline
from mfr_sae.extras import require
from mfr_sae.files import write_json
from mfr_sae.reproduce import RunTracker, commit, machine
from mfr_sae.stats import holm, paired_permutation_test, paired_test
from mfr_sae.study_lm_report import write_report

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
    evaluation: EvaluationOptions | None = None,
) -> dict[str, Any]:
    """Cache `cache_tokens` activations (default: `tokens` + `holdout`, one pass; fewer means several passes
    over the cache), train the baseline and the defaults of mfr.* for each seed on `tokens` vectors, and write
    out/report.md and out/results.json. `extra` (section.field=value) changes every run. With `evaluation`, each
    run is also evaluated as `mfr-sae evaluate` does (evaluation.json in its folder) and the headline numbers of
    sparse probing and absorption join the tested measures."""
    require("transformers", "mfr-sae study-lm")  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cached = cache_tokens if cache_tokens is not None else tokens + holdout
    cache = build_cache(model, hook, text, out / "cache", cached, context=context, progress=progress)
    manifest = read_manifest(cache, verify=False)
    # the model's side of the evaluation once for all runs; a wrong option fails here, before any training
    evaluator = Evaluator(manifest["model"], manifest["hook"], evaluation) if evaluation else None
    tracker = RunTracker(2 * seeds, out, progress, bars=progress)
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    decoders: dict[str, list[Tensor]] = {arm: [] for arm in ARMS}
    evaluation_of_run: dict[str, Any] = {}  # the last run's: what every run's evaluation shares is read from it
    for seed in range(seeds):
        for arm in ARMS:
            cfg = run_config(cache, manifest["d"], seed, arm, tokens, holdout, extra)
            run_dir = out / f"seed{seed}" / arm
            run = tracker.run(f"seed {seed}: {arm}", cfg, run_dir)
            if evaluator is not None:
                evaluation_of_run = evaluator.evaluate(run_dir)
                heads = headline(evaluation_of_run)
                run = {**run, "members": [m | h for m, h in zip(run["members"], heads)]}
            results[arm].append(run)
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
        **analyse(results, decoders, evaluated=evaluator is not None),
        "evaluation": evaluation_summary(evaluator.options, evaluation_of_run) if evaluator else None,
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


def evaluation_summary(options: EvaluationOptions, evaluation: dict[str, Any]) -> dict[str, Any]:
    """What every run's evaluation shares (read from one run's): the tasks and the raw-activation probe's AUC, and
    the letter filter's numbers."""
    probing = evaluation.get("probing")
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "probe_datasets": probing["datasets"] if probing else [],
        "probe_reference_auc": probing["baseline"]["test_auc"] if probing else None,
        "letters": (evaluation.get("absorption") or {}).get("letters"),
    }


def tested(evaluated: bool) -> dict[str, bool]:
    """The measures tested (Holm over all of them), higher is better or not."""
    return TESTED | (HEADLINE if evaluated else {})


def analyse(
    results: dict[str, list[dict[str, Any]]], decoders: dict[str, list[Tensor]], evaluated: bool = False
) -> dict[str, Any]:
    """Per arm, each measure over seeds; MFR against the baseline, paired over seeds (Holm over the tested ones);
    per k, the paired differences of FVU and loss recovered; agreement across seeds (permutation test)."""
    seeds = len(results["baseline"])
    measures = (*MEASURES, *HEADLINE, *DESCRIBED) if evaluated else MEASURES
    family = tested(evaluated)
    values = {
        arm: {key: member_values(runs, key) for key in measures}
        | {key: [run[key] for run in runs] for key in RUN_MEASURES}
        for arm, runs in results.items()
    }
    tests = {key: paired_test(values["mfr"][key], values["baseline"][key]) for key in (*measures, *RUN_MEASURES)}
    for key, p in zip(family, holm([tests[key]["t_test_p"] for key in family])):
        tests[key]["p_holm"] = p
    per_k = []
    for k in sorted({m["k"] for m in results["baseline"][0]["members"]}):  # the runs' own ks (--set sae.k=...)
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
        "tested": family,  # measure -> higher is better
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
