"""The two-phase grid search of Sec. 3.3, batched over groups, channels and grid points.

Output errors are evaluated from second moments of the calibration activations instead of the
activations themselves: for one output channel with float weights w and quantized weights q,

    ||X w - X_hat q||^2 = w^T (X^T X) w - 2 w^T (X^T X_hat) q + q^T (X_hat^T X_hat) q,

so the cost of a grid point no longer depends on the number of calibration tokens. Phase 1 uses
the diagonal (g x g) blocks of these matrices (Eq. 3), phase 2 the full ones (Eq. 6).

Errors are expanded around the float weights (delta = q - w) rather than in q itself:

    ||X w - X_hat q||^2 = delta^T B delta - 2 w^T (A - B) delta + ||(X - X_hat) w||^2,
    A = X^T X_hat, B = X_hat^T X_hat,

so every grid-dependent term is of the size of the error, not of ||X w||^2. That keeps the
comparison between grid points accurate even when the big matmul runs in TF32 on a GPU.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .dual_grained import (
    DualGrainedWeight,
    GroupWeight,
    QuantizedWeight,
    dual_grained_codes,
    grouped,
    make_dual_grained,
    split_scales,
)
from .gptq import with_gptq_codes
from .quantizer import INT8_MAX, alpha_grid, asym_params, fake_quantize, quantize_codes, sym_params

Objective = Literal["xhat", "x"]
Method = Literal["dgq", "rtn-dg", "groupwise", "channelwise", "rtn"]
METHODS: tuple[str, ...] = ("dgq", "rtn-dg", "groupwise", "channelwise", "rtn")

# Phase-2 grid of the authors' code: alpha = 1.02 - (i + 1) / 80 * 0.82.
PHASE2_SPAN = 0.82
# Upper bound on elements of one batched phase-2 tensor (grid points x o x h), to bound memory.
PHASE2_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class SecondMoments:
    """Accumulated over calibration tokens: xx = X^T X, xq = X^T X_hat, qq = X_hat^T X_hat (h x h)."""

    xx: torch.Tensor
    xq: torch.Tensor
    qq: torch.Tensor

    def objective(self, kind: Objective) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross, quad) matrices of the error: the paper's X_hat (default) or float X on both sides."""
        return (self.xq, self.qq) if kind == "xhat" else (self.xx, self.xx)


@dataclass(frozen=True)
class SearchResult:
    weight: QuantizedWeight
    error_rtn: float  # relative output error of RTN dual-grained, the "before search" reference
    error: float  # relative output error of the chosen parameters


def _diag_blocks(m: torch.Tensor, group: int) -> torch.Tensor:
    """(h, h) -> (n_g, g, g): the diagonal blocks of one group each."""
    n_g = m.shape[0] // group
    return torch.stack([m[k * group : (k + 1) * group, k * group : (k + 1) * group] for k in range(n_g)])


def _delta_error(delta: torch.Tensor, linear: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
    """delta^T quad delta - 2 linear . delta per output channel (leading batch dimensions allowed)."""
    with _tf32():
        quadratic = ((delta @ quad) * delta).sum(-1)
    return quadratic - 2 * (linear * delta).sum(-1)


def _group_blocks(w: torch.Tensor, moments: SecondMoments, group: int, objective: Objective):
    """Eq. 3's per-group terms: grouped weight (o, n_g, g), its linear term and the quadratic blocks."""
    cross, quad = (_diag_blocks(m, group) for m in moments.objective(objective))
    wg = grouped(w, group)
    return wg, torch.einsum("okg,kgh->okh", wg, cross - quad), quad


def _group_delta_error(delta: torch.Tensor, linear: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
    """Per (output channel, group) output error of a weight change delta (o, n_g, g), up to a constant."""
    return torch.einsum("okg,kgh,okh->ok", delta, quad, delta) - 2 * (linear * delta).sum(-1)


class _RunningArgmin:
    """Elementwise running minimum of an error over candidates, with the values that reached it."""

    def __init__(self, *initial: torch.Tensor):
        self.error = torch.full(initial[0].shape, float("inf"), device=initial[0].device)
        self.values = initial

    def update(self, error: torch.Tensor, *candidate: torch.Tensor) -> None:
        better = error < self.error
        self.error = torch.where(better, error, self.error)
        self.values = tuple(torch.where(better, c, v) for c, v in zip(candidate, self.values))


@contextmanager
def _tf32():
    """TF32 tensor cores for the one large matmul; exact enough since its operand is delta."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, moments: SecondMoments, objective: Objective) -> float:
    """sum_j ||X w_j - X_hat w_hat_j||^2 / sum_j ||X w_j||^2 for the full layer."""
    cross, quad = moments.objective(objective)
    energy = ((w @ moments.xx) * w).sum(-1)
    floor = ((w @ (moments.xx - cross - cross.T + quad)) * w).sum(-1)  # ||(X - X_hat) w||^2
    err = floor + _delta_error(w_hat - w, w @ (cross - quad), quad)
    return float(err.sum().clamp(min=0) / energy.sum().clamp(min=1e-30))


def search_group_scales(
    w: torch.Tensor, moments: SecondMoments, group: int, grid: torch.Tensor, objective: Objective,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1 (Eq. 3): per (output channel, group) the 4-bit scale and zero point minimising the
    group's output error over the clipping grid (symmetric: the zero point fixed at 8, the scale
    searched alone). Returns float (o, n_g) scales and zeros."""
    wg, linear, quad = _group_blocks(w, moments, group, objective)
    w_min, w_max = wg.amin(-1), wg.amax(-1)
    best = _RunningArgmin(torch.zeros_like(w_min), torch.zeros_like(w_min))
    params = sym_params if symmetric else asym_params
    for alpha in grid.tolist():
        scale, zero = params(w_min, w_max, alpha, bits=4)
        delta = fake_quantize(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits=4) - wg
        best.update(_group_delta_error(delta, linear, quad), scale, zero)
    return best.values


def _channel_scales(w: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """s1 = alpha * max_k |W[j, k]| / 127, rounded to fp16 as stored: (A, o)."""
    s1 = alphas.unsqueeze(-1) * w.abs().amax(-1).clamp(min=1e-8) / INT8_MAX
    return s1.half().float().clamp(min=torch.finfo(torch.float16).tiny)


def _dual_grained_weights(
    w: torch.Tensor, group_scale: torch.Tensor, zero: torch.Tensor, s1: torch.Tensor
) -> torch.Tensor:
    """Float weights of the DGQ format for a batch of s1 candidates (A, o) -> (A, o, h)."""
    s2 = split_scales(group_scale, s1)
    codes = dual_grained_codes(w, zero, s2, s1)
    deq = (codes - zero.unsqueeze(-1)) * (s2 * s1.unsqueeze(-1)).unsqueeze(-1)
    return deq.reshape(*s1.shape, w.shape[-1])


def search_channel_scales(
    w: torch.Tensor,
    group_scale: torch.Tensor,
    zero: torch.Tensor,
    moments: SecondMoments,
    grid: torch.Tensor,
    objective: Objective,
) -> torch.Tensor:
    """Phase 2 (Eq. 6): per output channel the s1 that minimises the full-layer output error once
    the phase-1 scales are split into int8 S2 and codes are clamped to the Eq. 5 interval. (o,)"""
    cross, quad = moments.objective(objective)
    linear = w @ (cross - quad)
    o, h = w.shape
    chunk = max(1, PHASE2_CHUNK_ELEMENTS // (o * h))
    best = _RunningArgmin(torch.zeros(o, device=w.device))
    for start in range(0, len(grid), chunk):
        s1 = _channel_scales(w, grid[start : start + chunk].to(w.device))
        err = _delta_error(_dual_grained_weights(w, group_scale, zero, s1) - w, linear, quad)
        err_min, idx = err.min(0)
        best.update(err_min, s1.gather(0, idx.unsqueeze(0)).squeeze(0))
    return best.values[0]


def refine_group_integers(
    w: torch.Tensor,
    group_scale: torch.Tensor,
    zero: torch.Tensor,
    s1: torch.Tensor,
    moments: SecondMoments,
    group: int,
    objective: Objective,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional phase 3 (not in the paper): round(S' / s1) misses the phase-1 scale by up to 1/(2 S2),
    20-30 % for narrow groups. Per group, try floor and ceil of S' / s1 and the zero point +-1 (not
    when symmetric: it stays 8), keep the pair with the lowest group output error (Eq. 3's blocks).
    Returns float S2 and zeros (o, n_g)."""
    wg, linear, quad = _group_blocks(w, moments, group, objective)
    ratio = group_scale / s1.unsqueeze(-1)
    best = _RunningArgmin(split_scales(group_scale, s1), zero)
    for s2 in (torch.floor(ratio).clamp(1, INT8_MAX), torch.ceil(ratio).clamp(1, INT8_MAX)):
        for shift in (0,) if symmetric else (-1, 0, 1):
            z = (zero + shift).clamp(0, 15)
            codes = dual_grained_codes(w, z, s2, s1)
            delta = (codes - z.unsqueeze(-1)) * (s2 * s1.unsqueeze(-1)).unsqueeze(-1) - wg
            best.update(_group_delta_error(delta, linear, quad), s2, z)
    return best.values


def _group_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> GroupWeight:
    scale = scale.half().float()
    codes = quantize_codes(grouped(w, group), scale.unsqueeze(-1), zero.unsqueeze(-1), bits=4)
    return GroupWeight(codes=codes.reshape(w.shape).to(torch.uint8), zero=zero.to(torch.uint8), scale=scale)


def rtn_dual_grained(w: torch.Tensor, group: int, symmetric: bool = False) -> DualGrainedWeight:
    """Table 1's RTN dual-grained: alpha = 1 in both phases, no search."""
    wg = grouped(w, group)
    scale, zero = (sym_params if symmetric else asym_params)(wg.amin(-1), wg.amax(-1), 1.0, bits=4)
    s1 = _channel_scales(w, torch.ones(1, device=w.device))[0]
    return make_dual_grained(w, split_scales(scale, s1), zero, s1)


def search_weight(
    w: torch.Tensor,
    moments: SecondMoments,
    *,
    method: Method = "dgq",
    group: int = 128,
    grid1: int = 20,
    grid2: int = 80,
    objective: Objective = "xhat",
    refine: bool = False,
    gptq: bool = False,
    symmetric: bool = False,
    act_order: bool = False,
) -> QuantizedWeight:
    """The quantized weight of one linear (o, h) with the given method (no error report);
    symmetric: every zero point 8; act_order: GPTQ's columns by decreasing X_hat^T X_hat diagonal."""
    w = w.float()
    if method == "rtn-dg":
        result: QuantizedWeight = rtn_dual_grained(w, group, symmetric)
    elif method == "dgq":
        scale, zero = search_group_scales(w, moments, group, alpha_grid(grid1), objective, symmetric)
        s1 = search_channel_scales(w, scale, zero, moments, alpha_grid(grid2, span=PHASE2_SPAN), objective)
        s2 = split_scales(scale, s1)
        if refine:
            s2, zero = refine_group_integers(w, scale, zero, s1, moments, group, objective, symmetric)
        result = make_dual_grained(w, s2, zero, s1)
    else:
        g = w.shape[1] if method == "channelwise" else group
        grid = alpha_grid(1 if method == "rtn" else grid1)
        scale, zero = search_group_scales(w, moments, g, grid, objective, symmetric)
        result = _group_weight(w, scale, zero, g)
    if gptq:
        result = with_gptq_codes(w, result, *moments.objective(objective), act_order=act_order)
    return result


def _reported(w: torch.Tensor, result: QuantizedWeight, moments: SecondMoments, options: dict) -> SearchResult:
    w, objective = w.float(), options.get("objective", "xhat")
    rtn = rtn_dual_grained(w, options.get("group", 128), options.get("symmetric", False))
    return SearchResult(
        weight=result,
        error_rtn=relative_error(w, rtn.dequantize(), moments, objective),
        error=relative_error(w, result.dequantize(), moments, objective),
    )


def quantize_weight(w: torch.Tensor, moments: SecondMoments, **options) -> SearchResult:
    """Quantize one linear's weight (o, h) (options as search_weight); errors are relative output
    errors, of the result and of RTN dual-grained as the "before search" reference."""
    return _reported(w, search_weight(w, moments, **options), moments, options)


# Upper bound on rows x columns of one stacked search (a few tensors of this size are live at once).
STACK_ELEMENTS = 1 << 26


def _row_slice(weight: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    fields = {f.name: getattr(weight, f.name)[start:stop] for f in dataclasses.fields(weight)}
    return type(weight)(**fields)


def quantize_weights(weights: list[torch.Tensor], moments: SecondMoments, **options) -> list[SearchResult]:
    """quantize_weight for several linears that read one activation (one set of moments), searched
    as stacked rows: every step of every method (GPTQ included) is per output channel, so the codes
    and scales are those of one call per linear, in fewer, larger launches -- all experts' gate/up
    of an MoE layer in a few calls instead of 2 x experts. Errors are reported per linear."""
    results: list[SearchResult] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        searched = search_weight(torch.cat(batch) if len(batch) > 1 else batch[0], moments, **options)
        start = 0
        for w in batch:
            stop = start + w.shape[0]
            results.append(_reported(w, _row_slice(searched, start, stop), moments, options))
            start = stop
        batch.clear()

    for w in weights:
        if batch and (sum(b.shape[0] for b in batch) + w.shape[0]) * w.shape[1] > STACK_ELEMENTS:
            flush()
        batch.append(w)
    if batch:
        flush()
    return results


def accumulate_moments(
    x: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], into: SecondMoments | None
) -> SecondMoments:
    """Add one batch of activations x (tokens, h) and their int8 round trip to the running moments."""
    xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
    xq = quantize(xf)
    parts = (xf.T @ xf, xf.T @ xq, xq.T @ xq)
    if into is None:
        return SecondMoments(*parts)
    return SecondMoments(into.xx + parts[0], into.xq + parts[1], into.qq + parts[2])
