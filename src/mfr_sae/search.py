"""The search for each row's best cosines in another member: for each row of a its k best cosines with rows of b
and for each row of b with a, from one chunked pass over a @ b.T (`top_both_ways`, `best_both_ways`); a running
top-k over a stream (`merged_top`); and near ties settled in float64 (`settle_near_ties`, `at_least`). Matching
(matching.py), the certified matching (certified.py), its screen (screen.py) and the latent browser use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mfr_sae.metrics import CHUNK_ROWS

# Cosines closer than this (to each other, or to min_cosine) are compared again in float64: fp32 rounding
# of a d = 768 dot product (~1e-6) then cannot decide a match, whichever way the product was blocked.
TIE_TOLERANCE = 1e-4


class Top(NamedTuple):
    """For each row, its k largest cosines (descending) and the rows they are with: [rows, k]."""

    values: Tensor
    indices: Tensor


Best = tuple[Tensor, Tensor, Top]  # for each row: its best cosine, its match (near ties settled), its top k


def best_both_ways(a: Tensor, b: Tensor, k: int = 2, chunk: int = CHUNK_ROWS) -> tuple[Best, Best]:
    """For each row of a its k best cosines with rows of b, and the same for each row of b with a, from one
    chunked pass over a @ b.T; each row's match is its best, near ties settled in float64 (`settle_near_ties`)."""
    a_top, b_top = top_both_ways(a, b, k, chunk)
    return (
        (a_top.values[:, 0], settle_near_ties(a, b, a_top), a_top),
        (b_top.values[:, 0], settle_near_ties(b, a, b_top), b_top),
    )


def top_both_ways(a: Tensor, b: Tensor, k: int, chunk: int = CHUNK_ROWS) -> tuple[Top, Top]:
    """The k largest entries of each row of a @ b.T and of each of its columns, from one chunked pass, in the
    product's dtype (bf16 rows give the screen of `mfr_sae.screen`). The columns' are taken by a top-k in the
    first chunk, then from each later chunk only where an entry beats the column's k-th so far: few entries,
    where a top-k down each chunk's columns cost about as much as its product."""
    a_parts = []
    b_top: Top | None = None
    for start in range(0, len(a), chunk):
        sims = a[start : start + chunk] @ b.T
        a_parts.append(sims.topk(k, dim=1))
        b_top = _columns_top(sims, k) if b_top is None else _merged_columns(b_top, sims, start)
    assert b_top is not None, "top_both_ways needs rows in a"
    a_top = Top(torch.cat([part.values for part in a_parts]), torch.cat([part.indices for part in a_parts]))
    return a_top, b_top


def _columns_top(sims: Tensor, k: int) -> Top:
    """Each column's k largest entries [columns, k] (-inf at row 0 past the rows there are)."""
    top = sims.T.contiguous().topk(min(k, len(sims)), dim=1)  # transposed: a top-k along rows is faster
    missing = k - top.values.shape[1]
    if not missing:
        return Top(top.values, top.indices)
    return Top(
        torch.cat([top.values, top.values.new_full((len(top.values), missing), -torch.inf)], dim=1),
        torch.cat([top.indices, top.indices.new_zeros(len(top.indices), missing)], dim=1),
    )


def _merged_columns(kept: Top, sims: Tensor, start: int) -> Top:
    """Each column's k largest of `kept` [columns, k] and of the chunk `sims` [rows, columns], whose rows are
    numbered from `start`; among equal values the one kept before (the lower row) stays first."""
    rows, columns = (sims > kept.values[:, -1]).nonzero(as_tuple=True)
    return merged_top(kept, columns, sims[rows, columns], rows + start)


def merged_top(kept: Top, owners: Tensor, values: Tensor, indices: Tensor) -> Top:
    """Each owner's k largest of its entries in `kept` [owners, k] and of the new entries (values and indices
    [m], each of the owner `owners` [m] names); among equal values the kept ones first, then the new in their
    order. A running top-k over a stream: pass only the entries above their owner's k-th kept, which are few."""
    if not len(owners):
        return kept
    n_owners, k = kept.values.shape
    device = values.device
    values = torch.cat([kept.values.flatten(), values.to(kept.values.dtype)])
    indices = torch.cat([kept.indices.flatten(), indices])
    owners = torch.cat([torch.arange(n_owners, device=device).repeat_interleave(k), owners])
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(owners[order], stable=True)]  # by owner, each one's entries in descending order
    counts = torch.bincount(owners, minlength=n_owners)
    firsts = counts.cumsum(0) - counts
    picked = order[(firsts.unsqueeze(1) + torch.arange(k, device=device)).flatten()]
    return Top(values[picked].view(n_owners, k), indices[picked].view(n_owners, k))


def settle_near_ties(rows: Tensor, columns: Tensor, top: Top) -> Tensor:
    """Each row's arg-max column (top [rows, m]: its m best cosines, descending, and their columns), with the
    rows whose two best are within TIE_TOLERANCE matched again in float64 (lowest index among equals). The
    float64 arg-max lies within the fp32 rounding of two dot products (2 d 2^-24) below the fp32 best, so
    where the m-th best is below that window it is one of the m; else every column is compared."""
    best = top.indices[:, 0]
    near = ((top.values[:, 0] - top.values[:, 1]) < TIE_TOLERANCE).nonzero().squeeze(1)
    if not len(near):
        return best
    best = best.clone()
    window = max(TIE_TOLERANCE, 2.02 * rows.shape[-1] * 2.0**-24)
    inside = top.values[near, -1] < top.values[near, 0] - window
    few, many = near[inside], near[~inside]
    if len(few):
        indices = top.indices[few]
        exact = torch.bmm(columns[indices].double(), rows[few].double().unsqueeze(2)).squeeze(2)
        tied = exact == exact.amax(dim=1, keepdim=True)
        best[few] = torch.where(tied, indices, len(columns)).amin(dim=1)
    if len(many):
        best[many] = (rows[many].double() @ columns.double().T).argmax(dim=1)
    return best


def at_least(cosine: Tensor, rows: Tensor, partners: Tensor, min_cosine: float) -> Tensor:
    """cosine >= min_cosine for each row and its partner, decided in float64 within TIE_TOLERANCE of it."""
    linked = cosine >= min_cosine
    near = ((cosine - min_cosine).abs() < TIE_TOLERANCE).nonzero().squeeze(1)
    if len(near):
        linked[near] = torch.linalg.vecdot(rows[near].double(), partners[near].double()) >= min_cosine
    return linked
