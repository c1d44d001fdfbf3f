"""Loss recovered on a language model (docs/design.md section 5): next-token cross-entropy with the hooked
activation replaced by each SAE's reconstruction, against the clean model and zero ablation.

frac_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean); kl is KL(clean || spliced) of the
next-token distributions, mean over tokens. The BOS position is left clean in every splice (the SAE
never saw it; see data/activations.py), so all three losses differ only where the SAE works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from mfr_sae.config import RunConfig
from mfr_sae.data.activations import read_manifest, read_texts, token_sequences
from mfr_sae.data.lm_model import capture, load_model, resolve_hook, splice
from mfr_sae.ensemble import Ensemble


def _logprobs(logits: Tensor) -> Tensor:
    """Log-probabilities of the next token at every position that has one."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def _ce_sum(logprobs: Tensor, ids: Tensor) -> float:
    """Summed next-token cross-entropy."""
    return -logprobs.gather(-1, ids[:, 1:, None]).sum().item()


def _keep_bos(rest: Tensor) -> Callable[[Tensor], Tensor]:
    """A splice that keeps the module's BOS position and puts `rest` after it."""
    return lambda out: torch.cat([out[:, :1], rest.to(out.dtype)], dim=1)


@torch.no_grad()
def loss_recovered(
    model: nn.Module,
    module: nn.Module,
    ensemble: Ensemble,
    sequences: Tensor,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Clean, zero-ablated and per-member spliced next-token losses on token sequences [S, L]."""
    device = next(model.parameters()).device
    n = ensemble.n_members
    ce_clean = ce_zero = 0.0
    ce_sae, kl_sae = [0.0] * n, [0.0] * n
    tokens = 0
    for ids in tqdm(torch.split(sequences, batch_size), desc="loss recovered", disable=not progress):
        ids = ids.to(device)
        clean = _logprobs(model(input_ids=ids).logits)
        ce_clean += _ce_sum(clean, ids)
        tokens += ids[:, 1:].numel()
        acts = capture(model, module, ids)
        b, length, d = acts.shape
        recon = ensemble(acts[:, 1:].reshape(-1, d).float()).x_hat.view(n, b, length - 1, d)
        with splice(module, _keep_bos(torch.zeros_like(acts[:, 1:]))):
            ce_zero += _ce_sum(_logprobs(model(input_ids=ids).logits), ids)
        for i in range(n):
            with splice(module, _keep_bos(recon[i])):
                spliced = _logprobs(model(input_ids=ids).logits)
            ce_sae[i] += _ce_sum(spliced, ids)
            kl_sae[i] += F.kl_div(spliced, clean, log_target=True, reduction="sum").item()
    ce_clean, ce_zero = ce_clean / tokens, ce_zero / tokens
    gap = ce_zero - ce_clean
    members = [
        {
            "ce_sae": ce_sae[i] / tokens,
            "frac_recovered": (ce_zero - ce_sae[i] / tokens) / gap if gap else math.nan,
            "kl": kl_sae[i] / tokens,
        }
        for i in range(n)
    ]
    return {"ce_clean": ce_clean, "ce_zero": ce_zero, "tokens": tokens, "members": members}


def heldout_sequences(manifest: dict[str, Any], n_sequences: int, tokenizer: Any) -> Tensor:
    """n sequences of the cache's text that come after those the cache was built from."""
    context = manifest["context"]
    used = math.ceil(manifest["n_tokens"] / (context - 1))
    sequences = []
    for i, seq in enumerate(token_sequences(read_texts(manifest["text"]), tokenizer, context)):
        if i >= used:
            sequences.append(seq)
            if len(sequences) == n_sequences:
                break
    if not sequences:
        return torch.empty(0, context, dtype=torch.long)
    return torch.stack(sequences)


def evaluate_on_lm(
    cache: str | Path,
    ensemble: Ensemble,
    n_sequences: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any] | None:
    """Loss recovered for a run trained on an activation cache, on held-out text of the same source."""
    manifest = read_manifest(cache, verify=False)
    model, tokenizer = load_model(manifest["model"], device)
    _, module = resolve_hook(model, manifest["hook"])
    sequences = heldout_sequences(manifest, n_sequences, tokenizer)
    if len(sequences) == 0:
        return None
    result = loss_recovered(model, module, ensemble.to(device), sequences, batch_size, progress)
    result["sequences"] = len(sequences)
    return result


def add_loss_recovered(
    cfg: RunConfig, ensemble: Ensemble, members: list[dict[str, Any]], device: torch.device, progress: bool = True
) -> dict[str, Any] | None:
    """On an activation cache (`cfg.data`): CE clean / zero-ablated / spliced of every member, added to its
    entry of `members`; the summary, or None when the run's data is not a cache or eval.lm_sequences is 0."""
    if cfg.data.kind != "activations" or not cfg.eval.lm_sequences:
        return None
    result = evaluate_on_lm(cfg.data.path, ensemble, cfg.eval.lm_sequences, cfg.eval.lm_batch_size, device, progress)
    if result is None:
        return {"skipped": "the cache's text has no sequences left after those cached"}
    for member, scores in zip(members, result.pop("members")):
        member.update(ce_clean=result["ce_clean"], ce_zero=result["ce_zero"], **scores)
    return result
