"""The MFR penalty across processes: the decoders of all members go round the ring of member shards, and
the pairs of members are matched on the way.

Every rank needs L @ D for its own decoder rows (links.py), and L's columns read the rows of all members.
They come round the ring one shard at a time (`stream_shards`: at stage s, the shard s places before
this rank's); each rank adds that shard's columns to its product and lets them go, so that it holds its
own members and at most two other shards (the one in use, the next on its way), never all N.

At a re-matching step each pair is matched once, by one rank, as its shards pass: a pair within a shard
by that shard's rank; a pair across two shards by the rank that sees the other's shard first, which sends
the matches at the stage at which the other sees its shard. With an even number of shards, the two ranks
at opposite positions see each other at the same stage: they split the pairs they share so that both
match as many pairs in all. So each rank ends with the matches of all pairs of its own members.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from mfr_sae.distributed import Shard
from mfr_sae.links import Links, links_between
from mfr_sae.matching import Pair, member_pairs, n_member_pairs

if TYPE_CHECKING:
    from torch.distributed import Work

Stream = Iterator[tuple[range, Tensor]]  # (the members of a shard, their rows), one shard at a time
Match = Callable[[Pair, Tensor, Tensor], Tensor]  # a pair, its two members' unit rows -> their matches [2, h]


# ---------------------------------------------------------------------- the decoders round the ring


def stream_shards(shard: Shard, local: Tensor) -> Stream:
    """Every shard's `local` (this rank's own first, then at stage s the shard s places before it), one at
    a time around a ring: each rank passes on what it received, so each receives every other shard once
    (the bandwidth of an all-gather) but holds, beside its own, only the shard in use and the next one on
    its way. The first transfer starts now, so that it overlaps what this rank computes meanwhile."""
    local = local.contiguous()
    if shard.n_shards == 1:
        return iter([(shard.shard_members(0), local)])
    return _stream(shard, local, _pass_on(shard, local, 1))


def _stream(shard: Shard, local: Tensor, pending: tuple[Tensor, list[Work]] | None) -> Stream:
    yield shard.shard_members(shard.position), local
    for stage in range(1, shard.n_shards):
        assert pending is not None  # started by the caller (stage 1) or at the stage before
        (incoming, works), pending = pending, None
        shard.wait(works)  # this stage's shard in; the last one passed on, and freed with the works
        del works
        if stage + 1 < shard.n_shards:
            pending = _pass_on(shard, incoming, stage + 1)
        yield shard.shard_members(shard.position - stage), incoming


def _pass_on(shard: Shard, outgoing: Tensor, stage: int) -> tuple[Tensor, list[Work]]:
    """Start sending `outgoing` to the next rank of the ring and receiving the shard of stage `stage`
    from the previous one."""
    incoming = outgoing.new_empty(len(shard.shard_members(shard.position - stage)), *outgoing.shape[1:])
    works = shard.exchange(outgoing, shard.position + 1, incoming, shard.position - 1)
    return incoming, works


# ---------------------------------------------------------------------- L @ D and the matching, shard by shard


@torch.no_grad()
def linked_product(
    shard: Shard,
    weight: Tensor,
    stream: Stream,
    matches: dict[Pair, Tensor],
    links: dict[int, Links],
    match: Match | None = None,
) -> Tensor:
    """L @ D for this rank's rows [n * h, d] (weight [n, h, d]: its members' decoder rows; D: the unit rows
    of all members, from `stream`), accumulated shard by shard. `links` (L's block from this rank's members
    to each shard, by the shard's first member) gains the blocks it lacks, made from `matches`. With `match`
    (a re-matching step: `matches` and `links` given empty) the pairs are matched on the way, and `matches`
    ends with those of all pairs of this rank's members."""
    h, d = weight.shape[1:]
    own_members = range(shard.start, shard.stop)
    matching = None if match is None else RingMatching(shard, match, matches)
    product, own_unit = None, None
    for stage in range(shard.n_shards):
        members, rows = next(stream)
        columns = rows.to(weight.dtype).reshape(-1, d)
        del rows  # (the stream keeps it while passing it on)
        if matching is not None:
            unit = F.normalize(columns, dim=-1).view(len(members), h, d)
            own_unit = unit if stage == 0 else own_unit
            assert own_unit is not None  # set at stage 0, the first
            matching.match_stage(stage, own_unit, unit, members)
            del unit  # (own_unit keeps this rank's own)
        if members.start not in links:
            links[members.start] = links_between(
                matches, own_members, members, h, n_member_pairs(shard.n_members), weight.device
            )
        part = links[members.start].matmul_unit(columns)
        product = part if product is None else product.add_(part)
        del columns, part  # a shard's copies go before the next shard is taken
    assert product is not None  # n_shards >= 1: at least this rank's own shard was added
    return product


class RingMatching:
    """The matching of one re-matching step, stage by stage as the shards pass (`pairs_at_stage`)."""

    def __init__(self, shard: Shard, match: Match, matches: dict[Pair, Tensor]):
        """matches: filled with the matches of all pairs of this rank's members, made here or received."""
        self.shard, self.match, self.matches = shard, match, matches
        self.outbox: dict[int, Tensor] = {}  # matches to send at a later stage, by stage

    def match_stage(self, stage: int, own_unit: Tensor, unit: Tensor, members: range) -> None:
        """Match the pairs between this rank's members (unit rows `own_unit`) and the shard of this stage
        (`members`, unit rows `unit`) that fall to this rank; keep those the other rank needs till the
        stage at which it sees this rank's shard; at a stage at which the other rank saw this one's shard
        first, trade: send what is due now, receive what it matched."""
        shard = self.shard
        matched_here, matched_there = pairs_at_stage(shard, stage, members)
        unit_rows = {member: own_unit[member - shard.start] for member in range(shard.start, shard.stop)} | {
            member: unit[member - members.start] for member in members
        }
        for a, b in matched_here:
            self.matches[(a, b)] = self.match((a, b), unit_rows[a], unit_rows[b])
        if stage and matched_here:  # int32: half the bytes
            self.outbox[shard.n_shards - stage] = torch.stack([self.matches[pair] for pair in matched_here]).int()
        if _sees_first(shard, stage):
            return
        received = unit.new_empty(len(matched_there), 2, unit.shape[1], dtype=torch.int32) if matched_there else None
        sent = self.outbox.pop(stage, None)  # for the shard `stage` places ahead, matched earlier
        shard.wait(shard.exchange(sent, shard.position + stage, received, shard.position - stage))
        if received is not None:
            self.matches.update(zip(matched_there, received.long()))


# ---------------------------------------------------------------------- who matches which pair


def pairs_at_stage(shard: Shard, stage: int, members: range) -> tuple[list[Pair], list[Pair]]:
    """The pairs joining this rank's members and the shard of this stage (`members`), in `member_pairs`
    order, split into those this rank matches and those whose matches it receives now: all matched here
    when it sees that shard first, all received when it sees it last, shared when both see each other now."""
    own_members = range(shard.start, shard.stop)
    pairs = [
        (a, b)
        for a, b in member_pairs(shard.n_members)
        if (a in own_members and b in members) or (a in members and b in own_members)
    ]
    if _sees_first(shard, stage):
        return pairs, []
    if stage > shard.n_shards - stage:
        return [], pairs
    lower, upper = sorted((shard.position, (shard.position - stage) % shard.n_shards))
    lower_share = (len(pairs) + _pairs_besides_split(shard, upper) - _pairs_besides_split(shard, lower)) // 2
    lower_share = min(max(lower_share, 0), len(pairs))
    lower_pairs, upper_pairs = pairs[:lower_share], pairs[lower_share:]
    return (lower_pairs, upper_pairs) if shard.position == lower else (upper_pairs, lower_pairs)


def _sees_first(shard: Shard, stage: int) -> bool:
    """Whether this rank sees the shard of this stage before that shard's rank sees this rank's (at stage
    n_shards - stage); its own shard (stage 0) counts as first."""
    return stage == 0 or stage < shard.n_shards - stage


def _pairs_besides_split(shard: Shard, position: int) -> int:
    """How many pairs the rank at `position` matches besides its share of the pairs it splits (an even
    number of shards): its own members' pairs and those with the shards it sees first."""
    n = len(shard.shard_members(position))
    return n_member_pairs(n) + sum(
        n * len(shard.shard_members(position - stage)) for stage in range(1, shard.n_shards // 2)
    )
