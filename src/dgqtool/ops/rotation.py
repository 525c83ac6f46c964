"""`dgq::hadamard_rows`: the online input rotation of a Sylvester-only FactoredHadamard, x (M, K)
-> x Q in x's dtype, Q = diag(signs) blockdiag(S_t) / sqrt(t) with signs +-1; and
`dgq::rotated_linear`: dgq::linear of x Q, which the C++ kernel (kernels/dgq_torch_ops.cpp) runs
with the rotation fused into the activation quantizer on the GEMV and tensor-core paths (x Q never
goes to memory); its Python kernel rotates, then calls dgq::linear.

The default implementation is FactoredHadamard.apply (torch ops, float32). On CUDA the fused
kernel (dgq_hadamard_rows) computes the same float32 butterflies in the same order, bit-identical,
where the library is available and the row has at most 64 blocks of t; elsewhere the torch ops
run. As an op (with a fake implementation) it is one opaque node to torch.compile and CUDA graphs,
where a ctypes call from the module's forward would break the graph.
"""

from __future__ import annotations

import torch

from ..kernels import runtime
from ..quant.rotate import FactoredHadamard
from .linear import define_kernel_op, linear

MAX_FUSED_BLOCKS = 64  # what one launch of the fused kernel covers at every M (8 warps x 8 blocks)


def reference(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    return FactoredHadamard(signs, torch.ones(1, 1, dtype=torch.float64), block).apply(x)


def _cuda(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    lib = runtime.library_for(x)
    if lib is None or x.shape[0] == 0 or block not in runtime.HADAMARD_ORDERS or x.shape[1] // block > MAX_FUSED_BLOCKS:
        return reference(x, signs, block)
    return runtime.hadamard_rows(lib, x, signs.float().contiguous(), block)  # a no-op for the stored float32 signs


_LIBRARY = torch.library.Library("dgq", "FRAGMENT")  # "dgq" itself is defined by ops/linear.py
_LIBRARY.define("hadamard_rows(Tensor x, Tensor signs, int block) -> Tensor")
_LIBRARY.impl("hadamard_rows", reference, "CPU")
_LIBRARY.impl("hadamard_rows", _cuda, "CUDA")
torch.library.register_fake("dgq::hadamard_rows", lambda x, signs, block: torch.empty_like(x), lib=_LIBRARY)
hadamard_rows = torch.ops.dgq.hadamard_rows.default


def _rotated_reference(x, signs, block, qweight, scales_s2, qzeros, scales_s1, group, input_scale=None, w_s8=None):
    return linear(hadamard_rows(x, signs, block), qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8)


def _rotated_fake(x, signs, block, qweight, *rest):
    return x.new_empty(x.shape[0], qweight.shape[0])


rotated_linear, _ = define_kernel_op(
    _LIBRARY, "rotated_linear", "(Tensor x, Tensor signs, int block, Tensor qweight, Tensor scales_s2, Tensor qzeros, "
    "Tensor scales_s1, int group, Tensor? input_scale=None, Tensor? w_s8=None) -> Tensor",
    _rotated_reference, _rotated_reference, _rotated_fake)
