"""`dgq::norm_linear`: dgq::linear of RMSNorm(x), for the linears that read a norm's output.

The activation quantizer already reads the whole row; with the norm fused into it, the normalized
activation is never written to memory nor read back (on a GPU: one kernel instead of the norm's
and the quantizer's). The default implementation is `rms_norm` (transformers' LlamaRMSNorm, op for
op: bit-identical to it on the CPU) then dgq::linear. On CUDA the kernel computes the same
roundings with its own sum of squares, whose order may move rsqrt(mean(x^2) + eps) by a few ulp
(runtime.rmsnorm_quantize_rows reports the value it used, which the tests check exactly). The C++
kernel (kernels/dgq_torch_ops.cpp) takes the GEMV and tensor-core paths; its Python kernel below
the rest.
"""

from __future__ import annotations

import torch

from ..kernels import runtime
from .linear import _kernel_library, define_kernel_op, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward (and its Mistral / Qwen copies), op for op."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _reference(x, weight, eps, qweight, scales_s2, qzeros, scales_s1, group, input_scale=None, w_s8=None):
    return linear(rms_norm(x, weight, eps), qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8)


def _cuda(x, weight, eps, qweight, scales_s2, qzeros, scales_s1, group, input_scale=None, w_s8=None):
    lib = _kernel_library(x, group)
    if lib is None or x.shape[0] == 0 or not runtime.norm_fusable(x, weight):
        return _reference(x, weight, eps, qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8)
    return runtime.dgq_linear(lib, x, qweight, scales_s2, qzeros, scales_s1, group, input_scale, norm=(weight, eps))


def _fake(x, weight, eps, qweight, *rest):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.promote_types(x.dtype, weight.dtype))


_LIBRARY = torch.library.Library("dgq", "FRAGMENT")  # "dgq" itself is defined by ops/linear.py
norm_linear, norm_linear_python = define_kernel_op(
    _LIBRARY, "norm_linear", "(Tensor x, Tensor weight, float eps, Tensor qweight, Tensor scales_s2, Tensor qzeros, "
    "Tensor scales_s1, int group, Tensor? input_scale=None, Tensor? w_s8=None) -> Tensor", _reference, _cuda, _fake)
