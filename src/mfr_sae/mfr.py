"""Mutual Feature Regularization (SPEC section 4): the auxiliary penalty and reinitialisation.

Penalty: P = beta * w(t) * mean over member pairs (a, b) of (1 - MMCS(a, b)), where MMCS(a, b) is
(mean_i max_j cos(A_i, B_j) + mean_j max_i cos(A_i, B_j)) / 2 (`max`), or the mean cosine of a
one-to-one Hungarian matching (`hungarian`). The gradient of a max flows only through its arg-max, so
the arg-max indices ("matches") are recomputed every `match_every` steps, in chunks and without
autograd, and the penalty is the mean cosine of the matched rows: exact at a re-matching step and
cheap (O(h d) per pair) in between. `match_every=0` is the naive dense penalty (full h x h similarity
with autograd every step), kept as the reference.

Reinitialisation: M = mean_j (|p_j - t| / t)^3 with p_j the firing probability of latent j over the
last `reinit_samples` training vectors and t = k / h of that member. During a member's first
`reinit_window` steps after its (re)initialisation, M > `reinit_threshold` re-initialises it (fresh,
seeded weights; its AdamW moments zeroed), at most `reinit_max` times. A reinitialisation makes the next
penalty re-match all pairs, whatever `match_every`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.config import ConfigError, MFRConfig, beta_parts
from mfr_sae.distributed import Shard
from mfr_sae.kernels import inverse_norms, unit_rows
from mfr_sae.metrics import CHUNK_ROWS, hungarian_match


def warmup_weight(step: int, warmup_steps: int) -> float:
    """Cosine ramp from 0 to 1: 0.5 * (1 - cos(pi * t / W)) for t < W, then 1."""
    if step >= warmup_steps:
        return 1.0
    return 0.5 * (1 - math.cos(math.pi * step / warmup_steps))


def member_pairs(n_members: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(n_members) for b in range(a + 1, n_members)]


NO_MATCH = -1  # a row whose match falls below mfr.min_cosine: not linked


@torch.no_grad()
def match_pair(a: Tensor, b: Tensor, mode: str = "max", chunk: int = CHUNK_ROWS, min_cosine: float = -1.0) -> Tensor:
    """Matches between unit-norm rows of a and b: [2, h] long, row 0 gives for each row of a its
    partner in b, row 1 for each row of b its partner in a. `max`: the arg-max cosine (both
    directions from one chunked pass); `hungarian`: a one-to-one assignment and its inverse. A match
    whose cosine is below min_cosine is NO_MATCH (the thresholded form)."""
    if mode == "hungarian":
        rows, cols, _ = hungarian_match(a, b)
        a_to_b = torch.as_tensor(cols[rows.argsort()], device=a.device)
        matches = torch.stack([a_to_b, torch.argsort(a_to_b)])
    else:
        matches = _max_matches(a, b, chunk)
    if min_cosine > -1:
        cosines = torch.stack([torch.linalg.vecdot(a, b[matches[0]]), torch.linalg.vecdot(b, a[matches[1]])])
        matches = matches.masked_fill(cosines < min_cosine, NO_MATCH)
    return matches


def _max_matches(a: Tensor, b: Tensor, chunk: int) -> Tensor:
    """The arg-max matches of match_pair, both directions from one chunked pass over a @ b.T."""
    best_for_b = torch.full((len(b),), -torch.inf, device=a.device, dtype=a.dtype)
    arg_for_b = torch.zeros(len(b), dtype=torch.long, device=a.device)
    arg_for_a = []
    for start in range(0, len(a), chunk):
        sims = a[start:start + chunk] @ b.T
        arg_for_a.append(sims.argmax(dim=1))
        value, where = sims.max(dim=0)
        better = value > best_for_b
        best_for_b = torch.where(better, value, best_for_b)
        arg_for_b = torch.where(better, where + start, arg_for_b)
    return torch.stack([torch.cat(arg_for_a), arg_for_b])


def match_all(decoder: Tensor, mode: str = "max", chunk: int = CHUNK_ROWS, min_cosine: float = -1.0) -> Tensor:
    """Matches of every member pair, in `member_pairs` order: [P, 2, h]."""
    pairs = member_pairs(len(decoder))
    if not pairs:
        return torch.empty(0, 2, decoder.shape[1], dtype=torch.long, device=decoder.device)
    return torch.stack([match_pair(decoder[a], decoder[b], mode, chunk, min_cosine) for a, b in pairs])


def changed_fraction(old: dict[tuple[int, int], Tensor], new: dict[tuple[int, int], Tensor]) -> float | None:
    """Share of matches that differ between two matchings of the same pairs: how stale the old ones had
    become (None when no pair is in both)."""
    common = [pair for pair in new if pair in old]
    if not common:
        return None
    changed = sum((old[pair].to(new[pair].device) != new[pair]).sum().item() for pair in common)
    return changed / sum(new[pair].numel() for pair in common)


@dataclass
class Links:
    """The matches of all pairs as one symmetric sparse matrix L over the N * h decoder rows, in CSR
    form (row offsets, column indices, values), scaled so that sum(D * (L @ D)) is the mean over pairs
    of MMCS (D: the flattened unit-norm decoder)."""

    offsets: Tensor
    columns: Tensor
    values: Tensor

    def times(self, flat: Tensor, scale: Tensor) -> Tensor:
        """L @ (rows of `flat` [N * h, d] times `scale` [N * h]), as a weighted sum of rows per output row
        (embedding_bag: fast on CPU and CUDA)."""
        return F.embedding_bag(self.columns, flat, offsets=self.offsets,
                               per_sample_weights=self.values.to(flat.dtype) * scale[self.columns], mode="sum")



def pair_links(matches: dict[tuple[int, int], Tensor], rows: range, columns: range, d_sae: int, n_pairs: int,
               device: torch.device) -> Links:
    """The block of L between the decoder rows of the members `rows` and those of the members `columns`
    (each numbered from the block's first row), from the matches ([2, h]) of the member pairs (a, b) that
    join them (other pairs are ignored). L is scaled for the mean over all n_pairs pairs."""
    sources, targets = [], []
    arange = torch.arange(d_sae, device=device)
    for (a, b), (a_to_b, b_to_a) in matches.items():
        for x, y, x_to_y, y_to_x in [(a, b, a_to_b, b_to_a), (b, a, b_to_a, a_to_b)]:
            if x in rows and y in columns:  # row i of x links to row x_to_y[i] of y; row y_to_x[j] of x to row j
                x0, y0 = (x - rows.start) * d_sae, (y - columns.start) * d_sae
                forward, backward = x_to_y != NO_MATCH, y_to_x != NO_MATCH  # (thresholded form)
                sources += [arange[forward] + x0, y_to_x[backward] + x0]
                targets += [x_to_y[forward] + y0, arange[backward] + y0]
    size = (len(rows) * d_sae, len(columns) * d_sae)
    if not sum(map(len, sources)):
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Links(torch.zeros(size[0], dtype=torch.long, device=device), empty, empty.float())
    # each directed match carries 1 / (2 h P); half of it on (i, j), half on (j, i)
    weight = 1.0 / (4 * d_sae * n_pairs)
    coo = torch.sparse_coo_tensor(torch.stack([torch.cat(sources), torch.cat(targets)]),
                                  torch.full((sum(map(len, sources)),), weight, device=device),
                                  size, check_invariants=False).coalesce()
    row, col = coo.indices()
    counts = torch.bincount(row, minlength=size[0])
    return Links(torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]]), col, coo.values())


class _LinkedSimilarity(torch.autograd.Function):
    """Per member of the rows W given, sum over its rows r of d_r . (L @ D)_r, with D = W's rows scaled to
    unit norm (no normalised copy) and (L @ D) for these rows given (`product`, a constant: L's columns
    read the rows of all members, on every rank). The gradient reaching row r is that of the whole sum
    over all rows of all members, which for a symmetric L is 2 (L @ D)_r projected off w_r and divided
    by ||w_r||: it reuses the product."""

    @staticmethod
    def forward(ctx, weight: Tensor, product: Tensor) -> Tensor:
        flat = weight.reshape(-1, weight.shape[-1])
        inv_norm = inverse_norms(flat)
        along = torch.linalg.vecdot(flat, product)  # w_r . (L @ D)_r
        ctx.save_for_backward(flat, product, inv_norm, along)
        ctx.shape = weight.shape
        return (along * inv_norm).view(weight.shape[:2]).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, product, inv_norm, along = ctx.saved_tensors
        out = product.addcmul(flat, (along * inv_norm.square()).unsqueeze(1), value=-1)
        per_row = grad.repeat_interleave(ctx.shape[1])  # each row takes its member's incoming gradient
        return out.mul_((2 * per_row * inv_norm).unsqueeze(1)).view(ctx.shape), None


def linked_similarity(weight: Tensor, product: Tensor) -> Tensor:
    """Each given member's part of sum(D * (L @ D)): [n]; weight [n, h, d]: decoder rows of any norm (one
    rank's members), product [n * h, d]: L @ D for those rows (`Links.times` of the unit rows of all
    members). Differentiable as parts of that one sum: the gradient a row receives is that of the whole
    sum (so sum the parts of all members, with one weight)."""
    return _LinkedSimilarity.apply(weight, product)


def matched_mmcs(weight: Tensor, matches: Tensor) -> Tensor:
    """Mean over member pairs of MMCS from fixed matches ([P, 2, h], `match_all`), differentiable; weight
    [N, h, d]: decoder rows of any norm (the cosines are taken of their directions). O(P h d)."""
    n, h, d = weight.shape
    links = pair_links(dict(zip(member_pairs(n), matches)), range(n), range(n), h, len(matches), weight.device)
    columns = weight.detach().reshape(-1, d)
    return linked_similarity(weight, links.times(columns, inverse_norms(columns))).sum()


def dense_mmcs(decoder: Tensor, min_cosine: float = -1.0) -> Tensor:
    """The naive `max` MMCS of every member pair, full similarity matrices with autograd: [P]. Thresholded
    form: a max cosine below min_cosine counts 0."""
    def kept_mean(best: Tensor) -> Tensor:
        return best.masked_fill(best < min_cosine, 0).mean() if min_cosine > -1 else best.mean()

    values = []
    for a, b in member_pairs(len(decoder)):
        sims = decoder[a] @ decoder[b].T
        values.append((kept_mean(sims.max(dim=1).values) + kept_mean(sims.max(dim=0).values)) / 2)
    return torch.stack(values)


def reinit_metric(firing_prob: Tensor, ks: list[int]) -> Tensor:
    """M = mean_j (|p_j - t| / t)^3 per member, t = k / h: [N]."""
    target = torch.tensor(ks, dtype=firing_prob.dtype, device=firing_prob.device).view(-1, 1)
    target = target / firing_prob.shape[1]
    return ((firing_prob - target).abs() / target).pow(3).mean(dim=1)


class MutualRegularizer:
    """The MFR state of one run: beta, matches, firing history, reinitialisation record. Across processes
    (`Shard`) each rank keeps the firing history of its own members and computes its own members' part of
    the penalty; beta, matches and the reinitialisation record are the same on every rank."""

    def __init__(self, cfg: MFRConfig, ks: list[int], shard: Shard | None = None,
                 column_dtype: torch.dtype | None = None):
        """With cfg.enabled false (the baseline) it only measures: the reinitialisation metric is
        logged during the window, nothing is penalised or re-initialised. column_dtype: the dtype the
        decoders of all members are matched and linked in (bf16 under autocast: half the bytes between
        ranks); None keeps the weights' dtype."""
        if cfg.enabled and len(ks) < 2:
            raise ConfigError("mfr.enabled needs sae.n_members >= 2 (the penalty compares members)")
        self.cfg, self.ks, self.enabled, self.column_dtype = cfg, list(ks), cfg.enabled, column_dtype
        self.shard = shard or Shard(len(ks))
        factor, relative = beta_parts(cfg.beta) or (1.0, True)
        # beta: None until auto sets it at the first step (beta_factor times the auto value)
        self.beta_factor = factor if relative else None
        self.beta: float | None = factor if cfg.enabled and not relative else None
        self.matches: dict[tuple[int, int], Tensor] = {}  # [2, h] for each pair of members, this rank's own
        self.links: dict[int, Links] = {}  # L's block (own members, shard from member m) by m, till re-matching
        self.incoming: Iterator[tuple[range, Tensor]] | None = None  # the decoders of all shards, streaming in
        self._outbox: dict[int, Tensor] = {}  # matches to send at a later stage of the stream, by stage
        self.stale_frac: float | None = None  # share of matches changed at the last re-matching (match_every > 1)
        self.steps_since_init = [0] * len(ks)
        self.attempts = [0] * len(ks)
        self.events: list[dict[str, Any]] = []
        self.history: deque[tuple[int, Tensor]] = deque()  # (batch size, own members' firing counts [n, h])

    @property
    def penalty_on(self) -> bool:
        if self.beta is None:  # auto, set at the first step
            return self.enabled and self.beta_factor != 0
        return self.enabled and self.beta > 0

    # ------------------------------------------------------------------ penalty

    def prefetch(self, weight: Tensor) -> None:
        """Start streaming the decoders of all members for the next `penalty`, so that the first transfer
        overlaps the reconstruction's forward pass (the weights do not change in between)."""
        if self.cfg.match_every and self.penalty_on:
            self.incoming = self.shard.start_stream(weight.detach().to(self.column_dtype or weight.dtype))

    def penalty(self, weight: Tensor, step: int, recon_loss: Callable[[], float]) -> tuple[Tensor, dict[str, float]]:
        """beta * w(step) * mean over pairs (1 - MMCS); weight [n, h, d]: this rank's members' decoder rows
        (any norm; all N in one process), the gradient reaching them being that of the whole penalty.
        recon_loss: the mean reconstruction loss of all members (asked for once, by beta=auto)."""
        shard = self.shard
        values: dict[str, float] = {}
        if self.cfg.match_every == 0:  # the dense reference: every rank evaluates all of it
            mmcs = dense_mmcs(unit_rows(shard.gather_differentiable(weight)), self.cfg.min_cosine).mean()
        else:
            if self.incoming is None:
                self.prefetch(weight)
            stream, self.incoming = self.incoming, None
            rematch = not self.matches or step % self.cfg.match_every == 0
            previous = self.matches
            own = linked_similarity(weight, self._linked_product(weight, stream, rematch))  # [n]
            mmcs = shard.gather_differentiable(own).sum()  # summed in member order, whatever the shards
            stale = changed_fraction(previous, self.matches) if rematch and self.cfg.match_every > 1 else None
            if stale is not None:  # how far matches drift in match_every steps (this rank's pairs)
                values["match_stale_frac"] = self.stale_frac = stale
        distance = 1 - mmcs
        if self.beta is None:  # auto: the penalty equals the reconstruction loss at the start
            if distance.item() <= 1e-8:
                raise ConfigError("mfr.beta=auto: the members start identical (pairwise MMCS = 1), "
                                  "so no beta makes the penalty equal the loss; set mfr.beta to a number")
            self.beta = self.beta_factor * recon_loss() / distance.item()
        weight = self.beta * warmup_weight(step, self.cfg.warmup_steps)
        penalty = weight * distance
        values.update(penalty=penalty.item(), penalty_weight=weight, pairwise_mmcs=mmcs.item())
        return penalty, values

    @torch.no_grad()
    def _linked_product(self, weight: Tensor, stream: Iterator[tuple[range, Tensor]], rematch: bool) -> Tensor:
        """L @ D for this rank's rows [n * h, d] (D: the unit decoder rows of all members), accumulated shard
        by shard as the decoders stream in (`Shard.start_stream`), so that a rank holds its own members and
        two other shards (the one in use, the next on its way), never all N; at a re-matching step the pairs
        are matched on the way."""
        h, d = weight.shape[1:]
        own = range(self.shard.start, self.shard.stop)
        if rematch:
            self.matches, self.links, self._outbox = {}, {}, {}
        n_pairs = len(self.ks) * (len(self.ks) - 1) // 2
        product, own_unit = None, None
        for stage in range(self.shard.n_shards):
            members, rows = next(stream)
            flat = rows.to(weight.dtype).reshape(-1, d)
            del rows  # (the stream keeps it while passing it on)
            if rematch:
                unit = F.normalize(flat, dim=-1).view(len(members), h, d)
                own_unit = unit if stage == 0 else own_unit
                self._match_shard(stage, own_unit, unit, members)
                del unit  # (own_unit keeps this rank's own)
            if members.start not in self.links:
                self.links[members.start] = pair_links(self.matches, own, members, h, n_pairs, weight.device)
            part = self.links[members.start].times(flat, inverse_norms(flat))
            product = part if product is None else product.add_(part)
            del flat, part  # a shard's copies go before the next shard is taken
        return product

    def _pairs_besides_split(self, position: int) -> int:
        """How many pairs the rank at `position` matches besides its share of the block it splits (an even
        number of shards): its own members' pairs and those of the blocks it sees first."""
        n, shard = len(self.shard.shard_members(position)), self.shard
        return n * (n - 1) // 2 + sum(n * len(shard.shard_members(position - s)) for s in range(1, shard.n_shards // 2))

    def _match_shard(self, stage: int, own_unit: Tensor, unit: Tensor, members: range) -> None:
        """Match the pairs between this rank's members and the shard of this stage (`members`, unit rows
        `unit`) that fall to this rank, and exchange matches with the others: of the two ranks whose
        shards a pair joins, the one that sees the other's shard first in the ring matches it (both at once:
        split to even out the ranks' matching), and sends the matches at the stage at which the other sees
        its shard."""
        shard, h = self.shard, unit.shape[1]
        own = range(shard.start, shard.stop)
        pairs = [(a, b) for a, b in member_pairs(len(self.ks))
                 if (a in own and b in members) or (a in members and b in own)]
        later = shard.n_shards - stage  # the stage at which the other rank sees this rank's shard
        if stage == 0 or stage < later:
            mine = pairs
        elif stage == later:  # both see each other now: split so that both match as many pairs in all
            lower, upper = sorted((shard.position, (shard.position - stage) % shard.n_shards))
            first = (len(pairs) + self._pairs_besides_split(upper) - self._pairs_besides_split(lower)) // 2
            first = min(max(first, 0), len(pairs))  # the lower position's share
            mine = pairs[:first] if shard.position == lower else pairs[first:]
        else:
            mine = []
        rows_of = {m: own_unit[m - own.start] for m in own} | {m: unit[m - members.start] for m in members}
        for a, b in mine:
            self.matches[(a, b)] = match_pair(rows_of[a], rows_of[b], self.cfg.mmcs, min_cosine=self.cfg.min_cosine)
        if stage and mine:
            self._outbox[later] = torch.stack([self.matches[pair] for pair in mine]).int()  # int32: half the bytes
        if stage == 0 or stage < later:
            return
        theirs = [pair for pair in pairs if pair not in mine]
        incoming = unit.new_empty(len(theirs), 2, h, dtype=torch.int32) if theirs else None
        outgoing = self._outbox.pop(stage, None)  # for the shard `stage` places ahead, matched earlier
        shard.wait(shard.exchange(outgoing, shard.position + stage, incoming, shard.position - stage))
        if incoming is not None:
            self.matches.update(zip(theirs, incoming.long()))

    # ------------------------------------------------------------------ reinitialisation

    def reinit_check(self, step: int, counts: Tensor, batch_size: int) -> tuple[list[int], Tensor | None]:
        """Record this step's firing counts of this rank's members [n, h]; return the members (global
        indices) to re-initialise now and, while any member is inside its window, the metric M of this
        rank's members [n] (None once all are past it)."""
        cfg, shard = self.cfg, self.shard
        for n in range(len(self.ks)):
            self.steps_since_init[n] += 1
        # once every member is past its window nothing can happen again (only a reinit restarts one)
        inside = [n for n in range(len(self.ks)) if self.steps_since_init[n] <= cfg.reinit_window]
        if not inside:
            return [], None
        self.history.append((batch_size, counts))
        while sum(b for b, _ in self.history) - self.history[0][0] >= cfg.reinit_samples:
            self.history.popleft()
        window = sum(b for b, _ in self.history)
        if window < cfg.reinit_samples:
            return [], None
        own = reinit_metric(sum(c for _, c in self.history) / window, self.ks[shard.start:shard.stop])
        if not self.enabled:  # the baseline only logs it: no communication
            return [], own
        metric = shard.gather(own)  # every rank takes the same decisions
        chosen = []
        for n in inside:
            if metric[n] > cfg.reinit_threshold and self.attempts[n] < cfg.reinit_max:
                self.attempts[n] += 1
                self.steps_since_init[n] = 0
                self.events.append({"step": step, "member": n, "metric": metric[n].item(),
                                    "attempt": self.attempts[n]})
                chosen.append(n)
        if chosen:  # a re-initialised member needs a fresh window: start the (shared) history again
            self.history.clear()
            # and fresh partners: matches of its old weights would pull it until the next re-matching, so
            # the next penalty re-matches (every rank takes this decision: all re-match together)
            self.matches, self.links = {}, {}
        return chosen, own

    # ------------------------------------------------------------------ checkpointing

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """All members' state, whole on rank 0 (a collective across processes: every rank calls it)."""
        tensors = {}
        if self.matches:  # each rank knows the pairs of its own members: together, all pairs
            known = {}
            for part in self.shard.gather_objects({pair: m.cpu() for pair, m in self.matches.items()}):
                known.update(part)
            tensors["mfr.matches"] = torch.stack([known[pair] for pair in member_pairs(len(self.ks))])
        for i, (batch, counts) in enumerate(self.history):
            tensors[f"mfr.history.{i}"] = self.shard.gather_to_main(counts)
        meta = {"beta": self.beta, "steps_since_init": self.steps_since_init, "attempts": self.attempts,
                "events": self.events, "history_batches": [b for b, _ in self.history]}
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """From `state()` of a run on any number of processes, its firing history cut to this rank's members
        (mfr.history.*; mfr.matches whole)."""
        self.beta = meta["beta"]
        self.steps_since_init, self.attempts = meta["steps_since_init"], meta["attempts"]
        self.events = meta["events"]
        matches, own = tensors.get("mfr.matches"), range(self.shard.start, self.shard.stop)
        self.matches = {} if matches is None else {pair: m for pair, m in zip(member_pairs(len(self.ks)), matches)
                                                   if pair[0] in own or pair[1] in own}
        self.links = {}
        self.history = deque((b, tensors[f"mfr.history.{i}"])
                             for i, b in enumerate(meta["history_batches"]))


@torch.no_grad()
def pairwise_mmcs(decoder: Tensor) -> dict[str, float | None]:
    """Mean over member pairs of MMCS, `max` and `hungarian` variants (None for a single member)."""
    if len(decoder) < 2:
        return {"pairwise_mmcs": None, "pairwise_mmcs_hungarian": None}
    return {f"pairwise_mmcs{suffix}": matched_mmcs(decoder, match_all(decoder, mode)).item()
            for suffix, mode in [("", "max"), ("_hungarian", "hungarian")]}
