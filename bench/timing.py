"""The one timer of the bench scripts. No mfr_sae import: the peers' workers (bench/peers.py) run it in
virtual environments without mfr-sae."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def timed(fn: Callable[[], Any], steps: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds per call of fn, after `warmup` calls (CUDA synchronised around the timed calls)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def timed_side_by_side(fns: dict[str, Callable[[], Any]], steps: int, device: torch.device) -> dict[str, float]:
    """Seconds per call of each fn, the fns called in turn (one call of each, `steps` times): a drift in the
    machine's speed (its other load, its clock) falls on all of them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total = dict.fromkeys(fns, 0.0)
    for _ in range(steps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            total[name] += time.perf_counter() - start
    return {name: seconds / steps for name, seconds in total.items()}
