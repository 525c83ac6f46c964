"""The one narrow kernel function every DGQ linear calls.

    out[m, n] = s_x[m] * s1[n] * sum_k x_q[m, k] * w_s8[n, k]      (int32 accumulation)

On CPU (and wherever the CUDA kernels of dgqtool.kernels do not apply) this is the integer reference
path: a plain int8 x int8 -> int32 matmul followed by the fp scale epilogue, which the kernels match.
"""

from __future__ import annotations

import torch

# cuBLAS int8 GEMM wants more than 16 rows and K, N multiples of 8.
_CUDA_MIN_ROWS = 17
# A float GEMM of int8 operands is exact while every partial sum, an integer of magnitude at most
# K * 128^2, fits the mantissa: K < 2^10 in fp32, K < 2^39 in fp64.
_FP32_EXACT_K = 2**24 // 128**2


def int8_matmul(x_q: torch.Tensor, w_s8: torch.Tensor) -> torch.Tensor:
    """x_q (M, K) int8 @ w_s8 (N, K)^T int8 -> (M, N) int32, exact."""
    if x_q.device.type == "cuda":
        m, k = x_q.shape
        if k % 8 or w_s8.shape[0] % 8:
            return (x_q.double() @ w_s8.double().T).to(torch.int32)  # exact: |sum| << 2^53
        if m < _CUDA_MIN_ROWS:
            padded = torch.zeros(_CUDA_MIN_ROWS, k, dtype=torch.int8, device=x_q.device)
            padded[:m] = x_q
            return torch._int_mm(padded, w_s8.T)[:m]
        return torch._int_mm(x_q.contiguous(), w_s8.T)  # cuBLAS's int8 GEMM takes no transposed x
    # On CPU, BLAS float GEMMs run several times faster than torch's int8 one, and are exact here.
    dtype = torch.float32 if x_q.shape[1] < _FP32_EXACT_K else torch.float64
    return (x_q.to(dtype) @ w_s8.to(dtype).T).to(torch.int32)


def dual_scale_gemm(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_s8: torch.Tensor, s1: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """x_q (M, K) int8, x_scale (M, 1) fp32, w_s8 (N, K) int8, s1 (N,) -> (M, N) out_dtype."""
    acc = int8_matmul(x_q, w_s8)
    return (acc.float() * x_scale * s1.float().unsqueeze(0)).to(out_dtype)
