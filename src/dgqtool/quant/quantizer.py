"""Eq. 1 of the paper: the asymmetric N-bit quantizer with a clipping factor, and int8 activations.

Pure tensor functions: no I/O, no modules. Shapes are documented per function.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def alpha_grid(points: int, start: float = 1.02, span: float = 0.22) -> torch.Tensor:
    """The clipping grid of the authors' code: alpha_i = start - (i + 1) / points * span.

    With a single point the grid is exactly [1.0] (no clipping), which is the RTN setting.
    """
    if points < 1:
        raise ValueError("a grid needs at least one point")
    if points == 1:
        return torch.ones(1)
    steps = torch.arange(1, points + 1, dtype=torch.float64)
    return (start - steps / points * span).float()


def asym_params(
    w_min: torch.Tensor, w_max: torch.Tensor, alpha: float | torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of Eq. 1 for ranges [w_min, w_max] clipped by alpha.

    The range always contains 0 so the zero point lands in [0, 2^bits - 1].
    """
    levels = 2**bits - 1
    lo = torch.clamp(w_min, max=0.0) * alpha
    hi = torch.clamp(w_max, min=0.0) * alpha
    scale = ((hi - lo) / levels).clamp(min=1e-10)
    zero = torch.round(-lo / scale).clamp(0, levels)
    return scale, zero


def sym_params(
    w_min: torch.Tensor, w_max: torch.Tensor, alpha: float | torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the symmetric quantizer: the zero point fixed at 2^(bits-1) (levels
    -8..7 for 4 bits) and s = alpha * max|w| / 7.5, as compressed-tensors' symmetric int4 (the
    variant vLLM's Hopper W4A8 kernel takes)."""
    scale = (torch.maximum(-w_min, w_max).clamp(min=0.0) * alpha / ((2**bits - 1) / 2)).clamp(min=1e-10)
    return scale, torch.full_like(scale, float(2 ** (bits - 1)))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / s) + zp, 0, 2^N - 1), as float codes (broadcasting shapes)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Eq. 1 round trip: (q - zp) * s."""
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row (token): x ~= q * s with s = max|x| / 127.

    x: (..., h) float. Returns int8 codes of x's shape and float32 scales of shape (..., 1).
    """
    xf = x.float()
    # times the float32 reciprocal (what torch's CUDA division by a scalar computes), so CPU, GPU
    # and the quantization kernel agree to the bit
    scale = (xf.abs().amax(dim=-1, keepdim=True) * (1.0 / INT8_MAX)).clamp(min=1e-8)
    q = torch.clamp(torch.round(xf / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static symmetric int8 with one calibrated scale; returns codes and the scale per row."""
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.float().expand(*x.shape[:-1], 1)


def fake_quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The X-hat of the paper's Eq. 3/6: int8 round trip, per token or with a static scale."""
    q, s = quantize_per_token(x) if static_scale is None else quantize_per_tensor(x, static_scale)
    return (q.float() * s).to(x.dtype)
