"""Row norms: 1 / ||row|| of every row (`inverse_norms`), and rows scaled to unit norm with a cheaper backward
(`unit_rows`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class _UnitRows(torch.autograd.Function):
    """w / ||w|| per row, with the backward in one expression: (g - (g . u) u) / ||w||."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        norm: Tensor = torch.linalg.vector_norm(weight, dim=-1, keepdim=True).clamp_min_(1e-12)
        unit = weight / norm
        ctx.save_for_backward(unit, norm)
        return unit

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        saved: tuple[Tensor, ...] = ctx.saved_tensors
        unit, norm = saved
        along = (grad * unit).sum(dim=-1, keepdim=True)
        return grad.addcmul(unit, along, value=-1).div_(norm)


_unit_rows: Callable[[Tensor], Tensor] = _UnitRows.apply  # typed: torch's `apply` is not


def inverse_norms(rows: Tensor) -> Tensor:
    """1 / ||row|| of every row [..., d] -> [...] (norms clamped at 1e-12, as F.normalize)."""
    norms: Tensor = torch.linalg.vector_norm(rows, dim=-1)
    return norms.clamp_min_(1e-12).reciprocal_()


def unit_rows(weight: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (as F.normalize), with a cheaper backward."""
    return _unit_rows(weight)
