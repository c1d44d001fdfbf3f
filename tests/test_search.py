import pytest
import torch
from torch.nn import functional as F

from mfr_sae.search import Top, settle_near_ties, top_both_ways


def test_near_ties_settled_among_the_top_columns_as_among_all_columns():
    gen = torch.Generator().manual_seed(4)
    columns = torch.nn.functional.normalize(torch.randn(60, 16, generator=gen), dim=-1)
    columns[7] = columns[3]  # exact float64 ties: the lower index wins
    rows = torch.nn.functional.normalize(
        torch.cat([columns[:30] + columns[30:], columns[[3, 3]], torch.randn(10, 16, generator=gen)]), dim=-1
    )
    rows = torch.nn.functional.normalize(rows + 1e-7 * torch.randn(rows.shape, generator=gen), dim=-1)
    everywhere = (rows.double() @ columns.double().T).argmax(dim=1)
    sims = rows @ columns.T
    for m in (2, 3, 6):  # m = 2 compares every column; wider tops compare only their own
        top = sims.topk(m, dim=1)
        settled = settle_near_ties(rows, columns, Top(top.values, top.indices))
        near = (top.values[:, 0] - top.values[:, 1]) < 1e-4
        assert near.sum() >= 10
        assert torch.equal(settled[near], everywhere[near]), m
        assert torch.equal(settled[~near], top.indices[~near, 0])


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_top_both_ways_is_the_top_k_of_each_row_and_of_each_column(chunk):
    torch.manual_seed(5)
    a, b = F.normalize(torch.randn(150, 16), dim=-1), F.normalize(torch.randn(90, 16), dim=-1)
    sims = a @ b.T
    a_top, b_top = top_both_ways(a, b, 10, chunk)
    assert torch.equal(a_top.indices, sims.topk(10, dim=1).indices)
    assert torch.equal(b_top.indices, sims.T.topk(10, dim=1).indices)  # later chunks merged, not a top-k
    assert torch.allclose(b_top.values, sims.T.topk(10, dim=1).values)


def test_top_both_ways_keeps_the_lower_row_among_equal_cosines_and_pads_past_the_rows():
    torch.manual_seed(6)
    a = F.normalize(torch.randn(4, 8), dim=-1).repeat(5, 1)  # rows 0-3 again as 4-7, 8-11, ...: equal cosines
    b = F.normalize(torch.randn(6, 8), dim=-1)
    _, b_top = top_both_ways(a, b, 5, chunk=4)
    assert (b_top.indices[:, 0] < 4).all()  # each column's best: the first copy, in the first chunk
    assert torch.equal(b_top.indices[:, 1:], b_top.indices[:, :1] + torch.arange(1, 5) * 4)  # then its copies
    _, few = top_both_ways(a[:2], b, 4)
    assert torch.isinf(few.values[:, 2:]).all() and torch.isfinite(few.values[:, :2]).all()
