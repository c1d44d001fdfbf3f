"""What `reproduce synthetic` measures: from each finished run (ground-truth recovery, reconstruction,
agreement between the ensemble's two members, the Figure 5 cluster, the logged curves), and across
independently seeded ensembles of a method (AcrossAgreement)."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from torch import Tensor

from mfr_sae.checkpoint import load
from mfr_sae.compare import decoder_agreement
from mfr_sae.config import RunConfig
from mfr_sae.data import make_source
from mfr_sae.metrics import feature_agreement, reconstruction_metrics
from mfr_sae.report import mean_of
from mfr_sae.run_folder import METRICS_FILE

# Paper Figure 5's cluster: latents that another SAE also learned but that match no true feature.
CLUSTER_CROSS_MIN = 0.9
CLUSTER_GT_MAX = 0.5
# The per-member numbers of a run's results that its summary averages over the members.
MEMBER_KEYS = [
    "gt_mmcs",
    "gt_mmcs_hungarian",
    "gt_recovered_frac",
    "gt_mcc",
    "mse",
    "fvu",
    "dead_frac",
    "silent_frac",
    "twin_frac",
]
# A run's summary: one value per seed of a method.
SUMMARY_KEYS = [
    *MEMBER_KEYS,
    "pairwise_mmcs",
    "within_pw_mcc",
    "within_shared_frac",
    "pearson_r",
    "cluster_size",
    "reinit_events",
]
# Agreement across seeds: one value per pair of seeds of a method.
ACROSS_KEYS = ["across_pw_mcc", "across_shared_frac"]

# One analysed run (analyse_run): its `summary` (SUMMARY_KEYS), `decoder` [members, h, d], `beta`,
# per-latent `cross`, `gt` and `firing` (both members), per-member `cluster_sizes`, the logged
# recovery `curve` and `reinit_metric`.
RunAnalysis = dict[str, Any]


def analyse_run(cfg: RunConfig, run_dir: Path, results: dict[str, Any]) -> RunAnalysis:
    """Ensemble-level numbers of one run, and the per-latent data behind Figures 3, 5, 7 and 8."""
    ensemble = load(run_dir)
    source = make_source(cfg.data)
    truth = source.ground_truth
    vectors = source.eval_vectors(cfg.eval.n_samples)
    if truth is None or not isinstance(vectors, Tensor):
        raise ValueError(
            f"data.kind={cfg.data.kind!r}: the synthetic reproduction needs plain vectors with known true features"
        )
    decoder = ensemble.decoder().detach()
    firing = reconstruction_metrics(ensemble, vectors)["firing_prob"]
    cross, gt, fire, cluster_sizes, rs = [], [], [], [], []
    for a, b in [(0, 1), (1, 0)]:  # each member against the other, as in the paper's Figure 3
        x, y = feature_agreement(decoder[a], decoder[b], truth)
        cross.append(x)
        gt.append(y)
        fire.append(firing[a].numpy())
        cluster_sizes.append(int(((x >= CLUSTER_CROSS_MIN) & (y < CLUSTER_GT_MAX)).sum()))
        if np.ptp(x) > 1e-6:  # identical members: no r
            rs.append(float(stats.pearsonr(x, y).statistic))
    log = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    # over the members that measured it (dead_frac is None in runs shorter than its window)
    summary = {key: mean_of([m.get(key) for m in results["members"]]) for key in MEMBER_KEYS}
    within_mcc, within_shared, _ = decoder_agreement(decoder[0], decoder[1])
    summary.update(
        pairwise_mmcs=results["pairwise_mmcs"],
        within_pw_mcc=within_mcc,
        within_shared_frac=within_shared,
        pearson_r=float(np.mean(rs)) if rs else None,
        cluster_size=float(np.mean(cluster_sizes)),
        reinit_events=len(results["reinit_events"]),
    )
    return {
        "summary": summary,
        "decoder": decoder,
        "beta": results["beta"],
        "cluster_sizes": cluster_sizes,
        "cross": np.concatenate(cross),
        "gt": np.concatenate(gt),
        "firing": np.concatenate(fire),
        "curve": [
            (
                r["step"] * cfg.train.batch_size,
                [m["gt_mmcs"] for m in r["eval"]],
                [m["gt_recovered_frac"] for m in r["eval"]],
            )
            for r in log
            if "eval" in r
        ],
        "reinit_metric": [(r["step"], r["reinit_metric"]) for r in log if "reinit_metric" in r],
    }


class AcrossAgreement:
    """Agreement between two ensembles (of any methods and seeds): member m of one against member m of
    the other, averaged over m; PW-MCC and shared-latent fraction. Each pair is computed once, the
    ensemble of the lower seed first (then of the method first by name), whichever was asked first: the
    matching's float32 sums depend on the order, and this one makes two methods with the same ensembles
    agree bit for bit with every ensemble of another seed (so that identical arms test as identical)."""

    def __init__(self, runs: dict[str, list[RunAnalysis]], threshold: float):
        self.runs, self.threshold = runs, threshold
        self.cache: dict[tuple[tuple[str, int], tuple[str, int]], dict[str, float]] = {}

    def __call__(self, a: tuple[str, int], b: tuple[str, int]) -> dict[str, float]:
        first, second = sorted((a, b), key=lambda e: (e[1], e[0]))
        key = (first, second)
        if key not in self.cache:
            x, y = self.runs[first[0]][first[1]]["decoder"], self.runs[second[0]][second[1]]["decoder"]
            pairs = [decoder_agreement(x[m], y[m], self.threshold) for m in range(len(x))]
            self.cache[key] = {
                "across_pw_mcc": float(np.mean([p[0] for p in pairs])),
                "across_shared_frac": float(np.mean([p[1] for p in pairs])),
            }
        return self.cache[key]

    def per_seed_pair(self, method: str) -> dict[str, list[float]]:
        """Across-seed agreement of one method's ensembles, one value per seed pair (descriptive: the
        pairs share seeds, so they are not independent)."""
        pairs = [self((method, a), (method, b)) for a, b in combinations(range(len(self.runs[method])), 2)]
        return {key: [p[key] for p in pairs] for key in ACROSS_KEYS}

    def paired_similarity(self, treated: str, control: str, key: str) -> np.ndarray:
        """The [2R, 2R] matrix of one across_* measure between the ensembles of two methods, as
        stats.paired_permutation_test reads it: index r is treated's ensemble of seed r, R + r control's
        of the same seed; NaN on the diagonal and between the two ensembles of one seed (never compared)."""
        n = len(self.runs[treated])
        ensembles = [(treated, r) for r in range(n)] + [(control, r) for r in range(n)]
        similarity = np.full((2 * n, 2 * n), np.nan)
        for i, j in combinations(range(2 * n), 2):
            if j != i + n:
                similarity[i, j] = similarity[j, i] = self(ensembles[i], ensembles[j])[key]
        return similarity


def per_method_values(runs: dict[str, list[RunAnalysis]], agreement: AcrossAgreement) -> dict[str, Any]:
    """Each method's numbers: `per_seed` (SUMMARY_KEYS, one value per seed), `per_seed_pair`
    (ACROSS_KEYS, one value per pair of seeds) and `beta` (each run's)."""
    return {
        m: {
            "per_seed": {k: [r["summary"][k] for r in rs] for k in SUMMARY_KEYS},
            "per_seed_pair": agreement.per_seed_pair(m),
            "beta": [r["beta"] for r in rs],
        }
        for m, rs in runs.items()
    }
