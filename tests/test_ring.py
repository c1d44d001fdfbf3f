"""Who matches which pair round the ring (ring.pairs_at_stage), without processes; the ring itself runs in
tests/test_distributed.py."""

import pytest

from mfr_sae.distributed import Shard
from mfr_sae.matching import member_pairs
from mfr_sae.ring import pairs_at_stage

LAYOUTS = [(3, 2), (5, 4), (6, 3), (7, 4), (4, 4), (8, 6), (9, 6), (2, 2), (2, 4), (3, 6)]  # (members, processes)


def _schedule(n_members: int, world: int) -> dict[tuple[int, int], tuple[list, list]]:
    """(position, stage) -> (pairs matched there, pairs received there), for one replica's ring."""
    shards = [shard for shard in (Shard(n_members, rank, world) for rank in range(world)) if shard.replica == 0]
    return {
        (shard.position, stage): pairs_at_stage(shard, stage, shard.shard_members(shard.position - stage))
        for shard in shards
        for stage in range(shard.n_shards)
    }


@pytest.mark.parametrize("n_members, world", LAYOUTS)
def test_every_pair_is_matched_once_and_ends_on_both_ranks_of_its_members(n_members, world):
    schedule = _schedule(n_members, world)
    matched = sorted(pair for here, _ in schedule.values() for pair in here)
    assert matched == member_pairs(n_members)
    n_shards = max(position for position, _ in schedule) + 1
    for position in range(n_shards):
        own = Shard(n_members, position * (world // n_shards), world).members
        known = sorted(pair for (at, _), (here, there) in schedule.items() if at == position for pair in here + there)
        assert known == [pair for pair in member_pairs(n_members) if pair[0] in own or pair[1] in own]


@pytest.mark.parametrize("n_members, world", LAYOUTS)
def test_a_rank_receives_at_a_stage_the_matches_the_other_made_for_it_in_the_same_order(n_members, world):
    """At stage t the rank at p receives from the rank at p - t what that one matched at stage n_shards - t
    (the stage at which it saw p's shard), as they were made."""
    schedule = _schedule(n_members, world)
    n_shards = max(position for position, _ in schedule) + 1
    for (position, stage), (_, received) in schedule.items():
        if stage == 0:
            assert received == []
            continue
        sender_made, _ = schedule[((position - stage) % n_shards, n_shards - stage)]
        assert received == (sender_made if 2 * stage >= n_shards else [])
