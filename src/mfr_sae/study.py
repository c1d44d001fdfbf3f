"""`mfr-sae study`: which MFR setting, chosen on tuning data, gives better SAEs than the baseline on held-out
data it never saw, where the truth is known?

1. Tuning: the baseline and the candidate settings (CANDIDATES: similarity form x beta, a ceiling) on the
   TUNING split of one or more datasets (true features data.seed 0, replicates 0..R-1); the setting chosen
   gains MCC on every one while keeping FVU and twin_frac, the largest smallest gain (`choose`).
2. Held-out: the baseline, the chosen setting and the defaults of mfr.* (DEFAULT_SETTING) on the HELD-OUT
   split of every dataset (other true features, data.seed 1; other replicates, 100..100+R-1), sizes and
   families the choice never saw. The verdict is this split's, Holm-corrected over every held-out MCC test.
   With --judge-on test, no tuning and no choice: the baseline and the frozen defaults alone on the TEST split
   (data.seed 2, replicates 200..), which no choice has seen, once, with the same tests (runs in out/test/...).

Replicate r is independent of the others: its own sample stream (data.stream_seed) and its own
initialisation (train.seed); the true features of a split are fixed, so that ensembles of different
replicates can be compared latent by latent. Every setting of replicate r sees the same samples and starts
from the same weights as the baseline of replicate r: tests are paired over replicates. Per run: MCC to the
truth, FVU, twin_frac, gt_distinct and silent_frac (means over members) and the members' one-to-one
agreement (pairwise_mmcs_hungarian: above 0.99 they are copies); per setting, agreement ACROSS replicates
(PW-MCC of member m of one replicate's ensemble against member m of another's). study_analysis.py makes the
tests (stats.py); study_report.py writes the report. The settings, datasets and splits: study_catalogue.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from mfr_sae.checkpoint import load
from mfr_sae.compare import agreement_matrix, paired_agreement
from mfr_sae.consensus import consensus_mcc
from mfr_sae.data import make_source
from mfr_sae.reproduce import RunTracker, machine
from mfr_sae.study_analysis import FVU_MARGIN, TWIN_TOLERANCE, analyse, choose, correct_across_datasets
from mfr_sae.study_catalogue import (
    BASELINE,
    BENCHMARK_MEASURES,
    CONSENSUS,
    DATASETS,
    DEFAULT_SETTING,
    JUDGED_SPLITS,
    MEASURES,
    RUN_MEASURES,
    SPLITS,
    TOPK,
    Setting,
    architecture_overrides,
    run_config,
    settings,
)
from mfr_sae.study_curves import learning_curve, mean_curves
from mfr_sae.study_report import write_report


@dataclass(frozen=True)
class HeldOut:
    """One judged comparison: a dataset's held-out (or test) split, trained as `architecture` (TOPK, the study's
    own, or a key of ARCHITECTURES, with its overrides)."""

    dataset: str
    architecture: str
    grid: list[Setting]

    @property
    def key(self) -> str:
        """Its name in the report and results.json."""
        return self.dataset if self.architecture == TOPK else f"{self.dataset} {self.architecture}"

    def folder(self, out: Path) -> Path:
        """Where its runs go: folder/SPLIT/DATASET/SETTING/repR."""
        return out if self.architecture == TOPK else out / self.architecture


def member_means(results: dict[str, Any]) -> dict[str, float]:
    """A run's measures: each member measure the mean over its members (the benchmark's where every member has
    them), and the ensemble's own."""
    members = results["members"]
    keys = [*MEASURES, *(key for key in BENCHMARK_MEASURES if all(key in m for m in members))]
    means = {key: float(np.mean([m[key] for m in members])) for key in keys}
    return means | {key: float(results[key]) for key in RUN_MEASURES}


def run_dataset(
    out: Path,
    dataset: str,
    grid: list[Setting],
    replicates: int,
    quick: bool,
    progress: bool,
    extra: Sequence[str] = (),
    split: str = "tuning",
) -> dict[str, Any]:
    """Train (or reuse) every setting of `grid` (the baseline first) on every replicate of one dataset's split;
    per-run measures and the agreement between the ensembles of every setting and the baseline's."""
    values: dict[str, dict[str, list[float]]] = {s.name: {} for s in grid}
    curves: dict[str, list[list[dict[str, float]]]] = {s.name: [] for s in grid}
    decoders: dict[str, list[Tensor]] = {s.name: [] for s in grid}
    betas: dict[str, list[float | None]] = {s.name: [] for s in grid}
    jobs = [(r, s) for r in range(replicates) for s in grid]
    config = run_config(dataset, grid[0], 0, quick, extra, split)
    truth = make_source(config.data).ground_truth  # a split's true features: the same for every run
    assert truth is not None  # every dataset of the study has its true features
    started = time.perf_counter()
    tracker = RunTracker(len(jobs), out, progress, bars=False)
    for replicate, setting in jobs:
        cfg = run_config(dataset, setting, replicate, quick, extra, split)
        run_dir = out / split / dataset / setting.folder / f"rep{replicate}"
        results = tracker.run(f"{split} {dataset}: {setting.name}, replicate {replicate}", cfg, run_dir)
        for key, value in member_means(results).items():
            values[setting.name].setdefault(key, []).append(value)
        curves[setting.name].append(learning_curve(run_dir, cfg.train.batch_size))
        betas[setting.name].append(results["beta"])
        decoder = load(run_dir).decoder().detach()
        decoders[setting.name].append(decoder)
        values[setting.name].setdefault(CONSENSUS, []).append(consensus_mcc(decoder, truth))
    # agreement across replicates: the baseline's R ensembles and each setting's, every pair (for the
    # permutation test, which swaps a replicate's setting and baseline ensembles)
    base = decoders[BASELINE]
    base_matrix = agreement_matrix(base)
    across = {
        setting.name: paired_agreement(decoders[setting.name], base, base_matrix).tolist()
        for setting in tqdm(grid[1:], desc=f"{dataset}: agreement", disable=not progress)
    }
    return {
        "values": values,
        "betas": betas,
        "agreement": across,
        "baseline_agreement": base_matrix.tolist(),
        "curves": mean_curves(curves),
        "config": config.to_dict(),
        "settings": [{"name": s.name, "overrides": list(s.overrides)} for s in grid],
        "seconds": round(time.perf_counter() - started, 1),
    }


def study(
    out: str | Path,
    quick: bool = False,
    replicates: int = 5,
    datasets: tuple[str, ...] = ("learnable", "paper"),
    progress: bool = True,
    extra: Sequence[str] = (),
    tune_replicates: int = 3,
    tune_on: tuple[str, ...] = ("learnable",),
    large_replicates: int = 3,
    candidates: tuple[str, ...] = (),
    architectures: tuple[str, ...] = (TOPK,),
    judge_on: str = "heldout",
) -> dict[str, Any]:
    """Choose a setting on the tuning splits of the `tune_on` datasets (among `candidates`, default all),
    judge it (and the defaults) on the held-out split of each of `datasets`; write out/report.md,
    out/results.json and out/fig_fvu_mcc.png. `extra` (section.field=value) changes every run, e.g. for a
    smaller test. The large datasets (minutes a run on a CPU) get `large_replicates` held-out replicates each,
    the others `replicates`. Each of `architectures` is judged on every held-out dataset: TOPK (the dataset as it
    stands: the tuned architecture) with the pick and the defaults; a key of ARCHITECTURES, its own baseline
    against it with the defaults (held-out key "DATASET ARCHITECTURE", runs in out/ARCHITECTURE/).
    `judge_on="test"`: nothing tuned or chosen; the baseline and the defaults alone on the test split of each dataset
    and architecture (runs in out/test/... and out/ARCHITECTURE/test/...)."""
    if judge_on not in JUDGED_SPLITS:
        raise ValueError(f"judge_on {judge_on!r}: one of {', '.join(JUDGED_SPLITS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    grid = settings()
    with_defaults = [s for s in grid if s.name in (BASELINE, DEFAULT_SETTING)]
    tune = judge_on == "heldout"  # the test split judges the frozen defaults: nothing is tuned or chosen for it
    tune_on = tune_on if tune else ()
    tried = [s for s in grid if s.name == BASELINE or not candidates or s.name in candidates] if tune else with_defaults
    tuning = {}
    for name in tune_on:
        data = run_dataset(out, name, tried, tune_replicates, quick, progress, extra, "tuning")
        tuning[name] = {**data, **analyse(data, tune_replicates)}
    chosen = choose(*tuning.values()) if tune else None
    judged = [s for s in grid if s.name in (BASELINE, DEFAULT_SETTING, chosen)]
    heldout = [
        HeldOut(name, arch, judged if arch == TOPK else with_defaults) for arch in architectures for name in datasets
    ]
    analysed = {}
    for h in heldout:
        count = large_replicates if DATASETS[h.dataset].get("large") else replicates
        overrides = (*extra, *architecture_overrides(h.dataset, h.architecture, quick))
        data = run_dataset(h.folder(out), h.dataset, h.grid, count, quick, progress, overrides, judge_on)
        analysed[h.key] = {
            **data,
            **analyse(data, count),
            "replicates": count,
            "dataset": h.dataset,
            "architecture": h.architecture,
            "split": judge_on,
        }
    correct_across_datasets(analysed)
    summary = {
        "quick": quick,
        "replicates": replicates,
        "large_replicates": large_replicates,
        "tune_replicates": tune_replicates,
        "tune_on": list(tune_on),
        "candidates": list(candidates),
        "architectures": list(architectures),
        "judged_on": judge_on,
        "judged_split": SPLITS[judge_on],
        "tuned": tune,  # False: nothing was chosen, the frozen defaults were judged
        "chosen": chosen,
        "default_setting": DEFAULT_SETTING,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": [{"name": s.name, "overrides": list(s.overrides)} for s in tried],
        "fvu_margin": FVU_MARGIN,
        "twin_tolerance": TWIN_TOLERANCE,
        "tuning": tuning,
        "datasets": analysed,
    }
    write_report(out, summary)
    return summary
