"""GPTQ error feedback (Frantar et al., 2022) on a fixed 4-bit grid.

The searched scales, zero points and code intervals stay as they are; only the code assignment
changes. Columns are quantized one at a time and each column's rounding error is pushed onto the
columns not yet quantized through the inverse Hessian, which is what the searched-scale methods
leave on the table. With int8 activations the error to minimise is ||X w - X_hat q||^2, which
equals ||X_hat (q - t)||^2 + const for the least-squares target t = (X_hat^T X_hat)^-1 X_hat^T X w:
GPTQ with H = X_hat^T X_hat started from t (t = w when the objective uses float X on both sides).
"""

from __future__ import annotations

import torch

from .dual_grained import CODE_MAX, DualGrainedWeight, GroupWeight, QuantizedWeight, code_interval

# Relative diagonal dampening, GPTQ's default.
DAMP = 0.01
BLOCK = 128


def _grid(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (output channel, group): float step, zero point and the lowest / highest code allowed."""
    zero = weight.zero.float()
    if isinstance(weight, DualGrainedWeight):
        lo, hi = code_interval(weight.zero.to(torch.int32), weight.s2.float())
        return weight.s2.float() * weight.s1.float().unsqueeze(-1), zero, lo.float(), hi.float()
    return weight.scale.float(), zero, torch.zeros_like(zero), torch.full_like(zero, CODE_MAX)


def _inverse_hessian_factor(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped H's Cholesky factor L and the upper Cholesky factor U of H^-1 (GPTQ's update rows)."""
    h = hessian.clone()
    h.diagonal().add_(DAMP * h.diagonal().mean() + 1e-12)
    lower = torch.linalg.cholesky(h)
    return lower, torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_codes(w: torch.Tensor, weight: QuantizedWeight, cross: torch.Tensor, quad: torch.Tensor,
               act_order: bool = False) -> torch.Tensor:
    """Codes (o, h) uint8 on weight's grid for float weights w (o, h), cross = X^T X_hat, quad = X_hat^T X_hat.
    act_order: the columns in order of decreasing quad diagonal (the inputs with the most energy first,
    while the most columns remain to absorb their error), each still on its own group's grid; the
    least-squares target and the error feedback are the same in any column order."""
    step, zero, lo, hi = _grid(weight)
    group = weight.group
    order = torch.argsort(quad.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        w, cross, quad = w[:, order], cross[order][:, order], quad[order][:, order]
    columns = range(w.shape[1]) if order is None else order.tolist()  # each processed column's own index
    lower, upper = _inverse_hessian_factor(quad.double())
    # t = w + w (A - B) H^-1: exactly w when A = B, whatever the dampening
    shift = torch.cholesky_solve((w.double() @ (cross.double() - quad.double())).T, lower).T
    target = (w.double() + shift).float()
    upper = upper.float()
    codes = torch.empty_like(target)
    for start in range(0, target.shape[1], BLOCK):
        end = min(start + BLOCK, target.shape[1])
        block = target[:, start:end].clone()
        errors = torch.empty_like(block)
        for i in range(end - start):
            k = columns[start + i] // group
            column = block[:, i]
            code = torch.clamp(torch.round(column / step[:, k]) + zero[:, k], lo[:, k], hi[:, k])
            codes[:, start + i] = code
            errors[:, i] = (column - (code - zero[:, k]) * step[:, k]) / upper[start + i, start + i]
            block[:, i:] -= errors[:, i : i + 1] * upper[start + i, start + i : end]
        target[:, end:] -= errors @ upper[start:end, end:]
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return codes.to(torch.uint8)


def with_gptq_codes(w: torch.Tensor, weight: QuantizedWeight, cross: torch.Tensor, quad: torch.Tensor,
                    act_order: bool = False) -> QuantizedWeight:
    """The same grid as weight, its codes re-assigned by GPTQ."""
    codes = gptq_codes(w, weight, cross, quad, act_order)
    if isinstance(weight, DualGrainedWeight):
        return DualGrainedWeight(codes=codes, zero=weight.zero, s2=weight.s2, s1=weight.s1)
    return GroupWeight(codes=codes, zero=weight.zero, scale=weight.scale)
