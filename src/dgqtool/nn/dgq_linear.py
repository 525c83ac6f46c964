"""Modules that replace nn.Linear in a quantized model: DGQ (integer path) and the group-wise
baseline format (fake-quantized float path). Both quantize activations to int8 per token, or with
a static per-tensor scale when the checkpoint carries one, after the online rotation of their
input where the checkpoint records one."""

from __future__ import annotations

import torch
from torch import nn

from ..format import INPUT_SCALE, ONLINE_PALEY, ONLINE_SIGNS, SCALE_DTYPE, WEIGHT_FORMATS, WeightFormat, format_of
from .. import ops
from ..quant.dual_grained import DualGrainedWeight, GroupWeight
from ..quant.quantizer import quantize_per_tensor, quantize_per_token
from ..quant.rotate import FactoredHadamard

__all__ = ["DGQLinear", "FORMATS", "GroupW4A8Linear", "format_of"]  # format_of: imported from here by the stages


class _W4A8Linear(nn.Module):
    """The format's packed buffers, an optional static input scale, bias and online input rotation
    (online: its (Paley order, Sylvester order)), and activation quant."""

    FORMAT: WeightFormat

    def __init__(self, in_features: int, out_features: int, group: int, bias: bool = False, static: bool = False,
                 dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = SCALE_DTYPE,
                 online: tuple[int, int] | None = None):
        super().__init__()
        if group <= 0 or in_features % group or in_features % 2:
            raise ValueError(f"group {group} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.scale_dtype = scale_dtype  # of the float scales: fp16 in dgq checkpoints, an export's own dtype
        for name, tensor in self.FORMAT.empty(out_features, in_features, group, scale_dtype).items():
            self.register_buffer(name, tensor)
        self.register_buffer(INPUT_SCALE, torch.ones(1, dtype=torch.float32) if static else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        paley, self.sylvester_order = online or (None, 0)
        if online is not None and in_features % (paley * self.sylvester_order):
            raise ValueError(f"online rotation blocks of {paley} x {self.sylvester_order} do not divide {in_features}")
        # float32 whatever the default dtype (transformers builds modules under the model's dtype)
        self.register_buffer(ONLINE_SIGNS, torch.ones(in_features, dtype=torch.float32) if online else None)
        self.register_buffer(ONLINE_PALEY, torch.ones(paley, paley, dtype=torch.float32) if online else None)
        self._cache: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight, bias, input_scale, dtype, online: FactoredHadamard | None = None):
        o, h = weight.codes.shape
        orders = None if online is None else (online.paley.shape[0], online.sylvester_order)
        module = cls(h, o, weight.group, bias is not None, input_scale is not None, dtype, online=orders)
        module.load_quantized(weight, bias, input_scale, online)
        return module

    @torch.no_grad()
    def load_quantized(self, weight, bias, input_scale, online: FactoredHadamard | None = None) -> None:
        for name, tensor in self.FORMAT.encode(weight, torch.float32).items():
            getattr(self, name).copy_(tensor)  # one rounding, to the buffer's dtype
        if bias is not None:
            self.bias.copy_(bias)
        if input_scale is not None:
            self.input_scale.copy_(input_scale)
        if online is not None:
            self.online_signs.copy_(online.signs)
            self.online_paley.copy_(online.paley)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """x Q where the module has an online rotation (in float32, back to x's dtype), else x. A
        Sylvester-only rotation is one op (ops/rotation.py: the fused kernel on a GPU, bit-identical)."""
        signs, paley = self._buffers[ONLINE_SIGNS], self._buffers[ONLINE_PALEY]
        if signs is None:
            return x
        if paley.shape[0] == 1:
            return ops.hadamard_rows(x.reshape(-1, self.in_features), signs, self.sylvester_order).view(x.shape)
        return FactoredHadamard(signs, paley, self.sylvester_order).apply(x)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = x.reshape(-1, self.in_features)
        return quantize_per_token(x2) if self.input_scale is None else quantize_per_tensor(x2, self.input_scale)

    def quantized_weight(self) -> DualGrainedWeight | GroupWeight:
        return self.FORMAT.decode({name: getattr(self, name) for name in self.FORMAT.names()})

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bias = self._buffers["bias"]
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self._cache = None  # device/dtype moves invalidate the unpacked weight
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        mode = "static" if self.input_scale is not None else "dynamic"
        online = "" if self.online_signs is None else f", online={self.online_paley.shape[0]}x{self.sylvester_order}"
        return f"in={self.in_features}, out={self.out_features}, group={self.group}, act={mode}{online}"


class DGQLinear(_W4A8Linear):
    """W4A8 DGQ: int8 GEMM on S2 * (codes - zp), epilogue s_x * s1."""

    FORMAT = WEIGHT_FORMATS["dgq"]

    def int8_weight(self) -> torch.Tensor:
        if self._cache is None:
            self._cache = self.quantized_weight().int8_weight()
        return self._cache

    def _op_arguments(self, x: torch.Tensor) -> tuple:
        # off CUDA the op runs the integer reference, on the int8 weight expanded once and kept
        w_s8 = None if x.is_cuda else self.int8_weight()
        b = self._buffers  # one dict lookup, not nn.Module.__getattr__ per buffer: eager decode is host-bound
        return b["qweight"], b["scales_s2"], b["qzeros"], b["scales_s1"], self.group, b[INPUT_SCALE], w_s8

    def forward_normed(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """forward(RMSNorm(x)), the norm (ops.rms_norm) fused into the activation quantizer."""
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        return self._finish(ops.norm_linear(x2, norm_weight, eps, *self._op_arguments(x)), x)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) of x = [gate | up] (..., 2 in_features), the gated MLP's activation
        (ops.silu_mul) fused into the activation quantizer."""
        x2 = x if x.dim() == 2 else x.reshape(-1, 2 * self.in_features)
        return self._finish(ops.silu_mul_linear(x2, *self._op_arguments(x)), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        weight = self._op_arguments(x)
        signs = b[ONLINE_SIGNS]
        if signs is None:
            out = ops.linear(x2, *weight)
        elif b[ONLINE_PALEY].shape[0] == 1:  # on a GPU the rotation runs inside the activation quantizer
            out = ops.rotated_linear(x2, signs, self.sylvester_order, *weight)
        else:
            out = ops.linear(self.rotate_input(x2), *weight)
        return self._finish(out, x)


class GroupW4A8Linear(_W4A8Linear):
    """Baseline formats (rtn, groupwise, channelwise): float scale per group, fake-quantized matmul."""

    FORMAT = WEIGHT_FORMATS["w4-group"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            self._cache = self.quantized_weight().dequantize()
        x_q, s_x = self.quantize_input(self.rotate_input(x))
        out = (x_q.float() * s_x) @ self._cache.T
        return self._finish(out.to(x.dtype), x)


FORMATS: dict[str, type[_W4A8Linear]] = {m.FORMAT.name: m for m in (DGQLinear, GroupW4A8Linear)}
