"""torchrun's process group: joining it (and the device of each rank), leaving it before the interpreter does,
and a rank that stops answering named (`RankLost`, with the error it left on the rendezvous store), for every
collective run through `collective`. Backends: gloo on CPU, NCCL on CUDA. Outside torchrun (or with one
process) no process group is joined; what travels over it is distributed.py's `Shard`.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class RankLost(RuntimeError):
    """Another rank stopped answering: one-line message naming it."""


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device, timeout_s: float) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun with more than one process; the device of this
    rank (cuda:LOCAL_RANK on GPUs)."""
    rank, world = world_from_env()
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        atexit.register(close)
    return rank, world, device


_broken = False  # a collective failed: the process group cannot be shut down in order


def close() -> bool:
    """Shut the process group down before the interpreter does (also run at exit). Left to the
    interpreter's teardown (the process group, or objects in reference cycles freed by its last garbage
    collection), gloo can end the process with SIGABRT ("terminate called without an active exception")
    after the work is done, and can still after this call, so the command line leaves with os._exit when
    this returns True. True when a process group was joined (shut down now unless a collective failed)."""
    if not dist.is_initialized():
        return False
    if not _broken:
        gc.collect()
        dist.destroy_process_group()
    return True


def collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a collective (or wait for one); a rank that died surfaces as RankLost naming it, not as a hang
    or a gloo trace."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as err:
        global _broken
        _broken = True
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0])  # drop gloo's source location
        raise RankLost(
            f"lost contact with the other processes ({lost_ranks()}): {reason.split('. ')[0][:120]}; "
            f"the last checkpoint is intact, continue with --resume"
        ) from None


def report_failure(err: BaseException) -> None:
    """Leave the error that stops this rank on the rendezvous store, so that the ranks that lose contact
    with it say why (a survivor's own RankLost is not left)."""
    if not dist.is_initialized() or isinstance(err, RankLost):
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"mfr_sae/failed/{world_from_env()[0]}", f"{type(err).__name__}: {str(err)[:200]}")
    except Exception:
        pass


def lost_ranks(wait_s: float = 10.0) -> str:
    """Which ranks do not answer, as far as this rank can tell: every rank still alive checks in on the
    rendezvous store (which torchrun or rank 0 hosts, apart from the broken process group) and waits a
    few seconds for the others; those that never check in are named, with the error a rank left there
    (`report_failure`) when it stopped on one."""
    rank, world = world_from_env()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"mfr_sae/alive/{rank}", "1")
        missing, deadline = list(range(world)), time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            missing = [
                other
                for other in missing
                if not (store.check([f"mfr_sae/alive/{other}"]) or store.check([f"mfr_sae/failed/{other}"]))
            ]
            time.sleep(0.1)
        failed = {
            other: store.get(f"mfr_sae/failed/{other}").decode()
            for other in range(world)
            if store.check([f"mfr_sae/failed/{other}"])
        }
    except Exception:
        return "rank 0, which hosts the rendezvous store, or unknown ranks"
    said = [f"rank {other} failed with {message}" for other, message in failed.items()]
    if missing:
        said.append(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} stopped answering")
    return "; ".join(said) or "every rank is still alive"
