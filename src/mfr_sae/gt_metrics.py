"""SynthSAEBench's ground-truth metrics (Chanin et al. 2026), defined as `sae_lens.synthetic.eval_sae_on_synthetic_data`
defines them (sae-lens 6.54, synthetic/evals.py), for every member of an ensemble at once and batch by batch, so
that 16,384 true features against 4,096 latents fit in memory. Needs no sae-lens.

For each SAE (decoder rows [h, d]) on samples x [B, d] with true feature activations a [B, n] and true features
F [n, d]:
- true_l0: mean number of non-zero true activations a sample; sae_l0: of non-zero latents.
- dead_latents: latents that never fire (code != 0) on the samples.
- shrinkage: mean over samples with ||x|| > 1e-6 of ||x_hat|| / ||x||.
- explained_variance: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2).
- mcc: mean |cosine| of decoder rows and true features paired one-to-one by the matching that maximises it
  (Hungarian), over min(h, n) pairs.
- uniqueness: distinct true features among the latents' best matches (largest |cosine|) / h.
- precision, recall, f1_score, accuracy: each latent a detector of its best-matching feature (fires: code != 0;
  the feature is on: a > 0); per latent TP / (TP + FP), TP / (TP + FN) (0 where undefined), their harmonic mean
  (0 where both are 0), (TP + TN) / samples; each averaged over latents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from mfr_sae.assignment import max_assignment, solve_in_threads

CHUNK_ROWS = 1024  # decoder rows against all true features at a time
MIN_INPUT_NORM = 1e-6  # shrinkage skips samples of smaller norm (sae-lens's ShrinkageCalculator)


@dataclass
class GroundTruthScores:
    """One SAE's metrics (the module's docstring), named as sae-lens's SyntheticDataEvalResult names them (its
    `classification` fields flattened)."""

    true_l0: float
    sae_l0: float
    dead_latents: int
    shrinkage: float
    explained_variance: float
    mcc: float
    uniqueness: float
    precision: float
    recall: float
    f1_score: float
    accuracy: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def member_results(self) -> dict[str, float]:
        """The member's keys for results.json (the run's true_l0 is not among them)."""
        return {
            "gt_mcc": self.mcc,
            "gt_f1": self.f1_score,
            "gt_precision": self.precision,
            "gt_recall": self.recall,
            "gt_accuracy": self.accuracy,
            "gt_uniqueness": self.uniqueness,
            "gt_explained_variance": self.explained_variance,
            "gt_shrinkage": self.shrinkage,
            "gt_dead_latents": self.dead_latents,
            "gt_sae_l0": self.sae_l0,
        }


def _unit(rows: Tensor) -> Tensor:
    """Rows scaled to unit norm, a zero row left zero (sae-lens's `cosine_similarities` clamps norms at 1e-8)."""
    rows = rows.detach().float()
    unit: Tensor = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return unit


def abs_cosines(decoder: Tensor, truth: Tensor) -> Tensor:
    """|cosine| of every decoder row with every true feature: [h, n]."""
    return (_unit(decoder) @ _unit(truth).T).abs()


def best_matches(decoder: Tensor, truth: Tensor, chunk: int = CHUNK_ROWS) -> Tensor:
    """Each decoder row's best-matching true feature (largest |cosine|): [h] long, computed `chunk` rows at a time."""
    unit_truth = _unit(truth).T
    unit = _unit(decoder)
    return torch.cat([(unit[s : s + chunk] @ unit_truth).abs().argmax(dim=1) for s in range(0, len(unit), chunk)])


def uniqueness(matches: Tensor, n_latents: int) -> float:
    """Distinct best matches / latents (0 for no latents)."""
    return torch.unique(matches).numel() / n_latents if n_latents else 0.0


def mcc(decoder: Tensor, truth: Tensor) -> float:
    """Mean |cosine| over the one-to-one matching of decoder rows and true features that maximises it."""
    return mccs([decoder], truth)[0]


def mccs(decoders: Iterable[Tensor], truth: Tensor) -> list[float]:
    """`mcc` of each decoder, the matchings solved side by side in threads."""
    return solve_in_threads(_mcc_of, (abs_cosines(dec, truth).cpu().numpy() for dec in decoders))


def _mcc_of(score: np.ndarray) -> float:
    rows, cols = max_assignment(score)
    return float(score[rows, cols].astype(np.float64).mean())


def decoder_scores(decoder: Tensor, truth: Tensor) -> dict[str, float]:
    """The metrics that read only a decoder (e.g. an ensemble's consensus decoder): mcc and uniqueness."""
    return {"mcc": mcc(decoder, truth), "uniqueness": uniqueness(best_matches(decoder, truth), len(decoder))}


class GroundTruthEval:
    """Accumulates the metrics of N SAEs over batches. decoders: [N, h, d] (or one [h, d]); truth: [n, d].
    `add` each batch; `scores` at the end."""

    def __init__(self, decoders: Tensor, truth: Tensor, chunk: int = CHUNK_ROWS):
        decoders = decoders.detach()
        self.decoders = decoders.unsqueeze(0) if decoders.dim() == 2 else decoders
        self.truth = truth.detach()
        n, h = self.decoders.shape[0], self.decoders.shape[1]
        device = self.decoders.device
        self.matches = torch.stack([best_matches(dec, self.truth, chunk) for dec in self.decoders])  # [N, h]
        self.samples = 0
        self.true_active = 0
        self.feature_on = torch.zeros(len(self.truth), dtype=torch.long, device=device)  # samples where a > 0
        self.fired = torch.zeros(n, h, dtype=torch.long, device=device)  # samples where the latent fired
        self.hits = torch.zeros(n, h, dtype=torch.long, device=device)  # ... and its best match was on (TP)
        self.sum_x = torch.zeros(self.decoders.shape[2], dtype=torch.float64, device=device)
        self.sum_squared_norm = 0.0
        self.squared_residual = torch.zeros(n, dtype=torch.float64, device=device)
        self.shrinkage_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.shrinkage_samples = 0

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, true_acts: Tensor, codes: Tensor, idx: Tensor | None = None) -> None:
        """One batch: inputs x [B, d]; reconstructions x_hat [N, B, d]; true activations [B, n] (dense);
        codes [N, B, h], or [N, B, k] of the latents `idx` [N, B, k] (a latent at most once a row where non-zero)."""
        if x_hat.dim() == 2:
            x_hat, codes = x_hat.unsqueeze(0), codes.unsqueeze(0)
            idx = None if idx is None else idx.unsqueeze(0)
        device = self.fired.device
        x, x_hat, true_acts, codes = x.to(device), x_hat.to(device), true_acts.to(device), codes.to(device)
        n_members, batch = self.fired.shape[0], len(x)
        self.samples += batch
        self.true_active += int((true_acts != 0).sum())
        on = true_acts > 0
        self.feature_on += on.sum(dim=0)
        fires = codes != 0
        if idx is None:
            self.fired += fires.sum(dim=1)
            for m in range(n_members):
                self.hits[m] += (fires[m] & on[:, self.matches[m]]).sum(dim=0)
        else:
            idx = idx.to(device)
            for m in range(n_members):
                hit = fires[m] & on.gather(1, self.matches[m][idx[m]])
                self.fired[m].index_add_(0, idx[m].flatten(), fires[m].flatten().long())
                self.hits[m].index_add_(0, idx[m].flatten(), hit.flatten().long())
        x32 = x.float()
        self.sum_x += x32.sum(dim=0).double()
        self.sum_squared_norm += x32.pow(2).sum().item()
        self.squared_residual += (x32 - x_hat.float()).pow(2).sum(dim=(1, 2)).double()
        norm = x32.norm(dim=-1)
        valid = norm > MIN_INPUT_NORM
        self.shrinkage_sum += (x_hat.float().norm(dim=-1)[:, valid] / norm[valid]).sum(dim=1).double()
        self.shrinkage_samples += int(valid.sum())

    def scores(self, member_mcc: Sequence[float] | None = None) -> list[GroundTruthScores]:
        """Each SAE's metrics over the batches added; `member_mcc`: each SAE's MCC to this truth where already
        measured (metrics.ground_truth_metrics' gt_mcc: the same matching, which at 16k features costs seconds)."""
        n_latents = self.fired.shape[1]
        samples = max(self.samples, 1)
        mean_x = self.sum_x / samples
        total_variance = self.sum_squared_norm / samples - mean_x.pow(2).sum().item()
        tp = self.hits.double()
        fp = self.fired.double() - tp
        fn = self.feature_on[self.matches].double() - tp
        tn = self.samples - tp - fp - fn
        precision = torch.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = torch.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        accuracy = (tp + tn) / max(self.samples, 1e-8)
        member_mcc = list(member_mcc) if member_mcc is not None else mccs(self.decoders, self.truth)
        results = []
        for m in range(self.fired.shape[0]):
            mse = self.squared_residual[m].item() / samples
            if self.samples == 0:
                explained = 0.0
            elif total_variance < 1e-10:
                explained = 1.0 if mse < 1e-10 else 0.0
            else:
                explained = 1.0 - mse / total_variance
            results.append(
                GroundTruthScores(
                    true_l0=self.true_active / samples,
                    sae_l0=self.fired[m].sum().item() / samples,
                    dead_latents=int((self.fired[m] == 0).sum()),
                    shrinkage=self.shrinkage_sum[m].item() / self.shrinkage_samples if self.shrinkage_samples else 0.0,
                    explained_variance=explained,
                    mcc=member_mcc[m],
                    uniqueness=uniqueness(self.matches[m], n_latents),
                    precision=precision[m].mean().item() if n_latents else 0.0,
                    recall=recall[m].mean().item() if n_latents else 0.0,
                    f1_score=f1[m].mean().item() if n_latents else 0.0,
                    accuracy=accuracy[m].mean().item() if n_latents else 0.0,
                )
            )
        return results


Forward = Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]


def evaluate_ground_truth(
    forward: Forward,
    decoders: Tensor,
    truth: Tensor,
    batches: Iterable[tuple[Tensor, Tensor]],
    member_mcc: Sequence[float] | None = None,
) -> list[GroundTruthScores]:
    """The metrics of N SAEs over `batches` of (x [B, d], true activations [B, n]). forward(x) gives
    (x_hat [N, B, d], codes, idx) as `GroundTruthEval.add` takes them (idx None for dense codes [N, B, h]).
    For an Ensemble: forward = lambda x: (out := ensemble(x)).x_hat, out.acts, out.idx, decoders =
    ensemble.decoder(), batches = SynthSAEBenchData.held_out(n).batches(). `member_mcc`: as `scores` takes it."""
    accumulator = GroundTruthEval(decoders, truth)
    with torch.no_grad():
        for x, true_acts in batches:
            x_hat, codes, idx = forward(x)
            accumulator.add(x, x_hat, true_acts, codes, idx)
    return accumulator.scores(member_mcc)
