"""What `mfr-sae browse` shows of a run's latents, collected from its activation cache (browse_writer.py builds
the site from it).

One pass over the run's activation cache keeps, for each member and latent, its firing count, the sum and the
largest of its activations, a histogram of them (log-spaced bins) and its CONTEXTS largest, with the cache rows
they fire on: a running top-k merged batch by batch (`search.merged_top`), so that memory is N h CONTEXTS whatever
the cache's length, and each row's smallest kept activation per member (4 N bytes a row). Row r of a cache is
token r % (context - 1) + 1 of sequence r // (context - 1) (its manifest: model, text, context), so the token ids
are recomputed, not stored. The latent of each top context is shown on the tokens around it: a second pass reads
those rows and takes one dot product per (latent, token), kept where it reaches the row's smallest kept
activation (a latent is kept, by TopK as by a JumpReLU threshold, exactly when it does), not a whole encoder. Each
decoder row is read through the model's unembedding (the tokens it promotes and suppresses, after the final
norm's scale), and matched to its best cosine in each other member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mfr_sae.data import DataError
from mfr_sae.data.activations import ActivationCache, read_texts, token_sequences
from mfr_sae.ensemble import Ensemble
from mfr_sae.matching import member_pairs
from mfr_sae.search import Top, merged_top, top_both_ways

CONTEXTS = 20  # top activating contexts kept per latent
BEFORE, AFTER = 16, 4  # tokens shown before and after the one a context's activation fires on
HISTOGRAM_BINS, LOG10_LOW, LOG10_HIGH = 60, -3.0, 3.0  # bins of 0.1 decade over activations 1e-3 to 1e3
LOGIT_TOKENS = 10  # tokens promoted and suppressed listed per latent
ENCODE_ROWS = 4096  # rows encoded at once ([N, rows, h] pre-activations), and window slots taken at once
# a window's activation recomputed as one dot product may differ from the encoder's by rounding, which scales
# with the sum of its terms' magnitudes: within this share of that sum it counts as reaching its row's floor
FLOOR_TOLERANCE = 1e-5


@dataclass
class LatentStats:
    """Per member and latent ([N, h]), from one pass over a cache: firings, sum and largest activation, the
    histogram [N, h, HISTOGRAM_BINS], and the top activations with their cache rows (Top [N h, CONTEXTS]); per
    member and row, the smallest activation the row kept (`floor` [N, rows]; inf where it kept none)."""

    rows: int
    fired: Tensor
    total: Tensor
    largest: Tensor
    histogram: Tensor
    top: Top
    floor: Tensor


@torch.no_grad()
def collect(
    ensemble: Ensemble,
    cache: ActivationCache,
    n_rows: int,
    contexts: int = CONTEXTS,
    batch_rows: int = ENCODE_ROWS,
    progress: bool = True,
) -> LatentStats:
    """One pass over the first n_rows rows of the cache, in order."""
    n, h = len(ensemble.ks), ensemble.d_sae
    fired, total, largest = torch.zeros(n * h), torch.zeros(n * h), torch.zeros(n * h)
    histogram = torch.zeros(n * h * HISTOGRAM_BINS)
    top = Top(torch.full((n * h, contexts), -torch.inf), torch.zeros(n * h, contexts, dtype=torch.long))
    floor = torch.empty(n, n_rows)
    for start in tqdm(range(0, n_rows, batch_rows), desc="browse: latents", unit="batch", disable=not progress):
        x = cache.read_rows(start, min(start + batch_rows, n_rows))
        acts, idx = ensemble.encode(x)  # [N, B, k']
        member = torch.arange(n).view(n, 1, 1).expand_as(idx)
        on = acts > 0
        floor[:, start : start + len(x)] = torch.where(on, acts, torch.inf).amin(-1)
        owners, values = (member * h + idx)[on], acts[on].float()
        rows = (torch.arange(len(x)) + start).view(1, -1, 1).expand_as(idx)[on]
        fired.index_add_(0, owners, torch.ones_like(values))
        total.index_add_(0, owners, values)
        largest.scatter_reduce_(0, owners, values, "amax")
        bins = ((values.log10() - LOG10_LOW) * HISTOGRAM_BINS / (LOG10_HIGH - LOG10_LOW)).long()
        histogram.index_add_(0, owners * HISTOGRAM_BINS + bins.clamp(0, HISTOGRAM_BINS - 1), torch.ones_like(values))
        above = values > top.values[owners, -1]  # only these can enter their latent's top
        top = merged_top(top, owners[above], values[above], rows[above])
    shape = (n, h)
    return LatentStats(
        n_rows,
        fired.view(shape),
        total.view(shape),
        largest.view(shape),
        histogram.view(n, h, HISTOGRAM_BINS),
        top,
        floor,
    )


def token_position(row: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """The (sequence, position) of cache rows: the cache drops each sequence's BOS, keeping context - 1 rows."""
    return row // (context - 1), row % (context - 1) + 1


def sequences_of(manifest: dict[str, Any], tokenizer: Any, count: int) -> np.ndarray:
    """The token ids [count, context] of the cache's first `count` sequences, tokenised again as the cache was."""
    ids = np.zeros((count, manifest["context"]), dtype=np.int64)
    made = 0
    for made, sequence in zip(
        range(1, count + 1), token_sequences(read_texts(manifest["text"]), tokenizer, manifest["context"])
    ):
        ids[made - 1] = sequence.numpy()
    if made < count:
        raise DataError(f"{manifest['text']}: holds fewer sequences than the cache it made (has the text changed?)")
    return ids


@torch.no_grad()
def window_activations(
    ensemble: Ensemble, cache: ActivationCache, stats: LatentStats, context: int, chunk_rows: int = 65536
) -> Tensor:
    """Each top context's latent on each token of its window, [N h, CONTEXTS, BEFORE + 1 + AFTER] (0 outside its
    sequence and for empty contexts): a pass over the cache reading in order, one dot product per window slot."""
    top, n_rows, h = stats.top, stats.rows, ensemble.d_sae
    _, position = token_position(top.indices, context)
    offsets = torch.arange(-BEFORE, AFTER + 1)
    window, shown = top.indices.unsqueeze(-1) + offsets, position.unsqueeze(-1) + offsets
    inside = (shown >= 1) & (shown <= context - 1) & (window < n_rows) & (top.values > 0).unsqueeze(-1)
    owner = torch.arange(len(window)).view(-1, 1, 1).expand_as(window)[inside]
    slot_rows = window[inside]
    order = torch.argsort(slot_rows)  # the slots in cache order
    slot_rows, owner = slot_rows[order], owner[order]
    values = torch.zeros(len(slot_rows))
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        lo, hi = (int(i) for i in torch.searchsorted(slot_rows, torch.tensor([start, stop])))
        if lo == hi:
            continue
        x = cache.read_rows(start, stop)
        for first in range(lo, hi, ENCODE_ROWS):
            last = min(first + ENCODE_ROWS, hi)
            rows, owners = slot_rows[first:last], owner[first:last]
            pre, magnitude = (t.float() for t in ensemble.pre_activations_at(x[rows - start], owners))
            # kept where it reaches its row's smallest kept activation, less what rounding could move it by
            kept = pre >= stats.floor[owners // h, rows] - FLOOR_TOLERANCE * magnitude
            values[first:last] = torch.where(kept & (pre > 0), pre, 0.0)
    result = torch.zeros(window.shape)
    result[inside] = torch.empty_like(values).scatter_(0, order, values)
    return result


@torch.no_grad()
def logit_effects(model: Any, decoder: Tensor, n_tokens: int = LOGIT_TOKENS) -> tuple[Top, Top]:
    """The tokens each decoder row [rows, d] promotes and suppresses most through the unembedding (after the final
    norm's scale where the model has one, as its last hidden state goes through it): (promoted, suppressed) Top
    [rows, n_tokens] of logit changes per unit of the latent (suppressed: most negative first)."""
    unembedding = model.get_output_embeddings().weight.detach().float()  # [vocab, d]
    base = getattr(model, "base_model", model)
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    scale = getattr(norm, "weight", None)
    rows = decoder.float() * (scale.detach().float() if scale is not None else 1.0)
    promoted, suppressed = [], []
    for start in range(0, len(rows), 1024):
        logits = rows[start : start + 1024] @ unembedding.T
        promoted.append(logits.topk(n_tokens, dim=1))
        suppressed.append((-logits).topk(n_tokens, dim=1))
    return tuple(  # type: ignore[return-value]
        Top(torch.cat([t.values for t in tops]) * sign, torch.cat([t.indices for t in tops]))
        for tops, sign in ((promoted, 1), (suppressed, -1))
    )


@torch.no_grad()
def best_matches(decoder: Tensor) -> tuple[Tensor, Tensor]:
    """Each latent's best cosine in each member and the latent it is with: [N, N, h] each (itself on the diagonal:
    cosine 1); decoder: unit rows [N, h, d]. Both directions of a pair from one product (`top_both_ways`)."""
    n, h, _ = decoder.shape
    cosine, match = torch.ones(n, n, h), torch.arange(h).repeat(n, n, 1)
    for a, b in member_pairs(n):
        a_top, b_top = top_both_ways(decoder[a].float(), decoder[b].float(), 1)
        cosine[a, b], match[a, b] = a_top.values[:, 0], a_top.indices[:, 0]
        cosine[b, a], match[b, a] = b_top.values[:, 0], b_top.indices[:, 0]
    return cosine, match


def agreement(cosine: Tensor) -> Tensor:
    """[N, h]: each latent's lowest best-match cosine over the other members (1 for a lone member)."""
    n = len(cosine)
    if n < 2:
        return torch.ones(cosine.shape[0], cosine.shape[2])
    others = ~torch.eye(n, dtype=torch.bool)
    return torch.stack([cosine[m][others[m]].min(dim=0).values for m in range(n)])
