"""The mean cosine of matched rows, differentiable and cheap (O(h d) per pair). All pairs' matches (matching.py)
form one symmetric sparse matrix L over the N * h decoder rows (`Links`, `links_between`), scaled so that
sum(D * (L @ D)) is the mean over pairs of MMCS (D: the unit decoder rows); `linked_similarity` and
`pulled_similarity` take it with autograd functions whose backward reuses the product L @ D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.matching import NO_MATCH, Pair
from mfr_sae.row_norms import inverse_norms


@dataclass
class Links:
    """A block of L, between the decoder rows of some members (L's rows) and those of some members (L's
    columns), in CSR form: where each row's links start, the column each link reaches, and its weight."""

    offsets: Tensor
    targets: Tensor
    weights: Tensor

    def matmul_unit(self, columns: Tensor) -> Tensor:
        """L @ D, D: the column members' decoder rows `columns` [n * h, d] scaled to unit norm (the scale goes
        into the link weights: no normalised copy), as a weighted sum of rows per output row (embedding_bag)."""
        # the norms of all columns in one pass, or of the linked ones only where they are a few (`rows`): a
        # gathered row costs about what norms of four rows in place cost (a copy written, then read)
        few = 4 * len(self.targets) < len(columns)
        target_scale = inverse_norms(columns[self.targets]) if few else inverse_norms(columns)[self.targets]
        return F.embedding_bag(
            self.targets,
            columns,
            offsets=self.offsets,
            per_sample_weights=self.weights.to(columns.dtype) * target_scale,
            mode="sum",
        )

    def rows(self, selected: Tensor) -> Links:
        """The block of these rows of L (indices, ascending), in their order: its product is those rows of L @ D."""
        ends = torch.cat([self.offsets[1:], self.offsets.new_full((1,), len(self.targets))])
        starts = self.offsets[selected]
        counts = ends[selected] - starts
        offsets = counts.cumsum(0) - counts
        links = torch.repeat_interleave(starts - offsets, counts) + torch.arange(
            int(counts.sum()), device=starts.device
        )
        return Links(offsets, self.targets[links], self.weights[links])


def links_between(
    matches: dict[Pair, Tensor],
    row_members: range,
    column_members: range,
    d_sae: int,
    n_pairs: int,
    device: torch.device,
) -> Links:
    """The block of L between the decoder rows of the members `row_members` and those of the members
    `column_members` (each numbered from the block's first row), from the matches ([2, h]) of the member
    pairs (a, b) that join them (other pairs are ignored). L is scaled for the mean over all n_pairs pairs."""
    link_rows, link_columns = [], []
    arange = torch.arange(d_sae, device=device)
    for (a, b), (a_to_b, b_to_a) in matches.items():
        for row_member, column_member, forward, backward in [(a, b, a_to_b, b_to_a), (b, a, b_to_a, a_to_b)]:
            if row_member in row_members and column_member in column_members:
                # row i of the row member links to row forward[i] of the column member; row backward[j] to row j
                row_start = (row_member - row_members.start) * d_sae
                column_start = (column_member - column_members.start) * d_sae
                linked, linked_back = forward != NO_MATCH, backward != NO_MATCH
                link_rows += [arange[linked] + row_start, backward[linked_back] + row_start]
                link_columns += [forward[linked] + column_start, arange[linked_back] + column_start]
    size = (len(row_members) * d_sae, len(column_members) * d_sae)
    n_links = sum(map(len, link_rows))
    if not n_links:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Links(torch.zeros(size[0], dtype=torch.long, device=device), empty, empty.float())
    # each directed match carries 1 / (2 h P); half of it on (i, j), half on (j, i): L is symmetric
    link_weight = 1.0 / (4 * d_sae * n_pairs)
    coo = torch.sparse_coo_tensor(
        torch.stack([torch.cat(link_rows), torch.cat(link_columns)]),
        torch.full((n_links,), link_weight, device=device),
        size,
        check_invariants=False,
    ).coalesce()  # sorted by row, duplicates summed
    rows, targets = coo.indices()
    counts = torch.bincount(rows, minlength=size[0])
    return Links(torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]]), targets, coo.values())


class _LinkedSimilarity(torch.autograd.Function):
    """Per member of the rows W given, sum over its rows r of d_r . (L @ D)_r, with D = W's rows scaled to
    unit norm (no normalised copy) and (L @ D) for these rows given (`product`, a constant: L's columns
    read the rows of all members, on every rank). The gradient reaching row r is that of the whole sum
    over all rows of all members, which for a symmetric L is 2 (L @ D)_r projected off w_r and divided
    by ||w_r||: it reuses the product."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, product: Tensor) -> Tensor:
        rows = weight.reshape(-1, weight.shape[-1])
        inv_norm = inverse_norms(rows)
        dots = torch.linalg.vecdot(rows, product)  # w_r . (L @ D)_r
        ctx.save_for_backward(rows, product, inv_norm, dots)
        ctx.shape = weight.shape
        summed: Tensor = (dots * inv_norm).view(weight.shape[:2]).sum(1)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        rows, product, inv_norm, dots = ctx.saved_tensors
        grad_rows = product.addcmul(rows, (dots * inv_norm.square()).unsqueeze(1), value=-1)
        grad_per_row = grad.repeat_interleave(ctx.shape[1])  # each row takes its member's incoming gradient
        grad_weight: Tensor = grad_rows.mul_((2 * grad_per_row * inv_norm).unsqueeze(1)).view(ctx.shape)
        return grad_weight, None


_linked_similarity: Callable[[Tensor, Tensor], Tensor] = _LinkedSimilarity.apply  # typed: torch's `apply` is not


class _PulledSimilarity(torch.autograd.Function):
    """`_LinkedSimilarity` of some rows of all members' rows W [N, h, d] (flat indices into its N * h rows,
    ascending), summed; the gradient reaching them (the same) is returned sparse, to be added in place into
    the dense gradient of the reconstruction: no dense [N, h, d] buffer for a few rows, and no sum of two."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, rows: Tensor, product: Tensor) -> Tensor:
        picked = weight.detach().flatten(0, 1)[rows]
        summed = _LinkedSimilarity.forward(ctx, picked.unsqueeze(0), product)
        ctx.rows, ctx.whole_shape = rows, weight.shape
        return summed.sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad_rows = _LinkedSimilarity.backward(ctx, grad.reshape(1))[0].squeeze(0)
        n_latents = ctx.whole_shape[1]
        members_and_latents = torch.stack([ctx.rows // n_latents, ctx.rows % n_latents])
        sparse = torch.sparse_coo_tensor(
            members_and_latents, grad_rows, ctx.whole_shape, is_coalesced=True, check_invariants=False
        )
        return sparse, None, None


_pulled_similarity: Callable[[Tensor, Tensor, Tensor], Tensor] = _PulledSimilarity.apply


def linked_similarity(weight: Tensor, product: Tensor) -> Tensor:
    """Each given member's part of sum(D * (L @ D)): [n]; weight [n, h, d]: decoder rows of any norm (one
    rank's members), product [n * h, d]: L @ D for those rows (`Links.matmul_unit` of the rows of all
    members). Differentiable as parts of that one sum: the gradient a row receives is that of the whole
    sum (so sum the parts of all members, with one weight)."""
    return _linked_similarity(weight, product)


def pulled_similarity(weight: Tensor, rows: Tensor, product: Tensor) -> Tensor:
    """The part of sum(D * (L @ D)) of some rows (flat indices into weight [N, h, d]'s N * h rows, ascending):
    a scalar, whose gradient reaching those rows is that of the whole sum, given as a sparse tensor.
    product [rows, d]: L @ D for those rows."""
    return _pulled_similarity(weight, rows, product)
