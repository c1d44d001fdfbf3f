"""Evaluation (docs/design.md section 5): reconstruction, sparsity, and feature similarity.

Feature matrices hold one feature per row. Similarities are computed in chunks of rows so that
h = 16384 against h = 16384 never needs the whole h x h matrix at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.assignment import max_assignment, solve_in_threads
from mfr_sae.ensemble import Ensemble

CHUNK_ROWS = 2048
TWIN_COSINE = 0.9  # two latents of one SAE above this cosine are twins


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of a with every row of b: [len(a), len(b)]."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def max_cosine(a: Tensor, b: Tensor, chunk: int = CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """For each row of a, its largest cosine with any row of b, and that row's index."""
    b_unit = F.normalize(b, dim=-1)
    values, index = [], []
    for start in range(0, len(a), chunk):
        sims = F.normalize(a[start : start + chunk], dim=-1) @ b_unit.T
        v, i = sims.max(dim=1)
        values.append(v)
        index.append(i)
    return torch.cat(values), torch.cat(index)


def twin_fraction(decoder: Tensor, threshold: float = TWIN_COSINE, chunk: int = CHUNK_ROWS) -> float:
    """Share of the rows of one SAE's decoder [h, d] that have another row of the same decoder at cosine
    > threshold: latents folded onto a shared direction (the collapse the `max` MFR penalty can cause)."""
    unit = F.normalize(decoder.detach().float(), dim=-1)
    twins: float = 0
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.T
        sims[:, start : start + chunk].fill_diagonal_(-1.0)  # a row is not its own twin
        twins += (sims > threshold).any(dim=1).sum().item()
    return twins / len(unit)


def mmcs(a: Tensor, b: Tensor) -> float:
    """Mean max cosine similarity of the rows of a against b (not symmetric)."""
    return max_cosine(a, b)[0].mean().item()


Matching = tuple[np.ndarray, np.ndarray, np.ndarray]  # rows of a, their partners in b, the matched cosines


def hungarian_match(a: Tensor, b: Tensor, absolute: bool = False) -> Matching:
    """One-to-one matching of rows of a to rows of b maximising total cosine (absolute cosine if asked).

    Returns (rows of a, rows of b, matched cosines); min(len(a), len(b)) pairs."""
    return hungarian_matches([(a, b, absolute)])[0]


def hungarian_matches(problems: Iterable[tuple[Tensor, Tensor, bool]]) -> list[Matching]:
    """`hungarian_match(a, b, absolute)` of each problem, solved side by side in threads (`solve_in_threads`:
    the similarity of the next problem is computed while the assignments run)."""
    similarities = (
        (cosine_matrix(a.detach().float(), b.detach().float()).cpu().numpy(), absolute) for a, b, absolute in problems
    )
    return solve_in_threads(_assign, similarities)


def _assign(problem: tuple[np.ndarray, bool]) -> Matching:
    sims, absolute = problem
    rows, cols = max_assignment(np.abs(sims) if absolute else sims)
    return rows, cols, sims[rows, cols]


def ground_truth_metrics(decoder: Tensor, truth: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """How well one SAE's decoder rows [h, d] recover true features [n, d].

    gt_mmcs: mean over true features of the max cosine to any latent; gt_mmcs_hungarian: the cosines of
    a one-to-one matching summed over true features / n_true (an unmatched feature counts 0);
    gt_recovered_frac: share of true features with max cosine >= threshold; gt_mcc: mean absolute
    cosine over a one-to-one matching on absolute cosine (the mean correlation coefficient, MCC);
    gt_distinct: how many distinct true features are some latent's best match."""
    best, _ = max_cosine(truth, decoder)
    _, best_feature = max_cosine(decoder, truth)
    (_, _, matched), (_, _, matched_abs) = hungarian_matches([(truth, decoder, False), (truth, decoder, True)])
    return {
        "gt_mmcs": best.mean().item(),
        "gt_mmcs_hungarian": float(matched.sum() / len(truth)),
        "gt_recovered_frac": (best >= threshold).float().mean().item(),
        "gt_mcc": float(np.abs(matched_abs).mean()),
        "gt_distinct": int(torch.unique(best_feature).numel()),
    }


@torch.no_grad()
def reconstruction_metrics(
    ensemble: Ensemble, vectors: Tensor, batch_size: int = 5000, targets: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-member MSE, FVU, L0 and per-latent firing probability on held-out vectors; with `targets`
    (denoising) the errors are against them, and the SNR of the input and of the output are added.

    Returns tensors with a leading member axis: mse [N], fvu [N], l0 [N], firing_prob [N, h],
    and with targets snr_out_db [N] and snr_in_db (one number)."""
    n = ensemble.n_members
    device = ensemble.W_enc.device
    targets = vectors if targets is None else targets
    squared_error = torch.zeros(n, dtype=torch.float64, device=device)
    active = torch.zeros(n, dtype=torch.float64, device=device)
    fired = torch.zeros(n, ensemble.d_sae, dtype=torch.float64, device=device)
    mean = targets.double().mean(0).to(device)
    total_variance = signal = input_error = 0.0
    for start in range(0, len(vectors), batch_size):
        x = vectors[start : start + batch_size].to(device)
        target = targets[start : start + batch_size].to(device).double()
        out = ensemble(x)
        squared_error += (out.x_hat - target).pow(2).sum(dim=(1, 2))
        total_variance += (target - mean).pow(2).sum().item()
        signal += target.pow(2).sum().item()
        input_error += (x - target).pow(2).sum().item()
        on = out.acts > 0
        active += on.sum(dim=(1, 2)).double()
        fired.scatter_add_(1, out.idx.reshape(n, -1), on.reshape(n, -1).double())
    count = len(vectors)
    metrics = {
        "mse": (squared_error / (count * ensemble.d_in)).float().cpu(),
        "fvu": (squared_error / total_variance).float().cpu(),
        "l0": (active / count).float().cpu(),
        "firing_prob": (fired / count).float().cpu(),
    }
    if targets is not vectors:
        metrics["snr_out_db"] = (10 * torch.log10(signal / squared_error)).float().cpu()
        metrics["snr_in_db"] = torch.tensor(10 * math.log10(signal / input_error) if input_error else math.inf)
    return metrics


def evaluate(
    ensemble: Ensemble,
    vectors: Tensor,
    ground_truth: Tensor | None,
    dead: Tensor,
    threshold: float = 0.9,
    batch_size: int = 5000,
    targets: Tensor | None = None,
    dead_measured: Sequence[bool] | None = None,
) -> tuple[list[dict[str, float | None]], Tensor]:
    """One dict per member (k, mse, fvu, l0, dead_frac, silent_frac, twin_frac, the ground-truth metrics when
    known, and with denoising `targets` mse_clean, snr_in_db, snr_out_db), and the firing probability of every
    latent [N, h]. `dead` [N, h] marks latents that never fired over the training window; `dead_measured`
    [N] says which members have trained over a whole window (the others' dead_frac is None: not measured).
    silent_frac: share of latents that never fired on `vectors`."""
    rec = reconstruction_metrics(ensemble, vectors, batch_size, targets)
    decoder = ensemble.decoder().detach()
    silent = (rec["firing_prob"] == 0).float().mean(dim=1)
    members = []
    for i in range(ensemble.n_members):
        measured = dead_measured is None or bool(dead_measured[i])
        member = {
            "member": ensemble.member_ids[i],
            "k": ensemble.ks[i],
            "mse": rec["mse"][i].item(),
            "fvu": rec["fvu"][i].item(),
            "l0": rec["l0"][i].item(),
            "dead_frac": dead[i].float().mean().item() if measured else None,
            "silent_frac": silent[i].item(),
            "twin_frac": twin_fraction(decoder[i]),
        }
        if "snr_out_db" in rec:
            snr_in = rec["snr_in_db"].item()
            member.update(
                mse_clean=member["mse"],
                snr_in_db=snr_in if math.isfinite(snr_in) else None,
                snr_out_db=rec["snr_out_db"][i].item(),
            )
        if ground_truth is not None:
            member.update(ground_truth_metrics(decoder[i], ground_truth.to(decoder.device), threshold))
        members.append(member)
    return members, rec["firing_prob"]


def feature_agreement(decoder_a: Tensor, decoder_b: Tensor, truth: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Paper Figure 3: for every latent of SAE a, the cosine with its one-to-one (Hungarian) partner in
    SAE b (x) and with its one-to-one partner among the true features (y). Latents left unmatched
    (when the other side is smaller) get their plain max cosine instead."""

    def per_latent(other: Tensor) -> np.ndarray:
        values = max_cosine(decoder_a, other)[0].cpu().numpy()
        rows, _, matched = hungarian_match(decoder_a, other)
        values[rows] = matched
        return values

    return per_latent(decoder_b), per_latent(truth)
