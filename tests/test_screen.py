import pytest
import torch
from torch.nn import functional as F

from mfr_sae.screen import screen_both_ways, screen_error, screen_rows
from mfr_sae.search import top_both_ways


def _rows(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    if kind == "aligned":  # nearly equal rows: cosines near 1, where rounding the result costs most
        base = torch.randn(1, d, generator=gen)
        return F.normalize(base + 0.01 * torch.randn(n, d, generator=gen), dim=-1)
    # entries just past half a bf16 step from a representable value: each input rounds by nearly u
    spiky = torch.ones(n, d) + (1 + torch.rand(n, d, generator=gen)) * 2.0**-9
    return F.normalize(spiky * torch.randn(n, d, generator=gen).sign(), dim=-1)


@pytest.mark.parametrize("kind", ["random", "aligned", "worst-rounding"])
@pytest.mark.parametrize("d", [64, 768])
def test_the_screens_cosines_are_within_the_bound_of_the_fp32_product(kind, d):
    a, b = _rows(kind, 300, d, 0), _rows(kind, 200, d, 1)
    if kind == "worst-rounding":
        b = a[:200].clone()
    exact = a @ b.T
    top = screen_rows(a, b, 200)  # every column, sorted by the screen
    screened = torch.empty_like(exact).scatter_(1, top.indices, top.values)
    error = (screened - exact).abs().max().item()
    assert 0 < error <= screen_error(d)  # the screen is lossy, and the bound holds
    assert screen_error(d) < 0.02  # and is tight enough to decide most matches


def test_screening_both_ways_is_screening_each_way():
    a, b = _rows("random", 70, 32, 2), _rows("random", 50, 32, 3)
    a_top, b_top = screen_both_ways(a, b, 4, chunk=16)
    assert torch.equal(a_top.values, screen_rows(a, b, 4).values)  # values: bf16 ties may swap indices
    assert torch.equal(b_top.values, screen_rows(b, a, 4).values)
    assert a_top.values.dtype == torch.float32
    exact_a, exact_b = top_both_ways(a, b, 4)
    assert (a_top.values - exact_a.values).abs().max() <= screen_error(32)
    assert (b_top.values - exact_b.values).abs().max() <= screen_error(32)
