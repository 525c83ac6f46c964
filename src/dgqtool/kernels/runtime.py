"""Call the kernel library on torch tensors (ctypes; the current torch stream, torch allocations).

Dispatch of one DGQ linear on a CUDA tensor:
  * activations -> int8 per token (or with the static scale) by one kernel, the RMSNorm that
    produced them fused in where the caller hands its weight over (ops.norm_linear), or the MLP's
    silu(gate) * up from the fused gate/up output (ops.silu_mul_linear);
  * M = 1: the fused GEMV streams the 4-bit codes and converts them in registers (dp4a);
  * small and mid M: the fused tensor-core kernel converts the codes in registers into mma.sync's
    A operand (no int8 weight ever reaches memory);
  * sm90, mid and large M where it measured faster: the fused register-sourced wgmma kernel
    (kernels/dgq_wgmma_sm90.cuh): the codes are converted in registers into wgmma's A operand, the
    tokens (quantized straight into the kernel's permuted order) are B, split-K where tiles are few;
  * otherwise at large M: the codes are expanded to the exact int8 weight (IMAD + XOR per 4 weights), then the
    CUTLASS-emitted GEMM with the s_x x s1 epilogue runs (sm90: TMA warp-specialized; sm80+:
    multistage with the 2.x visitor tree).
The path and its tile configuration per (M bucket, N, K) come from kernels/tuned_sm90.json
(scripts/bench_gemm.py --tune), with the defaults below for shapes it does not list.
Every path computes the same integers as the torch reference, and the same fp32 epilogue order.
"""

from __future__ import annotations

import ctypes
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import DGQError
from . import build

# Defaults for untuned shapes (H100, scripts/bench_gemm.py): the GEMV (channels per warp, steps in
# flight per lane) for one token, the tensor-core kernel (channel tiles per warp, warps per block)
# up to MMA_MAX_ROWS.
GEMV_DEFAULT = (2, 2)
GEMV_CONFIGS = [(2, 1), (2, 2), (2, 4), (1, 8), (4, 2)]
MMA_MAX_ROWS = 64
MMA_DEFAULT = (1, 8)
MMA_CONFIGS = [(1, 4), (1, 8), (2, 4), (2, 8)]
MMA_WIDE = (1, 16)  # 16 warps per block: built for up to 16 tokens only (register cap)
# The fused wgmma kernel: (block channels, block tokens, stages, cluster, splits); the first four
# name an instantiation (kernels/generate.py WGMMA_VARIANTS), splits is a launch argument (0: chosen here).
WGMMA_COUNTERS = 1 << 16  # split-K tile counters per device (zero between launches)
_OUT_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}
_IN_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
_ERRORS = {1: "shape not supported", 2: "workspace too small", 3: "CUDA launch failed"}


def mma_configs(m: int) -> list[tuple[int, int]]:
    """The tensor-core kernel's configurations for M tokens."""
    return MMA_CONFIGS + [MMA_WIDE] if m <= 16 else MMA_CONFIGS


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


class KernelLibrary:
    def __init__(self, path: Path, arch: str):
        self.arch, self.lib = arch, ctypes.CDLL(str(path))
        ptr, i32, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        self._sig("dgq_unpack_s8", [ptr, ptr, ptr, ptr, i32, i32, i32, ptr])
        for suffix in _OUT_SUFFIX.values():
            self._sig(f"dgq_gemv_{suffix}", [ptr] * 7 + [i32] * 5 + [ptr])
            self._sig(f"dgq_mma_{suffix}", [ptr] * 7 + [i32] * 6 + [ptr])
        for suffix in _IN_SUFFIX.values():
            self._sig(f"dgq_quantize_rows_{suffix}", [ptr] * 4 + [i32, i32, ptr])
            self._sig(f"dgq_quantize_rows_perm_{suffix}", [ptr] * 4 + [i32, i32, ptr])
        self._sig("dgq_permute_s8", [ptr, ptr, i32, i32, ptr])
        for suffix in _OUT_SUFFIX.values():
            self._sig(f"dgq_hadamard_quantize_rows_{suffix}", [ptr] * 5 + [i32] * 3 + [ptr])
            self._sig(f"dgq_hadamard_rows_{suffix}", [ptr] * 3 + [i32] * 3 + [ptr])
            for order in ("", "perm_"):
                self._sig(f"dgq_rmsnorm_quantize_rows_{order}{suffix}",
                          [ptr, ptr, ctypes.c_float] + [ptr] * 4 + [i32, i32, ptr])
                self._sig(f"dgq_silu_mul_quantize_rows_{order}{suffix}", [ptr] * 4 + [i32, i32, ptr])
        listing = path.parent / "wgmma_variants.json"
        self.wgmma_variants = [(128 * v["mt"], v["bn"], v["stages"], v["cluster"])
                               for v in json.loads(listing.read_text())] if listing.is_file() else []
        for bm, bn, stages, cluster in self.wgmma_variants:
            for suffix in _OUT_SUFFIX.values():
                self._sig(f"dgq_wgmma_w{bm}x{bn}_s{stages}_c{cluster}_{suffix}", [ptr] * 9 + [i32] * 5 + [ptr])
        self.gemm_variants = [v["name"] for v in json.loads(
            (path.parent / "variants.json").read_text())] if build.uses_cutlass(arch) else []
        for name in self.gemm_variants:
            for suffix in _OUT_SUFFIX.values():
                self._sig(f"dgq_gemm_{name}_{suffix}", [ptr] * 5 + [i32] * 3 + [ptr, size, ptr])
                fn = getattr(self.lib, f"dgq_gemm_{name}_{suffix}_workspace")
                fn.argtypes, fn.restype = [i32] * 3, size
        self.tuned, self.paths = _tuned_table()

    def _sig(self, name: str, argtypes: list) -> None:
        fn = getattr(self.lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int

    def call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status:
            raise RuntimeError(f"{name}: {_ERRORS.get(status, status)}")


def _tuned_table() -> tuple[dict[str, str], dict[str, list]]:
    """Per-shape GEMM variant and path choices measured by scripts/bench_gemm.py --tune (H100)."""
    path = build.source_dir() / "tuned_sm90.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    return table.get("choice", {}), table.get("paths", {})


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


@lru_cache(maxsize=None)
def library_for_arch(arch: str) -> KernelLibrary | None:
    """The library built for `arch` (an Ampere build also runs on Hopper, through its PTX)."""
    try:
        return KernelLibrary(build.build(arch, log=lambda _msg: None), arch)
    except (DGQError, OSError) as exc:
        warnings.warn(f"DGQ CUDA kernels unavailable ({exc}); using the torch integer reference path")
        return None


def library_for(x: torch.Tensor) -> KernelLibrary | None:
    """The kernel library for x's GPU, or None when x must take the reference path."""
    if not x.is_cuda or x.dtype not in _OUT_SUFFIX or os.environ.get("DGQ_KERNELS", "1") == "0" or x.shape[-1] % 32:
        return None
    return _library_at(x.get_device())


@lru_cache(maxsize=None)
def _library_at(index: int) -> KernelLibrary | None:
    # per call, the capability lookups behind library() cost several microseconds of host time
    return library(torch.device("cuda", index))


def library(device: torch.device) -> KernelLibrary | None:
    """The kernel library for a CUDA device (sm_80 or newer), built on first use; None if unavailable."""
    if torch.cuda.get_device_capability(device) < (8, 0):
        return None
    return library_for_arch(arch_of(device))


def _stream(device: torch.device) -> int:
    """The current stream's handle; the raw lookup skips building a torch.cuda.Stream per launch."""
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


def _quantizer_buffers(x: torch.Tensor, static_scale: torch.Tensor | None, permuted: bool = False,
                       features: int | None = None):
    """x made contiguous, the int8 codes (M, K; permuted: the wgmma order, K padded to 128) and
    float32 scales (M, 1) a quantizer kernel fills, and the static scale as float32 (or None);
    K = features, the quantized row's width, where it is not x's (silu * mul halves it)."""
    x = x.contiguous()
    k = x.shape[1] if features is None else features
    q = torch.empty(x.shape[0], _padded(k) if permuted else k, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    return x, q, scale, None if static_scale is None else static_scale.float().contiguous()


def quantize_rows(lib: KernelLibrary, x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """(M, K) float -> int8 codes (M, K) and float32 scales (M, 1), as quantize_per_token/_per_tensor."""
    x, q, scale, static = _quantizer_buffers(x, static_scale)
    lib.call(f"dgq_quantize_rows_{_IN_SUFFIX[x.dtype]}", x.data_ptr(), q.data_ptr(), scale.data_ptr(),
             None if static is None else static.data_ptr(), *x.shape, _stream(x.device))
    return q, scale


NORM_MAX_FEATURES = 65536  # the fused norm needs the row in registers (8 loads of 16 bytes a thread)


def norm_fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rmsnorm_quantize_rows takes x (M, K) with this norm weight (read in 16-byte loads)."""
    return (x.dtype in _OUT_SUFFIX and weight.dtype == x.dtype and weight.device == x.device
            and weight.shape == (x.shape[-1],) and weight.is_contiguous() and weight.data_ptr() % 16 == 0
            and x.shape[-1] % 32 == 0 and x.shape[-1] <= NORM_MAX_FEATURES)


def rmsnorm_quantize_rows(lib: KernelLibrary, x: torch.Tensor, weight: torch.Tensor, eps: float,
                          static_scale: torch.Tensor | None = None, permuted: bool = False,
                          inv_rms: torch.Tensor | None = None):
    """(M, K) fp16/bf16 -> the codes and scales of quantize_rows (or quantize_rows_permuted) of
    RMSNorm(x) = weight * (x * rsqrt(mean(x^2) + eps)) in one kernel, rounded as transformers'
    LlamaRMSNorm rounds (the product to x's dtype, then times weight in x's dtype); norm_fusable(x,
    weight) must hold. inv_rms (M,) float32, if given, receives each row's rsqrt(mean(x^2) + eps)."""
    x, q, scale, static = _quantizer_buffers(x, static_scale, permuted)
    lib.call(f"dgq_rmsnorm_quantize_rows_{'perm_' if permuted else ''}{_OUT_SUFFIX[x.dtype]}", x.data_ptr(),
             weight.data_ptr(), eps, q.data_ptr(), scale.data_ptr(),
             None if static is None else static.data_ptr(), None if inv_rms is None else inv_rms.data_ptr(), *x.shape,
             _stream(x.device))
    return q, scale


def silu_mul_fusable(x: torch.Tensor) -> bool:
    """Whether silu_mul_quantize_rows takes x (M, 2K) = [gate | up]."""
    return x.dtype in _OUT_SUFFIX and x.shape[-1] % 64 == 0 and x.shape[-1] // 2 <= NORM_MAX_FEATURES


def silu_mul_quantize_rows(lib: KernelLibrary, x: torch.Tensor, static_scale: torch.Tensor | None = None,
                           permuted: bool = False):
    """(M, 2K) fp16/bf16 [gate | up] -> the codes and scales of quantize_rows (or quantize_rows_permuted)
    of silu(gate) * up, (M, K), in one kernel, rounded as torch's ops round act_fn(gate) * up (each
    result to x's dtype); silu_mul_fusable(x) must hold."""
    m, k = x.shape[0], x.shape[1] // 2
    x, q, scale, static = _quantizer_buffers(x, static_scale, permuted, features=k)
    lib.call(f"dgq_silu_mul_quantize_rows_{'perm_' if permuted else ''}{_OUT_SUFFIX[x.dtype]}", x.data_ptr(),
             q.data_ptr(), scale.data_ptr(), None if static is None else static.data_ptr(), m, k, _stream(x.device))
    return q, scale


def hadamard_quantize_rows(lib: KernelLibrary, x: torch.Tensor, signs: torch.Tensor, block: int,
                           static_scale: torch.Tensor | None = None):
    """(M, K) fp16/bf16 -> int8 codes (M, K) and float32 scales (M, 1) of x Q, Q the online rotation
    in Sylvester blocks of `block` (64, 128 or 256) features with signs s (+-1, float32; the kernel
    scales them by block ** -0.5 as FactoredHadamard.apply does):
    quantize_per_token(FactoredHadamard.apply(x)) in one kernel (x Q rounded to x's dtype first)."""
    x, q, scale, static = _quantizer_buffers(x, static_scale)
    lib.call(f"dgq_hadamard_quantize_rows_{_OUT_SUFFIX[x.dtype]}", x.data_ptr(), signs.data_ptr(), q.data_ptr(),
             scale.data_ptr(), None if static is None else static.data_ptr(), *x.shape, block, _stream(x.device))
    return q, scale


HADAMARD_ORDERS = (64, 128, 256)  # the Sylvester blocks the fused rotation kernels take


def hadamard_rows(lib: KernelLibrary, x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """(M, K) fp16/bf16 -> x Q in x's dtype, Q as in hadamard_quantize_rows: bit-identical to
    FactoredHadamard.apply(x) for a Sylvester-only rotation (rotated in float32, rounded once)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.call(f"dgq_hadamard_rows_{_OUT_SUFFIX[x.dtype]}", x.data_ptr(), signs.data_ptr(), out.data_ptr(),
             x.shape[0], x.shape[1], block, _stream(x.device))
    return out


def unpack_s8(lib: KernelLibrary, qweight: torch.Tensor, s2: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Packed codes (N, K/2) -> exact int8 weight S2 * (code - zp), (N, K)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty(n, k, dtype=torch.int8, device=qweight.device)
    lib.call("dgq_unpack_s8", qweight.data_ptr(), s2.data_ptr(), zero.data_ptr(), w.data_ptr(), n, k, group,
             _stream(qweight.device))
    return w


def gemm_variant(lib: KernelLibrary, m: int, n: int, k: int) -> str:
    bucket = _bucket(m)
    choice = lib.tuned.get(f"{bucket},{n},{k}")
    if choice in lib.gemm_variants:
        return choice
    if not lib.arch.startswith("sm_90"):
        return lib.gemm_variants[0]
    if bucket <= 256:
        return "pi_128x128x128_c1x1"
    return "co_128x256x128_c2x1" if n >= k else "co_256x128x128_c1x1"


@lru_cache(maxsize=4096)
def _workspace_bytes(lib: KernelLibrary, name: str, m: int, n: int, k: int) -> int:
    return getattr(lib.lib, name + "_workspace")(m, n, k)  # builds the kernel arguments: not per call


def int8_gemm(lib: KernelLibrary, x_q, s_x, w_s8, s1, out_dtype, variant: str | None = None) -> torch.Tensor:
    """Emitted CUTLASS GEMM: (x_q @ w_s8^T) * s_x * s1 -> out_dtype; x_q (M, K), w_s8 (N, K) int8."""
    m, k = x_q.shape
    n = w_s8.shape[0]
    name = f"dgq_gemm_{variant or gemm_variant(lib, m, n, k)}_{_OUT_SUFFIX[out_dtype]}"
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    workspace = torch.empty(_workspace_bytes(lib, name, m, n, k), dtype=torch.uint8, device=x_q.device)
    lib.call(name, x_q.data_ptr(), w_s8.data_ptr(), s_x.data_ptr(), s1.data_ptr(), out.data_ptr(), m, n, k,
             workspace.data_ptr(), workspace.numel(), _stream(x_q.device))
    return out


def quantize_rows_permuted(lib: KernelLibrary, x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """As quantize_rows, but the codes in the fused wgmma kernel's order: (M, K padded to 128) int8."""
    x, q, scale, static = _quantizer_buffers(x, static_scale, permuted=True)
    lib.call(f"dgq_quantize_rows_perm_{_IN_SUFFIX[x.dtype]}", x.data_ptr(), q.data_ptr(), scale.data_ptr(),
             None if static is None else static.data_ptr(), *x.shape, _stream(x.device))
    return q, scale


def permute_s8(lib: KernelLibrary, x_q: torch.Tensor) -> torch.Tensor:
    """Natural int8 activations (M, K) -> the fused wgmma kernel's order (M, K padded to 128)."""
    x_q = x_q.contiguous()
    m, k = x_q.shape
    y = torch.empty(m, _padded(k), dtype=torch.int8, device=x_q.device)
    lib.call("dgq_permute_s8", x_q.data_ptr(), y.data_ptr(), m, k, _stream(x_q.device))
    return y


def _padded(k: int) -> int:
    return (k + 127) // 128 * 128


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=None)
def _wgmma_counters(device: torch.device) -> torch.Tensor:
    # One allocation per device for the process's life (CUDA graphs keep its address); every split-K
    # launch leaves its counters at zero again.
    return torch.zeros(WGMMA_COUNTERS, dtype=torch.int32, device=device)


def wgmma_default(m: int, n: int, k: int, sms: int = 132) -> tuple[int, int, int, int, int]:
    """The fused wgmma kernel's configuration for an untuned shape: tokens per block from M, split-K
    up to about one wave of blocks (each split keeping at least 4 K steps)."""
    bm, bn, stages = (128, 64, 8) if m <= 64 else (128, 128, 6) if m <= 1024 else (128, 256, 4)
    return bm, bn, stages, 1, wgmma_splits(m, n, k, bm, bn, sms)


def _wgmma_tiles(m: int, n: int, bm: int, bn: int, cluster: int = 1) -> int:
    return -(-(-(-n // bm)) // cluster) * cluster * -(-m // bn)


def wgmma_splits(m: int, n: int, k: int, bm: int, bn: int, sms: int = 132, cluster: int = 1) -> int:
    tiles = _wgmma_tiles(m, n, bm, bn, cluster)
    if tiles >= sms or tiles > WGMMA_COUNTERS:
        return 1
    return max(1, min(sms // tiles, _padded(k) // 128 // 4))


def wgmma_permuted(lib: KernelLibrary, x_p, s_x, qweight, s2, zero, s1, group: int, out_dtype,
                   config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Fused wgmma W4A8 GEMM on activations already in its order (quantize_rows_permuted /
    permute_s8); config = (block channels, block tokens, stages, cluster, splits; splits 0 = default)."""
    m = x_p.shape[0]
    n, k = qweight.shape[0], qweight.shape[1] * 2
    bm, bn, stages, cluster, splits = config or wgmma_default(m, n, k, _sm_count(x_p.device))
    if not splits:
        splits = wgmma_splits(m, n, k, bm, bn, _sm_count(x_p.device), cluster)
    out = torch.empty(m, n, dtype=out_dtype, device=x_p.device)
    steps = _padded(k) // 128
    per = -(-steps // splits)
    splits = -(-steps // per)
    tiles = _wgmma_tiles(m, n, bm, bn, cluster)
    if splits > 1 and tiles > WGMMA_COUNTERS:
        splits = 1
    partials = torch.empty(tiles * splits * bm * bn if splits > 1 else 0, dtype=torch.int32, device=x_p.device)
    counters = _wgmma_counters(x_p.device)
    lib.call(f"dgq_wgmma_w{bm}x{bn}_s{stages}_c{cluster}_{_OUT_SUFFIX[out_dtype]}", qweight.data_ptr(), s2.data_ptr(),
             zero.data_ptr(), s1.data_ptr(), x_p.data_ptr(), s_x.data_ptr(), out.data_ptr(),
             partials.data_ptr() if splits > 1 else None, counters.data_ptr(), m, n, k, group, splits,
             _stream(x_p.device))
    return out


def wgmma(lib: KernelLibrary, x_q, s_x, qweight, s2, zero, s1, group: int, out_dtype,
          config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Fused wgmma W4A8 GEMM on natural int8 activations x_q (M, K) (permuted here first)."""
    return wgmma_permuted(lib, permute_s8(lib, x_q), s_x, qweight, s2, zero, s1, group, out_dtype, config)


def gemv(lib: KernelLibrary, x_q, s_x, qweight, s2, zero, s1, group: int, out_dtype,
         config: tuple[int, int] = GEMV_DEFAULT) -> torch.Tensor:
    """Fused decode GEMV of one int8 token x_q (1, K) -> (1, N); config as in GEMV_CONFIGS."""
    n, k = qweight.shape[0], x_q.shape[1]
    out = torch.empty(1, n, dtype=out_dtype, device=x_q.device)
    lib.call(f"dgq_gemv_{_OUT_SUFFIX[out_dtype]}", qweight.data_ptr(), s2.data_ptr(), zero.data_ptr(), s1.data_ptr(),
             x_q.data_ptr(), s_x.data_ptr(), out.data_ptr(), n, k, group, *config, _stream(x_q.device))
    return out


def mma(lib: KernelLibrary, x_q, s_x, qweight, s2, zero, s1, group: int, out_dtype,
        config: tuple[int, int] = MMA_DEFAULT) -> torch.Tensor:
    """Fused tensor-core kernel; config = (channel tiles of 16 per warp, warps per block)."""
    m, k = x_q.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    lib.call(f"dgq_mma_{_OUT_SUFFIX[out_dtype]}", qweight.data_ptr(), s2.data_ptr(), zero.data_ptr(), s1.data_ptr(),
             x_q.data_ptr(), s_x.data_ptr(), out.data_ptr(), m, n, k, group, *config, _stream(x_q.device))
    return out


def choose_path(lib: KernelLibrary, m: int, n: int, k: int) -> tuple[str, tuple[int, ...] | None]:
    """("gemv" | "mma" | "wgmma" | "gemm", its configuration) for an M x N x K problem."""
    tuned = lib.paths.get(f"{_bucket(m)},{n},{k}")
    if tuned is not None and (tuned[0] != "gemv" or m == 1):  # the GEMV takes one token only
        if tuned[0] != "wgmma" or len(tuned[1]) == 5 and tuple(tuned[1][:4]) in lib.wgmma_variants:
            return tuned[0], tuple(tuned[1]) if len(tuned) > 1 else None
    if m == 1:
        return "gemv", GEMV_DEFAULT
    return ("mma", MMA_DEFAULT) if m <= MMA_MAX_ROWS else ("gemm", None)


# The paths dgq::linear's C++ kernel (kernels/dgq_torch_ops.cpp) runs itself, by its ids for them.
NATIVE_PATHS = {"gemv": 1, "mma": 2}


def native_plan(lib: KernelLibrary, x: torch.Tensor, n: int) -> list[int]:
    """dgq::plan's answer for the C++ kernel: [path id, config, config, quantizer address, kernel
    address, rotating quantizer address, norm quantizer address, silu-mul quantizer address] where
    choose_path picks a path it runs, else [0] (it calls the Python path). The rotating quantizer is
    dgq_hadamard_quantize_rows (rotated_linear), the norm quantizer dgq_rmsnorm_quantize_rows
    (norm_linear), the silu-mul one dgq_silu_mul_quantize_rows (silu_mul_linear; x is then the
    linear's (M, K) input as the C++ kernel sees it, not the (M, 2K) gate/up output)."""
    m, k = x.shape
    path, config = choose_path(lib, m, n, k)
    if path not in NATIVE_PATHS:
        return [0]
    config = config or (GEMV_DEFAULT if path == "gemv" else MMA_DEFAULT)
    entries = (f"dgq_quantize_rows_{_IN_SUFFIX[x.dtype]}", f"dgq_{path}_{_OUT_SUFFIX[x.dtype]}",
               f"dgq_hadamard_quantize_rows_{_OUT_SUFFIX[x.dtype]}", f"dgq_rmsnorm_quantize_rows_{_OUT_SUFFIX[x.dtype]}",
               f"dgq_silu_mul_quantize_rows_{_OUT_SUFFIX[x.dtype]}")
    return [NATIVE_PATHS[path], *config, *(ctypes.cast(getattr(lib.lib, e), ctypes.c_void_p).value for e in entries)]


def dgq_linear(lib: KernelLibrary, x: torch.Tensor, qweight, s2, zero, s1, group: int,
               static_scale: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None,
               silu_mul: bool = False) -> torch.Tensor:
    """One DGQ linear without bias: x (M, K) fp16/bf16 -> (M, N) in x's dtype; group % 32 == 0.
    norm = (weight, eps): the linear of RMSNorm(x), the norm fused into the quantizer (norm_fusable).
    silu_mul: x is (M, 2K) [gate | up], the linear's input silu(gate) * up (silu_mul_fusable)."""
    m, k = x.shape[0], x.shape[1] // 2 if silu_mul else x.shape[1]

    def quantize(permuted: bool):
        if silu_mul:
            return silu_mul_quantize_rows(lib, x, static_scale, permuted)
        if norm is not None:
            return rmsnorm_quantize_rows(lib, x, *norm, static_scale, permuted=permuted)
        return (quantize_rows_permuted if permuted else quantize_rows)(lib, x, static_scale)

    if m == 0:  # no launch has a grid for it
        return x.new_empty(0, qweight.shape[0])
    path, config = choose_path(lib, m, qweight.shape[0], k)
    if path == "wgmma" and qweight.data_ptr() % 16:  # TMA needs 16-byte aligned codes: take the default path
        path, config = ("mma", MMA_DEFAULT) if m <= MMA_MAX_ROWS else ("gemm", None)
    if path == "wgmma":
        x_p, s_x = quantize(permuted=True)
        return wgmma_permuted(lib, x_p, s_x, qweight, s2, zero, s1, group, x.dtype, config)
    x_q, s_x = quantize(permuted=False)
    if path == "gemv":
        return gemv(lib, x_q, s_x, qweight, s2, zero, s1, group, x.dtype, config or GEMV_DEFAULT)
    if path == "mma":
        return mma(lib, x_q, s_x, qweight, s2, zero, s1, group, x.dtype, config or MMA_DEFAULT)
    w_s8 = unpack_s8(lib, qweight, s2, zero, group)
    if lib.gemm_variants and k % 16 == 0 and qweight.shape[0] % 8 == 0:
        return int8_gemm(lib, x_q, s_x, w_s8, s1, x.dtype)
    from ..gemm import dual_scale_gemm

    return dual_scale_gemm(x_q, s_x, w_s8, s1, x.dtype)
