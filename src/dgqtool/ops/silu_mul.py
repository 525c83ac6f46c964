"""`dgq::silu_mul_linear`: dgq::linear of silu(gate) * up, for down_proj of a gated MLP.

x is the fused gate/up output (M, 2K) = [gate | up]; the MLP's activation is computed inside
down_proj's activation quantizer, so it is never written to memory nor read back (on a GPU: one
kernel instead of silu, the product and the quantizer). The default implementation is `silu_mul`
(transformers' act_fn(gate) * up, op for op: bit-identical to the model's own on the same device)
then dgq::linear. On CUDA the kernel computes silu in float32 as torch's kernel does (the accurate
expf, IEEE division) with the same two roundings to x's dtype, so its codes are those of the torch
ops on that GPU. The C++ kernel (kernels/dgq_torch_ops.cpp) takes the GEMV and tensor-core paths,
its Python kernel below the rest.
"""

from __future__ import annotations

import torch

from ..kernels import runtime
from .linear import _kernel_library, define_kernel_op, linear


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[gate | up] (..., 2K) -> silu(gate) * up (..., K), as the model computes act_fn(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _reference(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale=None, w_s8=None):
    return linear(silu_mul(x), qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8)


def _cuda(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale=None, w_s8=None):
    lib = _kernel_library(x, group)
    if lib is None or x.shape[0] == 0 or not runtime.silu_mul_fusable(x):
        return _reference(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8)
    return runtime.dgq_linear(lib, x, qweight, scales_s2, qzeros, scales_s1, group, input_scale, silu_mul=True)


def _fake(x, qweight, *rest):
    return x.new_empty(x.shape[0], qweight.shape[0])


_LIBRARY = torch.library.Library("dgq", "FRAGMENT")  # "dgq" itself is defined by ops/linear.py
silu_mul_linear, silu_mul_linear_python = define_kernel_op(
    _LIBRARY, "silu_mul_linear", "(Tensor x, Tensor qweight, Tensor scales_s2, Tensor qzeros, Tensor scales_s1, "
    "int group, Tensor? input_scale=None, Tensor? w_s8=None) -> Tensor", _reference, _cuda, _fake)
