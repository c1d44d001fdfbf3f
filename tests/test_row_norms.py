import torch
from torch.nn import functional as F

from mfr_sae.row_norms import unit_rows


def test_unit_rows_matches_normalize_in_value_and_gradient():
    w = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad((unit_rows(w) * g).sum(), w)
    (ref,) = torch.autograd.grad((F.normalize(w, dim=-1) * g).sum(), w)
    torch.testing.assert_close(unit_rows(w), F.normalize(w, dim=-1))
    torch.testing.assert_close(ours, ref)
    torch.autograd.gradcheck(unit_rows, (w,))
