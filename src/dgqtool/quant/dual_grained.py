"""The DGQ weight format (Eq. 2, 4, 5, A8-A11) and the plain group-wise 4-bit format of the baselines.

DGQ: per output channel j and group k, 4-bit codes W_u4, an integer zero point zp in [0, 15], an
int8 group scale S2 >= 1 and one float channel scale s1[j]. W_s8 = S2 * (W_u4 - zp) is an exact
int8 weight, so the matmul is a plain int8 GEMM with s_x * s1 applied once in the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import INT8_MAX

CODE_MAX = 15


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """(o, h) -> (o, h / group, group)."""
    o, h = w.shape
    return w.reshape(o, h // group, group)


def code_interval(zero: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 with truncation toward zero: the codes whose int8 product S2 * (code - zp) fits in +-127.

    The paper's floor(-127 / S2) is one step too low when 127 / S2 is not an integer (docs/method.md, Range fusion).
    """
    reach = torch.div(INT8_MAX, s2.to(torch.int32), rounding_mode="floor").to(zero.dtype)
    lo = torch.clamp(zero - reach, min=0)
    hi = torch.clamp(zero + reach, max=CODE_MAX)
    return lo, hi


@dataclass(frozen=True)
class DualGrainedWeight:
    """codes (o, h) uint8 in [0, 15]; zero, s2 (o, n_g) uint8 / int8; s1 (o,) float32."""

    codes: torch.Tensor
    zero: torch.Tensor
    s2: torch.Tensor
    s1: torch.Tensor

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.zero.shape[1]

    def int8_weight(self) -> torch.Tensor:
        """W_s8 = S2 * (W_u4 - zp) as int8 (o, h); exact by construction of the code interval."""
        g = self.group
        levels = grouped(self.codes.to(torch.int16), g) - self.zero.to(torch.int16).unsqueeze(-1)
        w = levels * self.s2.to(torch.int16).unsqueeze(-1)
        return w.reshape(self.codes.shape).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """The float weight the integer GEMM computes with: s1 * W_s8, float32 (o, h)."""
        return self.int8_weight().float() * self.s1.float().unsqueeze(-1)


@dataclass(frozen=True)
class GroupWeight:
    """Plain group-wise 4-bit weights with float scales (the baselines): codes (o, h), zero/scale (o, n_g)."""

    codes: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.zero.shape[1]

    def dequantize(self) -> torch.Tensor:
        g = self.group
        levels = grouped(self.codes.float(), g) - self.zero.float().unsqueeze(-1)
        return (levels * self.scale.float().unsqueeze(-1)).reshape(self.codes.shape)


QuantizedWeight = DualGrainedWeight | GroupWeight


def split_scales(group_scale: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """S2 = max(1, round(S' / s1)), capped at 127 so it stays an int8 (docs/method.md, Two-phase grid search)."""
    return torch.clamp(torch.round(group_scale / s1.unsqueeze(-1)), 1, INT8_MAX)


def dual_grained_codes(
    w: torch.Tensor, zero: torch.Tensor, s2: torch.Tensor, s1: torch.Tensor
) -> torch.Tensor:
    """Requantize w (o, h) with scale S2 * s1 per group, clamped to the Eq. 5 interval.

    All arguments float; zero and s2 are (o, n_g) or broadcast against it, s1 is (o,) or (..., o, 1).
    Returns float codes (o, n_g, g) (callers reshape).
    """
    n_g = zero.shape[-1]
    wg = w.reshape(*w.shape[:-1], n_g, -1)
    s1 = s1.unsqueeze(-1)
    wg = torch.maximum(torch.minimum(wg, INT8_MAX * s1.unsqueeze(-1)), -INT8_MAX * s1.unsqueeze(-1))
    reach = torch.floor(INT8_MAX / s2)
    lo = torch.clamp(zero - reach, min=0).unsqueeze(-1)
    hi = torch.clamp(zero + reach, max=CODE_MAX).unsqueeze(-1)
    scale = (s2 * s1).unsqueeze(-1)
    return torch.maximum(torch.minimum(torch.round(wg / scale) + zero.unsqueeze(-1), hi), lo)


def make_dual_grained(w: torch.Tensor, s2: torch.Tensor, zero: torch.Tensor, s1: torch.Tensor) -> DualGrainedWeight:
    """Build the integer DGQ format from float weights (o, h), int-valued S2 and zeros (o, n_g), s1 (o,)."""
    codes = dual_grained_codes(w.float(), zero.float(), s2, s1.float())
    return DualGrainedWeight(
        codes=codes.reshape(w.shape).to(torch.uint8),
        zero=zero.to(torch.uint8),
        s2=s2.to(torch.int8),
        s1=s1.float(),
    )


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(o, h) codes in [0, 15] -> (o, h / 2) uint8; input feature 2i in the low nibble, 2i+1 high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: (o, h / 2) uint8 -> (o, h) uint8."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def format_violations(weight: QuantizedWeight) -> list[str]:
    """Everything that makes a packed weight illegal; empty when it is a valid DGQ / group weight."""
    problems = []
    o, h = weight.codes.shape
    if weight.zero.shape != (o, h // max(weight.group, 1)) or h % max(weight.group, 1):
        problems.append(f"zero points of shape {tuple(weight.zero.shape)} do not fit codes {(o, h)}")
        return problems
    if int(weight.codes.max()) > CODE_MAX or int(weight.zero.max()) > CODE_MAX:
        problems.append("codes or zero points outside [0, 15]")
    if isinstance(weight, DualGrainedWeight):
        if weight.s2.shape != weight.zero.shape or weight.s1.shape != (o,):
            problems.append("scale shapes do not fit the codes")
            return problems
        if int(weight.s2.min()) < 1:
            problems.append("int8 group scale S2 below 1")
        levels = grouped(weight.codes.to(torch.int32), weight.group) - weight.zero.to(torch.int32).unsqueeze(-1)
        if int((levels * weight.s2.to(torch.int32).unsqueeze(-1)).abs().max()) > INT8_MAX:
            problems.append("|S2 * (code - zp)| exceeds 127")
        scales = weight.s1
    else:
        scales = weight.scale
    if not torch.isfinite(scales.float()).all() or bool((scales.float() <= 0).any()):
        problems.append("non-finite or non-positive float scales")
    return problems


def random_dual_grained(o: int, h: int, group: int, generator: torch.Generator | None = None) -> DualGrainedWeight:
    """A valid DGQ weight with random codes, zero points and scales (kernel tests and benchmarks)."""
    n_g = h // group
    s2 = torch.randint(1, 17, (o, n_g), generator=generator).to(torch.int8)
    zero = torch.randint(0, CODE_MAX + 1, (o, n_g), generator=generator).to(torch.uint8)
    lo, hi = code_interval(zero, s2)
    raw = torch.randint(0, CODE_MAX + 1, (o, n_g, group), generator=generator).to(torch.uint8)
    codes = torch.minimum(torch.maximum(raw, lo.unsqueeze(-1)), hi.unsqueeze(-1)).reshape(o, h)
    s1 = torch.rand(o, generator=generator) * 1e-3 + 1e-4
    return DualGrainedWeight(codes, zero, s2, s1)
