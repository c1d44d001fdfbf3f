"""Agreement between independently trained runs (`mfr-sae compare`).

Members are paired across runs by k: the m-th member with a given k in one run against the m-th member
with the same k in the other. For each such pair of decoders, latents are matched one-to-one by the
Hungarian algorithm on cosine similarity, and
- PW-MCC (Song et al. 2025) is the mean matched cosine,
- the shared-latent fraction (Paulo & Belrose 2025) is the share of latents whose match has cosine
  above a threshold (default 0.7).
Both are averaged over every pair of runs. A run compared with itself gives 1.0 for both. Each run's
`twin_frac` (latents with a near-copy inside their own SAE) is reported beside them: agreement bought with
duplicated latents is not agreement.

The same PW-MCC between whole ensembles trained as replicates (`mfr-sae study`, `study-lm`): `agreement` of
two ensembles (member m against member m), `agreement_matrix` of every two, and `paired_agreement`, the matrix
of a paired permutation test (stats.paired_permutation_test).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from mfr_sae.checkpoint import load
from mfr_sae.config import ConfigError
from mfr_sae.ensemble import Ensemble
from mfr_sae.errors import CheckpointError
from mfr_sae.files import write_json
from mfr_sae.metrics import hungarian_match, twin_fraction
from mfr_sae.report import save_figure


def member_slots(ensemble: Ensemble) -> list[tuple[int, int]]:
    """(k, occurrence of that k) for each member, in order."""
    seen: dict[int, int] = {}
    slots = []
    for k in ensemble.ks:
        slots.append((k, seen.get(k, 0)))
        seen[k] = seen.get(k, 0) + 1
    return slots


def decoder_agreement(a: Tensor, b: Tensor, threshold: float = 0.7) -> tuple[float, float, np.ndarray]:
    """(PW-MCC, shared-latent fraction, matched cosines) of two decoders [h, d]."""
    _, _, cosines = hungarian_match(a, b)
    return float(cosines.mean()), float((cosines > threshold).mean()), cosines


def agreement(decoders_a: Tensor, decoders_b: Tensor) -> float:
    """PW-MCC of two ensembles' decoders [N, h, d]: member m against member m (one-to-one matched latents), mean
    over m."""
    return float(np.mean([decoder_agreement(a, b)[0] for a, b in zip(decoders_a, decoders_b)]))


def agreement_matrix(decoders: list[Tensor], progress: bool = False) -> np.ndarray:
    """Agreement between every two ensembles [E, E] (NaN on the diagonal)."""
    n = len(decoders)
    matrix = np.full((n, n), np.nan)
    for i, j in tqdm(list(combinations(range(n), 2)), desc="agreement", disable=not progress, leave=False):
        matrix[i, j] = matrix[j, i] = agreement(decoders[i], decoders[j])
    return matrix


def paired_agreement(treated: list[Tensor], control: list[Tensor], control_matrix: np.ndarray) -> np.ndarray:
    """The [2R, 2R] agreement matrix of paired_permutation_test: R treated ensembles, then their R controls
    (`control_matrix`: agreement_matrix of the controls, computed once for every treatment); a replicate's
    own two ensembles are never compared (NaN)."""
    replicates = len(treated)
    matrix = np.full((2 * replicates, 2 * replicates), np.nan)
    matrix[replicates:, replicates:] = control_matrix
    matrix[:replicates, :replicates] = agreement_matrix(treated)
    for r, q in combinations(range(replicates), 2):  # a treated ensemble against another replicate's control
        matrix[r, replicates + q] = matrix[replicates + q, r] = agreement(treated[r], control[q])
        matrix[q, replicates + r] = matrix[replicates + r, q] = agreement(treated[q], control[r])
    return matrix


def compare_runs(
    runs: list[str | Path], threshold: float = 0.7
) -> tuple[dict[str, Any], dict[tuple[int, int], np.ndarray]]:
    """Agreement of every pair of runs, member by member; returns (summary, matched cosines per slot)."""
    if len(runs) < 2:
        raise CheckpointError("compare needs at least two runs (give one run twice to compare it with itself)")
    ensembles = [load(r) for r in runs]
    shapes = {(e.d_in, e.d_sae) for e in ensembles}
    if len(shapes) > 1:
        described = ", ".join(f"{r}: d={e.d_in}, h={e.d_sae}" for r, e in zip(runs, ensembles))
        raise CheckpointError(f"runs differ in d or h ({described})")
    position = [{slot: i for i, slot in enumerate(member_slots(e))} for e in ensembles]  # slot -> member
    slots = [s for s in member_slots(ensembles[0]) if all(s in p for p in position[1:])]
    if not slots:
        raise CheckpointError("the runs have no k in common, so no members to compare")
    decoders = [e.decoder().detach() for e in ensembles]
    members, cosines = [], {}
    for slot in slots:
        values, shared, pooled = [], [], []
        for i, j in combinations(range(len(runs)), 2):
            mcc, frac, cos = decoder_agreement(
                decoders[i][position[i][slot]], decoders[j][position[j][slot]], threshold
            )
            values.append(mcc)
            shared.append(frac)
            pooled.append(cos)
        cosines[slot] = np.concatenate(pooled)
        members.append(
            {
                "k": slot[0],
                "member_of_k": slot[1],
                "member_per_run": [p[slot] for p in position],
                "pw_mcc": float(np.mean(values)),
                "shared_frac": float(np.mean(shared)),
                "pw_mcc_per_run_pair": values,
                "shared_frac_per_run_pair": shared,
            }
        )
    twins = [[twin_fraction(member) for member in decoder] for decoder in decoders]
    summary = {
        "runs": [str(r) for r in runs],
        "twin_frac": [{"run": str(r), "mean": float(np.mean(t)), "members": t} for r, t in zip(runs, twins)],
        "threshold": threshold,
        "pw_mcc": float(np.mean([m["pw_mcc"] for m in members])),
        "shared_frac": float(np.mean([m["shared_frac"] for m in members])),
        "members": members,
    }
    return summary, cosines


def run_names(runs: list[str | Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell the runs apart
    (runs/seed0/mfr and runs/seed1/mfr: seed0/mfr and seed1/mfr)."""
    parts = [Path(r).resolve().parts for r in runs]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in runs]  # the same folder given twice


def series_label(names: list[str], member: dict[str, Any]) -> str:
    """`seed0 member 1, seed1 member 0 (k=3)`: the members, by run, whose matched cosines a series pools."""
    return ", ".join(f"{n} member {i}" for n, i in zip(names, member["member_per_run"])) + f" (k={member['k']})"


def histogram(summary: dict[str, Any], cosines: dict[tuple[int, int], np.ndarray], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))  # not pyplot's: no backend or global figure state for a library call
    ax = fig.subplots()
    bins = np.linspace(-0.2, 1.0, 61).tolist()
    names = run_names(summary["runs"])
    for member in summary["members"]:
        ax.hist(
            cosines[(member["k"], member["member_of_k"])],
            bins=bins,
            histtype="step",
            label=series_label(names, member),
        )
    threshold = summary["threshold"]
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("cosine of one-to-one matched latents across runs")
    ax.set_ylabel("latents")
    ax.set_title("Matched cosines of each member with its counterpart in the other runs (same k)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below: the labels are long
    save_figure(fig, path)


def compare(runs: list[str | Path], out: str | Path, threshold: float = 0.7, overwrite: bool = False) -> dict[str, Any]:
    """Write out/compare.json and out/matched_cosines.png; return the summary. A folder that already holds
    a comparison is refused (before any work) unless `overwrite`."""
    out = Path(out)
    if (out / "compare.json").is_file() and not overwrite:
        raise ConfigError(
            f"{out} already holds a comparison (compare.json): pass --overwrite to replace it, or choose another --out"
        )
    summary, cosines = compare_runs(runs, threshold)
    out.mkdir(parents=True, exist_ok=True)
    histogram(summary, cosines, out / "matched_cosines.png")
    write_json(out / "compare.json", summary)
    return summary
