"""`dgq::linear`: one DGQ linear without bias, x (M, K) float -> (M, N) in x's dtype.

The default implementation (CPU and any device the kernels do not cover) is the integer
reference: int8 activations per token (or with the static scale), the exact int8 weight
S2 * (code - zp), int32 accumulation, then s_x * s1. The caller may pass that int8 weight when it
holds one (DGQLinear caches it), else it is expanded from the packed codes on each call. On CUDA
the kernel library runs it (below), computing the same integers and the same fp32 epilogue. The
fake implementation gives shapes to torch.compile.

Registered through the low-level `torch.library.Library`, not `torch.library.custom_op`: the
latter's Python wrapper (autograd shim, alias checks) costs about 10 us per call on the host,
more than the M = 1 kernels themselves (scripts/bench_dispatch.py); eager decode pays it per linear.

On CUDA the first call loads the C++ kernel (kernels/dgq_torch_ops.cpp, built once per torch and
cached; DGQ_NATIVE_OPS=0 keeps the Python one): it runs the GEMV and tensor-core paths without
returning to Python, asks `dgq::plan` (runtime.native_plan) once per shape bucket which path to
take, and hands every other path to `dgq::linear_python`, the Python kernel below.
"""

from __future__ import annotations

import os
import subprocess
import warnings

import torch

from ..errors import DGQError
from ..format import WEIGHT_FORMATS
from ..gemm import dual_scale_gemm
from ..kernels import build, runtime
from ..quant.quantizer import quantize_per_tensor, quantize_per_token

KERNEL_WORD = 32  # the kernels read the codes of a group in 32-code words
ARGUMENTS = ("(Tensor x, Tensor qweight, Tensor scales_s2, Tensor qzeros, Tensor scales_s1, int group, "
             "Tensor? input_scale=None, Tensor? w_s8=None) -> Tensor")


def reference(x: torch.Tensor, qweight: torch.Tensor, scales_s2: torch.Tensor, qzeros: torch.Tensor,
              scales_s1: torch.Tensor, group: int, input_scale: torch.Tensor | None = None,
              w_s8: torch.Tensor | None = None) -> torch.Tensor:
    if w_s8 is None:
        packed = {"qweight": qweight, "qzeros": qzeros, "scales_s2": scales_s2, "scales_s1": scales_s1}
        w_s8 = WEIGHT_FORMATS["dgq"].decode(packed).int8_weight()
    x_q, s_x = quantize_per_token(x) if input_scale is None else quantize_per_tensor(x, input_scale)
    return dual_scale_gemm(x_q, s_x, w_s8, scales_s1, x.dtype)


def _kernel_library(x: torch.Tensor, group: int) -> runtime.KernelLibrary | None:
    """The library that runs x at this group size, or None: the integer reference runs it."""
    return runtime.library_for(x) if group > 0 and group % KERNEL_WORD == 0 else None


def _cuda(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale=None, w_s8=None):
    lib = _kernel_library(x, group)
    if lib is None:
        return reference(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale, w_s8)
    return runtime.dgq_linear(lib, x, qweight, scales_s2, qzeros, scales_s1, group, input_scale)


def _fake(x, qweight, scales_s2, qzeros, scales_s1, group, input_scale=None, w_s8=None):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _plan(x, qweight, group, is_static):
    lib = _kernel_library(x, group)
    return [0] if lib is None else runtime.native_plan(lib, x, qweight.shape[0])


def define_kernel_op(lib: torch.library.Library, name: str, arguments: str, reference, python_kernel, fake):
    """Define dgq::<name> and its twin dgq::<name>_python: CPU kernel `reference`; CUDA kernel, until
    the C++ kernels are loaded (which its first call attempts, once per process; they then take the
    op's CUDA key), `python_kernel`, which also stays where they cannot be loaded or do not cover
    the op, and is the twin's CUDA kernel (A/B timing, tests); shapes from `fake`. Returns both ops."""
    twin = f"{name}_python"
    lib.define(name + arguments)
    lib.define(twin + arguments)
    reentered = False

    def first_cuda_call(*args):
        nonlocal reentered
        if reentered or not load_native():
            return python_kernel(*args)
        reentered = True  # loaded: the op dispatches to the C++ kernel, unless it did not take the key
        try:
            return getattr(torch.ops.dgq, name).default(*args)
        finally:
            reentered = False

    lib.impl(name, reference, "CPU")
    lib.impl(name, first_cuda_call, "CUDA")
    lib.impl(twin, python_kernel, "CUDA")
    for op in (name, twin):
        torch.library.register_fake(f"dgq::{op}", fake, lib=lib)
    return getattr(torch.ops.dgq, name).default, getattr(torch.ops.dgq, twin).default


_LIBRARY = torch.library.Library("dgq", "DEF")  # kept: the registrations live as long as this object
_LIBRARY.define("plan(Tensor x, Tensor qweight, int group, bool is_static) -> int[]")
_LIBRARY.impl("plan", _plan, "CUDA")
linear, linear_python = define_kernel_op(_LIBRARY, "linear", ARGUMENTS, reference, _cuda, _fake)
_native: bool | None = None


def load_native() -> bool:
    """Make the C++ kernel dgq::linear's CUDA kernel (once per process); False where it cannot be
    built or loaded (with a warning), or DGQ_NATIVE_OPS=0, and the Python kernel stays."""
    global _native
    if _native is None:
        _native = False
        if os.environ.get("DGQ_NATIVE_OPS", "1") == "0":
            return False
        try:
            path = build.build_torch_ops(log=lambda _msg: None)
            with warnings.catch_warnings():  # registered after the Python kernel, it takes the key's dispatch
                warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
                torch.ops.load_library(str(path))
        except (DGQError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(f"dgq::linear's C++ kernel unavailable ({str(exc).splitlines()[0]}); using its Python kernel")
            return False
        _native = True
    return _native
