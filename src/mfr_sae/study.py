"""`mfr-sae study`: does any MFR setting give better SAEs than the baseline where the truth is known?

A grid of settings (the baseline, and beta in {0.001, 0.01, 0.1, 1} x auto for each similarity form:
the paper's `max`, the one-to-one `hungarian`, and `max` thresholded at cosine 0.7) is trained on two
datasets with known true features: `learnable` (independent Zipf firing, where a TopK baseline recovers
most features) and `paper` (the paper's grouped generator, where no method isolates single features).

Replicate r is independent of the others: its own sample stream (data.stream_seed = r) and its own
initialisation (train.seed = r); the true features of a dataset are fixed (data.seed), so that ensembles
of different replicates can be compared latent by latent. Every setting of replicate r sees the same
samples and starts from the same weights as the baseline of replicate r: tests are paired over
replicates. Per run: MCC to the truth, FVU, twin_frac and gt_distinct (means over members); per setting,
agreement ACROSS replicates (PW-MCC of member m of one replicate's ensemble against member m of
another's). `analyse` makes the tests (stats.py); study_report.py
writes the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mfr_sae.checkpoint import load
from mfr_sae.compare import decoder_agreement
from mfr_sae.config import PAPER_MFR, RunConfig, load_config
from mfr_sae.reproduce import RunTracker, machine
from mfr_sae.stats import ALPHA, holm, paired_permutation_test, paired_test, t_half_width
from mfr_sae.study_report import write_report

BETA_FACTORS = (0.001, 0.01, 0.1, 1.0)
FORMS = {  # similarity form -> its mfr.* settings (hungarian re-matched every 10 steps: scipy's solver)
    "max": ["mfr.mmcs=max"],
    "hungarian": ["mfr.mmcs=hungarian", "mfr.match_every=10"],
    "max>0.7": ["mfr.mmcs=max", "mfr.min_cosine=0.7"],
}
BASELINE = "baseline"
MEASURES = ("gt_mcc", "fvu", "twin_frac", "gt_distinct")
# "without losing FVU": the 95% CI of the FVU difference stays below 1% of the baseline's FVU
FVU_MARGIN = 0.01
# a setting fit to be the default also keeps its members' twin fraction within this of the baseline's
TWIN_TOLERANCE = 0.02
FEATURE_SEED = 0  # the true features of every dataset; replicates vary the samples and the initialisation

DATASETS = {
    # independent Zipf firing: 1,024 unit features in 128 dimensions, ~6 active, 3 members with h = n
    "learnable": {
        "full": [
            "data.firing=independent",
            "data.d=128",
            "data.n_features=1024",
            "data.mean_active=6",
            "data.zipf_exponent=0.3",
            "data.normalize_features=true",
            "sae.n_members=3",
            "sae.d_sae=1024",
            "sae.k=6",
            "train.n_samples=500000",
            "train.batch_size=512",
            "eval.n_samples=10000",
        ],
        "quick": [
            "data.firing=independent",
            "data.d=48",
            "data.n_features=192",
            "data.mean_active=4",
            "data.zipf_exponent=0.3",
            "data.normalize_features=true",
            "sae.n_members=3",
            "sae.d_sae=192",
            "sae.k=4",
            "train.n_samples=120000",
            "train.batch_size=256",
            "eval.n_samples=5000",
        ],
    },
    # the paper's generator and SAEs (SPEC sections 1-2), 2 members, 400 steps of 1,000 vectors
    "paper": {
        "full": ["train.n_samples=400000", "train.batch_size=1000", "eval.n_samples=10000"],
        "quick": [
            "data.d=64",
            "data.n_features=128",
            "data.n_groups=4",
            "data.n_active=9",
            "sae.d_sae=128",
            "sae.k=9",
            "train.n_samples=100000",
            "train.batch_size=1000",
            "eval.n_samples=5000",
        ],
    },
}
COMMON = ["train.checkpoint_every=0", "train.log_every=50", f"data.seed={FEATURE_SEED}", *PAPER_MFR]


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]

    @property
    def folder(self) -> str:
        return self.name.replace(">", "_gt_").replace("*", "x").replace(" ", "_")


def settings() -> list[Setting]:
    """The baseline, then every form x beta factor."""
    grid = [Setting(BASELINE, ("mfr.enabled=false",))]
    for form, overrides in FORMS.items():
        for factor in BETA_FACTORS:
            grid.append(
                Setting(f"{form} {factor:g}*auto", ("mfr.enabled=true", f"mfr.beta={factor:g}*auto", *overrides))
            )
    return grid


def run_config(dataset: str, setting: Setting, replicate: int, quick: bool, extra: Sequence[str] = ()) -> RunConfig:
    scale = DATASETS[dataset]["quick" if quick else "full"]
    return load_config(
        None,
        COMMON
        + scale
        + list(extra)
        + list(setting.overrides)
        + [f"data.stream_seed={replicate}", f"train.seed={replicate}"],
    )


def member_means(results: dict[str, Any]) -> dict[str, float]:
    """A run's measures, each the mean over its members."""
    return {key: float(np.mean([m[key] for m in results["members"]])) for key in MEASURES}


def agreement(decoders_a, decoders_b) -> float:
    """PW-MCC of two ensembles: member m against member m (one-to-one matched latents), mean over m."""
    return float(np.mean([decoder_agreement(a, b)[0] for a, b in zip(decoders_a, decoders_b)]))


def agreement_matrix(decoders: list, progress: bool = False) -> np.ndarray:
    """Agreement between every two ensembles [E, E] (NaN on the diagonal)."""
    n = len(decoders)
    matrix = np.full((n, n), np.nan)
    for i, j in tqdm(list(combinations(range(n), 2)), desc="agreement", disable=not progress, leave=False):
        matrix[i, j] = matrix[j, i] = agreement(decoders[i], decoders[j])
    return matrix


def run_dataset(
    out: Path, dataset: str, replicates: int, quick: bool, progress: bool, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Train (or reuse) every setting on every replicate of one dataset; per-run measures and the
    agreement between the ensembles of every setting and the baseline's."""
    grid = settings()
    values: dict[str, dict[str, list[float]]] = {s.name: {k: [] for k in MEASURES} for s in grid}
    decoders: dict[str, list] = {s.name: [] for s in grid}
    betas: dict[str, list[float | None]] = {s.name: [] for s in grid}
    jobs = [(r, s) for r in range(replicates) for s in grid]
    started = time.perf_counter()
    tracker = RunTracker(len(jobs), out, progress, bars=False)
    for replicate, setting in jobs:
        cfg = run_config(dataset, setting, replicate, quick, extra)
        run_dir = out / dataset / setting.folder / f"rep{replicate}"
        results = tracker.run(f"{dataset}: {setting.name}, replicate {replicate}", cfg, run_dir)
        for key, value in member_means(results).items():
            values[setting.name][key].append(value)
        betas[setting.name].append(results["beta"])
        decoders[setting.name].append(load(run_dir).decoder().detach())
    # agreement across replicates: the baseline's R ensembles and each setting's, every pair (for the
    # permutation test, which swaps a replicate's setting and baseline ensembles)
    base = decoders[BASELINE]
    base_matrix = agreement_matrix(base)
    across: dict[str, Any] = {}
    for setting in tqdm(grid[1:], desc=f"{dataset}: agreement", disable=not progress):
        ens = decoders[setting.name]
        matrix = np.full((2 * replicates, 2 * replicates), np.nan)
        matrix[replicates:, replicates:] = base_matrix
        matrix[:replicates, :replicates] = agreement_matrix(ens)
        for r, q in combinations(range(replicates), 2):  # a setting's ensemble against another replicate's baseline
            matrix[r, replicates + q] = matrix[replicates + q, r] = agreement(ens[r], base[q])
            matrix[q, replicates + r] = matrix[replicates + r, q] = agreement(ens[q], base[r])
        across[setting.name] = matrix.tolist()
    return {
        "values": values,
        "betas": betas,
        "agreement": across,
        "baseline_agreement": base_matrix.tolist(),
        "config": run_config(dataset, grid[0], 0, quick, extra).to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def study(
    out: str | Path,
    quick: bool = False,
    replicates: int = 5,
    datasets: tuple[str, ...] = ("learnable", "paper"),
    progress: bool = True,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the grid on each dataset and write out/report.md, out/results.json and out/fig_fvu_mcc.png.
    `extra` (section.field=value) changes every run, e.g. for a smaller test."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    raw = {name: run_dataset(out, name, replicates, quick, progress, extra) for name in datasets}
    summary = {
        "quick": quick,
        "replicates": replicates,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": [{"name": s.name, "overrides": list(s.overrides)} for s in settings()],
        "fvu_margin": FVU_MARGIN,
        "twin_tolerance": TWIN_TOLERANCE,
        "datasets": {name: {**data, **analyse(data, replicates)} for name, data in raw.items()},
    }
    write_report(out, summary)
    return summary


def describe(values: list[float]) -> dict[str, Any]:
    """Mean, sd and t-based 95% interval of the mean over replicates."""
    arr = np.asarray(values, float)
    mean = float(arr.mean())
    if len(arr) < 2:
        return {"mean": mean, "sd": None, "ci95": None}
    sd = float(arr.std(ddof=1))
    half = t_half_width(sd, len(arr))
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def analyse(data: dict[str, Any], replicates: int) -> dict[str, Any]:
    """Every setting against the baseline of the same replicates: paired t-tests of the run measures, the
    permutation test of agreement across replicates, Holm's correction within each measure's family (the
    12 settings), which settings beat the baseline on MCC without losing FVU (`winners`, largest gain
    first), and the first of them whose twin fraction stays within TWIN_TOLERANCE of the baseline's
    (`recommended`: fit to be the default)."""
    values, names = data["values"], [n for n in data["values"] if n != BASELINE]
    base = values[BASELINE]
    rows: dict[str, dict[str, Any]] = {n: {"measures": {k: describe(v) for k, v in values[n].items()}} for n in values}
    base_across = np.asarray(data["baseline_agreement"])
    rows[BASELINE]["measures"]["across_pw_mcc"] = (
        describe([float(np.nanmean(np.delete(base_across[r], r))) for r in range(replicates)])
        if replicates > 1
        else None
    )
    for name in names:
        tests = {key: paired_test(values[name][key], base[key]) for key in MEASURES}
        matrix = np.asarray(data["agreement"][name])
        tests["across_pw_mcc"] = paired_permutation_test(matrix, replicates)
        own = matrix[:replicates, :replicates]
        rows[name]["measures"]["across_pw_mcc"] = (
            describe([float(np.nanmean(np.delete(own[r], r))) for r in range(replicates)]) if replicates > 1 else None
        )
        rows[name]["tests"] = tests
    for key in (*MEASURES, "across_pw_mcc"):
        p_key = "p" if key == "across_pw_mcc" else "t_test_p"
        for name, adjusted in zip(names, holm([rows[n]["tests"][key][p_key] for n in names])):
            rows[name]["tests"][key]["p_holm"] = adjusted
    base_fvu = float(np.mean(base["fvu"]))
    for name in names:
        tests = rows[name]["tests"]
        mcc, fvu = tests["gt_mcc"], tests["fvu"]
        fvu_high = fvu["ci95"][1] if fvu["ci95"] else None
        rows[name]["fvu_not_worse"] = fvu_high is not None and fvu_high <= FVU_MARGIN * base_fvu
        twin = tests["twin_frac"]["mean_diff"]
        rows[name]["twin_ok"] = twin is not None and abs(twin) <= TWIN_TOLERANCE
        rows[name]["beats_baseline"] = bool(
            rows[name]["fvu_not_worse"]
            and mcc["mean_diff"] is not None
            and mcc["mean_diff"] > 0
            and mcc["p_holm"] is not None
            and mcc["p_holm"] < ALPHA
        )
    winners = sorted(
        (n for n in names if rows[n]["beats_baseline"]), key=lambda n: -rows[n]["tests"]["gt_mcc"]["mean_diff"]
    )
    recommended = [n for n in winners if rows[n]["twin_ok"]]
    return {
        "rows": rows,
        "winners": winners,
        "best": winners[0] if winners else None,
        "recommended": recommended[0] if recommended else None,
        "fvu_margin": FVU_MARGIN * base_fvu,
    }
