"""A bf16 screen for exact `max` matching: the cosines of unit rows from a bf16 product (AMX, tensor cores:
8x the fp32 rate on this project's CPU), with a proven bound on how far each can be from the fp32 product
that exact matching (`matching.match_pair`) computes. The screen's K best columns of a row hold its fp32 best
whenever the screen's (K+1)-th value plus the bound lies below the best candidate's exact cosine, which
`certified.CertifiedMaxMatcher` checks; only rows where that fails are matched in fp32 against every row.
The screen changes which work is done, never a match.

The bound, for unit rows a, b of d dimensions (u = 2^-8, bf16's unit roundoff; u32 = 2^-24): rounding the
inputs moves a . b by at most (2u + u^2) |a| |b|; the fp32 accumulation of the product, and that of the
fp32 product it stands for, each by at most d u32 / (1 - d u32) |a| |b|; rounding the result to bf16 by at
most 2u |a . b| (u when it rounds to nearest; 2u covers a backend that truncates). The rows' norms are 1 to
within fp32 rounding, for which a relative 1e-5 is kept.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from mfr_sae.metrics import CHUNK_ROWS
from mfr_sae.search import Top, top_both_ways

_BF16_FASTER: dict[str, bool] = {}  # by device, measured once per process


def screen_error(d: int) -> float:
    """An upper bound on |bf16 product - fp32 product| of two unit rows of d dimensions."""
    u, u32 = 2.0**-8, 2.0**-24
    accumulation = d * u32 / (1 - d * u32)
    norms = (1 + 1e-5) ** 2
    return ((2 * u + u * u) * norms + 2 * accumulation * (1 + 2 * u) * norms) * (1 + 2 * u) + 2 * u * norms


def bf16_is_faster(device: torch.device) -> bool:
    """Whether a bf16 product is at least twice as fast as an fp32 one on this device (timed once): where
    it is not (CPUs without AMX), the screen would cost more than it saves."""
    key = str(device)
    if key not in _BF16_FASTER:
        rows = torch.randn(1024, 768, device=device)
        fp32 = _seconds(lambda: rows @ rows.T, device)
        bf16 = rows.bfloat16()
        _BF16_FASTER[key] = 2 * _seconds(lambda: bf16 @ bf16.T, device) < fp32
    return _BF16_FASTER[key]


def _seconds(product: Callable[[], object], device: torch.device) -> float:
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(4):
        sync()
        start = time.perf_counter()
        product()
        sync()
        times.append(time.perf_counter() - start)
    return min(times[1:])


@contextlib.contextmanager
def _full_fp32_accumulation() -> Iterator[None]:
    """cuBLAS may otherwise reduce bf16 products in bf16 (split-K), which the bound does not cover."""
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def screen_rows(rows: Tensor, columns: Tensor, k: int, chunk: int = CHUNK_ROWS) -> Top:
    """Each row's k largest screened cosines with the columns (fp32 values of the bf16 products), [rows, k]."""
    columns = columns.bfloat16()
    parts = []
    with _full_fp32_accumulation():
        for start in range(0, len(rows), chunk):
            parts.append((rows[start : start + chunk].bfloat16() @ columns.T).topk(k, dim=1))
    return Top(torch.cat([p.values for p in parts]).float(), torch.cat([p.indices for p in parts]))


def screen_both_ways(a: Tensor, b: Tensor, k: int, chunk: int = CHUNK_ROWS) -> tuple[Top, Top]:
    """`screen_rows` of a into b and of b into a, from one product."""
    with _full_fp32_accumulation():
        tops = top_both_ways(a.bfloat16(), b.bfloat16(), k, chunk)
    return tuple(Top(top.values.float(), top.indices) for top in tops)  # type: ignore[return-value]
