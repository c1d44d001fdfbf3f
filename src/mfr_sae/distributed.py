"""One ensemble across processes (torchrun, torch.distributed): the members are split between ranks.

Launched by `torchrun --nproc_per_node R ...`, every rank holds a contiguous shard of the N members
(sizes differ by at most one: N = 5 on 2 ranks is 3 + 2) with their parameters and AdamW state, reads
the same data stream, and trains its members on every batch, as one process would. With R a multiple
of N above N, each member is also data parallel: its R / N processes take equal slices of every batch
and sum their (slice-weighted) gradients. What couples the members travels between ranks: for MFR, the
decoders of all members every step, one shard at a time round a ring of the shards (ring.py, on
`Shard.exchange`); for logs, checkpoints and the reinitialisation rule, small per-member numbers,
gathered only at the steps that need them (the baseline sends nothing between log steps but data
parallel's sums of gradients and firing counts). So beta, reinitialisation, logs and checkpoints are
those of one process. Rank 0 writes the run folder; its layout does not depend on R. Without torchrun
(or with one process) every collective here is the identity. The process group itself (joining it, leaving
it, a lost rank named): process_group.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mfr_sae.errors import ConfigError
from mfr_sae.process_group import collective


class Shard:
    """The members this rank holds, and the collectives over the member axis (identity for one rank)."""

    def __init__(self, n_members: int, rank: int = 0, world: int = 1):
        """R <= N processes: contiguous shards of members. R > N (a multiple of N): data parallel as well,
        each member on R / N processes ("replicas"), each taking an equal slice of every batch."""
        if world > n_members and world % n_members:
            raise ConfigError(
                f"{world} processes for sae.n_members={n_members}: use at most {n_members} "
                f"processes, or a multiple of {n_members} (each member then splits its batch)"
            )
        self.n_members, self.rank, self.world = n_members, rank, world
        self.replicas = max(1, world // n_members)
        self.replica = rank % self.replicas
        self.sizes = (
            [n_members // world + (other < n_members % world) for other in range(world)]
            if self.replicas == 1
            else [1] * world
        )
        self.start = sum(self.sizes[:rank]) if self.replicas == 1 else rank // self.replicas
        self.stop = self.start + self.sizes[rank]
        self.members = list(range(self.start, self.stop))
        self.group = None  # the processes that hold this rank's member (data parallel)
        if self.replicas > 1 and dist.is_initialized():
            groups = [
                dist.new_group(list(range(member * self.replicas, (member + 1) * self.replicas)))
                for member in range(n_members)
            ]  # every rank creates every group, in the same order
            self.group = groups[self.start]
        self.received_bytes = 0  # tensor bytes this rank received from the others (bench/distributed.py)

    def batch_rows(self, batch: int) -> slice:
        """The rows of a batch this rank trains on: all of them, or its replica's equal slice."""
        bounds = [batch * replica // self.replicas for replica in range(self.replicas + 1)]
        return slice(bounds[self.replica], bounds[self.replica + 1])

    def reduce_gradients(self, params: Iterable[Tensor]) -> None:
        """Data parallel: each member's gradient summed over its replicas (each weighted its slice)."""
        for param in params:
            if param.grad is not None:
                self.sum_replicas(param.grad)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local(self, full: Tensor) -> Tensor:
        """This rank's slice of a tensor with the member axis first."""
        return full[self.start : self.stop]

    def _all_parts(self, local: Tensor) -> list[Tensor]:
        """Every rank's `local` (its shard's rows), on every rank, without padding (gloo's all-gather takes
        equal sizes only, so uneven shards travel as one broadcast per rank)."""
        local = local.contiguous()
        if len(set(self.sizes)) == 1:
            parts = [torch.empty_like(local) for _ in range(self.world)]
            collective(dist.all_gather, parts, local)
        else:
            parts = [
                local if source == self.rank else local.new_empty(size, *local.shape[1:])
                for source, size in enumerate(self.sizes)
            ]
            for work in [collective(dist.broadcast, part, source, async_op=True) for source, part in enumerate(parts)]:
                collective(work.wait)
        received = sum(part.numel() for source, part in enumerate(parts) if source != self.rank)
        self.received_bytes += received * local.element_size()
        return parts

    def sum_replicas(self, local: Tensor) -> Tensor:
        """Data parallel: a value of this rank's slice of the batch summed over the member's replicas
        (in place); the identity without replicas."""
        if self.group is not None:
            collective(dist.all_reduce, local, dist.ReduceOp.SUM, self.group)
        return local

    def min_replicas(self, local: Tensor) -> Tensor:
        """Data parallel: the smallest of a value over the member's replicas (in place); the identity without."""
        if self.group is not None:
            collective(dist.all_reduce, local, dist.ReduceOp.MIN, self.group)
        return local

    def gather(self, local: Tensor) -> Tensor:
        """[n_local, ...] on every rank -> [N, ...] on every rank, in member order (of replicated members,
        replica 0's: they hold the same values)."""
        if self.world == 1:
            return local
        return torch.cat(self._all_parts(local)[:: self.replicas])

    def gather_to_main(self, local: Tensor) -> Tensor | None:
        """[n_local, ...] -> [N, ...] on rank 0 only, where checkpoints are written, on the CPU (rank 0's
        device takes one shard at a time); None on the other ranks, which never hold all members. The
        identity in one process."""
        if self.world == 1:
            return local
        if not self.is_main:
            if self.replica == 0:
                self.wait(self.exchange(local, 0, None, 0))
            return None
        parts = [local.cpu()]
        for position in range(1, self.n_shards):
            part = local.new_empty(len(self.shard_members(position)), *local.shape[1:])
            self.wait(self.exchange(None, 0, part, position))
            parts.append(part.cpu())
        return torch.cat(parts)

    def gather_sum(self, local: Tensor) -> Tensor:
        """As gather, for values of this rank's slice of the batch: summed over each member's replicas."""
        if self.replicas == 1:
            return self.gather(local)
        parts = torch.stack(self._all_parts(local))
        return parts.view(self.n_members, self.replicas, *local.shape).sum(1).flatten(0, 1)

    def gather_differentiable(self, local: Tensor) -> Tensor:
        """As gather, with the local rows still in the autograd graph (the others are constants)."""
        if self.world == 1:
            return local
        full = self.gather(local.detach())
        return torch.cat([full[: self.start], local, full[self.stop :]])

    def gather_objects(self, value: Any) -> list[Any]:
        """One picklable value per member shard (replica 0's), in member order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        collective(dist.all_gather_object, out, value)
        return out[:: self.replicas]

    def barrier(self) -> None:
        if self.world > 1:
            collective(dist.barrier)

    # ------------------------------------------------------------------ point to point between shards

    @property
    def n_shards(self) -> int:
        """Member shards around the ring (data parallel: R / N replicas of each member form N shards)."""
        return self.world // self.replicas

    @property
    def position(self) -> int:
        """This rank's shard's place in the ring (its replicas run rings of their own)."""
        return self.rank // self.replicas

    def shard_members(self, position: int) -> range:
        """The members of the shard at `position`."""
        position %= self.n_shards
        start = sum(self.sizes[: position * self.replicas : self.replicas])
        return range(start, start + self.sizes[position * self.replicas])

    def _rank_at(self, position: int) -> int:
        return position % self.n_shards * self.replicas + self.replica

    def exchange(self, outgoing: Tensor | None, to: int, incoming: Tensor | None, source: int) -> list[dist.Work]:
        """Start sending `outgoing` to the shard at position `to` (this replica's rank of it) and receiving
        `incoming` from the one at `source`, as one batch (NCCL needs sends and receives batched when two
        ranks send to each other); returns the works to wait for. Every rank must call it at the same
        point of the same sequence of exchanges."""
        ops = []
        if outgoing is not None:
            ops.append(dist.P2POp(dist.isend, outgoing.contiguous(), self._rank_at(to)))
        if incoming is not None:
            ops.append(dist.P2POp(dist.irecv, incoming, self._rank_at(source)))
            self.received_bytes += incoming.numel() * incoming.element_size()
        return collective(dist.batch_isend_irecv, ops) if ops else []

    @staticmethod
    def wait(works: list[dist.Work]) -> None:
        for work in works:
            collective(work.wait)
