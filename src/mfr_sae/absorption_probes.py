"""The probes of the absorption metric, as SAEBench 0.6.0 trains them (sae_bench/evals/absorption/).

- `train_probe`: one-vs-rest logistic probes for the 26 letters (probing.py train_multi_probe), on the model's
  activations (the ground-truth probe) or, with an L1 penalty, on an SAE's latents (k_sparse_probing.py).
- `f1`: per-letter F1 of logits > 0 (k_sparse_probing.py build_metrics_df, sklearn's f1_score).
- `main_latents`: a letter's main ("split") latents from k-sparse probes, k = 1..10 (k_sparse_probing.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mfr_sae.extras import require

LR, END_LR = 1e-2, 1e-5  # probing.py:62-63 (train_multi_probe's lr, end_lr); common.py:281
EPOCHS = 50  # common.py:280 (ground-truth probe), eval_config.py:65 (k_sparse_probe_num_epochs)
PROBE_BATCH, PROBE_DECAY = 64, 1e-4  # common.py:279 (batch_size=64), probing.py:395 (weight_decay)
SPARSE_BATCH, SPARSE_L1, SPARSE_DECAY = 4096, 0.01, 1e-6  # eval_config.py:60,55; k_sparse_probing.py:67 (l2_decay)
MAX_K = 10  # eval_config.py:27 (max_k_value)
F1_JUMP = 0.03  # eval_config.py:22 (f1_jump_threshold)


def train_probe(
    x: Tensor,
    labels: Tensor,
    *,
    batch_size: int = PROBE_BATCH,
    weight_decay: float = PROBE_DECAY,
    l1: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    desc: str = "probe",
) -> tuple[Tensor, Tensor]:
    """(weight [26, d], bias [26]) of 26 logistic probes trained jointly (by default, the ground-truth probe):
    BCE with logits, each letter's positives weighted by its negatives / positives (probing.py:50-53), Adam from LR
    decaying exponentially to END_LR over EPOCHS epochs, plus l1 x the mean over letters of |weight| summed
    (k_sparse_probing.py:88-89)."""
    y = nn.functional.one_hot(labels, 26).to(x.dtype)
    positives = y.sum(0)
    # a letter with no positive word: neg/pos is inf and inf * 0 NaNs the loss; any weight gives the same loss
    pos_weight = torch.where(positives > 0, (len(y) - positives) / positives.clamp(min=1), torch.ones_like(positives))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(x.shape[1], 26).to(x.dtype)  # nn.Linear's default init, as LinearProbe's
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(probe.parameters(), lr=LR, weight_decay=weight_decay)
    gamma = math.exp(math.log(END_LR / LR) / EPOCHS)  # probing.py:169, stepped once an epoch (:242)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    with torch.enable_grad():
        for _ in tqdm(range(EPOCHS), desc=f"absorption: {desc}", unit="epoch", disable=not progress):
            for rows in torch.split(torch.randperm(len(x), generator=generator), batch_size):
                loss = loss_fn(probe(x[rows]), y[rows])
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(dim=-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return probe.weight.detach().clone(), probe.bias.detach().clone()


def f1(predicted: Tensor, actual: Tensor) -> float:
    """Binary F1 of boolean vectors; 0 where there is no positive at all (sklearn's zero_division default)."""
    tp = int((predicted & actual).sum())
    wrong = int((predicted ^ actual).sum())
    return 0.0 if tp + wrong == 0 else 2 * tp / (2 * tp + wrong)


def letter_f1(logits: Tensor, labels: Tensor) -> list[float]:
    """Each letter's F1 of logit > 0 against the word's first letter (k_sparse_probing.py:374)."""
    return [f1(logits[:, i] > 0, labels == i) for i in range(26)]


def main_latents(
    sparse_weight: Tensor, letter: int, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> list[int]:
    """The letter's main latents: for k = 1..MAX_K the k latents of largest L1-probe weight, refit by sklearn's
    LogisticRegression on the training latents; k's latents are kept while the test F1 of the refit rises by more
    than F1_JUMP over the best so far (k_sparse_probing.py:160, :177-179, :390, :422-441)."""
    require("sklearn", "the absorption metric's k-sparse probes")
    from sklearn.linear_model import LogisticRegression

    (train_z, train_labels), (test_z, test_labels) = train, test
    best, kept = -100.0, []
    for k in range(1, MAX_K + 1):
        ids = sparse_weight[letter].topk(k).indices  # positive weights: latents that predict the letter
        fit = LogisticRegression(max_iter=500, class_weight="balanced").fit(
            train_z[:, ids].float().numpy(), (train_labels == letter).long().numpy()
        )
        scores = test_z[:, ids].float() @ torch.tensor(fit.coef_[0]).float() + float(fit.intercept_[0])
        score = f1(scores > 0, test_labels == letter)
        if score <= best + F1_JUMP:
            break
        best, kept = score, ids.tolist()
    return kept


def encode_all(encode: Callable[[Tensor], Tensor], x: Tensor, batch_size: int, like: Tensor) -> Tensor:
    """encode(x) in batches on the device and in the dtype of `like` (the decoder), as float32 on the CPU."""
    with torch.no_grad():
        parts = [encode(b.to(like.device, like.dtype)).float().cpu() for b in torch.split(x, batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, like.shape[0])


def sparse_probe(z: Tensor, labels: Tensor, seed: int, progress: bool) -> Tensor:
    """The L1-penalised probe on SAE latents whose weights rank the latents for each letter [26, h]."""
    weight, _ = train_probe(
        z,
        labels,
        batch_size=SPARSE_BATCH,
        weight_decay=SPARSE_DECAY,
        l1=SPARSE_L1,
        seed=seed,
        progress=progress,
        desc="L1 probe on latents",
    )
    return weight
