"""Emit the int8 GEMM instantiations for DGQ with the CUTLASS Python emitter (cutlass_library).

Each variant is an s8 x s8 -> s32 GEMM, X (M x K, row-major) times the int8 weight (N x K, i.e.
column-major K x N), whose epilogue visitor tree applies DGQ's two fp scales:
    D[m, n] = ((float(acc[m, n]) * s_x[m]) * s1[n])     (rounded once to fp16 / bf16)
in the same order as the torch reference (`dgqtool.gemm.dual_scale_gemm`), so outputs are
bit-identical.
  * sm90: TMA warp-specialized CUTLASS 3.x kernels; the emitter (EmitGemmUniversal3xInstance)
    writes the kernel types, with our visitor tree as its epilogue functor;
  * sm80: CUTLASS 2.x multistage kernels with the 2.x visitor tree (Sm80EVT), which the emitter has
    no template for: the kernel type is dgq_gemm_sm80.cuh's, instantiated here per tile from
    cutlass_library's tile descriptions and type tags.
The extern "C" launcher around each is ours, because the emitter's PyTorch path only forwards
alpha/beta, not visitor-tree arguments.

    python kernels/generate.py OUT_DIR [ARCH]   # writes OUT_DIR/gemm_<variant>.cu and variants.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cutlass_library import library as L
from cutlass_library.gemm_operation import EmitGemmUniversal3xInstance, GemmOperation


@dataclass(frozen=True)
class Variant:
    """One tile configuration; `name` is the symbol suffix the runtime looks up."""

    tile: tuple[int, int, int]
    cluster: tuple[int, int, int]
    schedule: str  # "cooperative" | "pingpong"

    @property
    def name(self) -> str:
        m, n, k = self.tile
        return f"{self.schedule[:2]}_{m}x{n}x{k}_c{self.cluster[0]}x{self.cluster[1]}"


# Chosen from measurements on H100 (docs/kernels.md, Why these three CUTLASS variants): cooperative 128x256 with a
# 2x1 cluster wins at large M, 256x128 on the down projection, ping-pong 128x128 at medium M.
VARIANTS = (
    Variant((128, 256, 128), (2, 1, 1), "cooperative"),
    Variant((256, 128, 128), (1, 1, 1), "cooperative"),
    Variant((128, 128, 128), (1, 1, 1), "pingpong"),
)
OUT_TYPES = {"f16": "cutlass::half_t", "bf16": "cutlass::bfloat16_t"}

_SCHEDULES = {
    "cooperative": (L.KernelScheduleType.TmaWarpSpecializedCooperative, L.EpilogueScheduleType.TmaWarpSpecializedCooperative),
    "pingpong": (L.KernelScheduleType.TmaWarpSpecializedPingpong, L.EpilogueScheduleType.TmaWarpSpecialized),
}


class ScaleEpilogue:
    """Visitor tree (acc * s_x[row]) * s1[col]; cutlass_library emits any object with emit_declaration."""

    def __init__(self, tile: tuple[int, int, int], out_type: str):
        self.tile, self.out_type = tile, out_type

    def emit_declaration(self) -> str:
        m, n, k = self.tile
        tile = f"cute::Shape<cute::_{m}, cute::_{n}, cute::_{k}>"
        f = "cutlass::epilogue::fusion"
        rn = "cutlass::FloatRoundStyle::round_to_nearest"
        return (
            f"{f}::Sm90EVT<{f}::Sm90Compute<cutlass::multiplies, {self.out_type}, float, {rn}>,"
            f" {f}::Sm90EVT<{f}::Sm90Compute<cutlass::multiplies, float, float, {rn}>,"
            f" {f}::Sm90AccFetch, {f}::Sm90ColBroadcast<0, {tile}, float>>,"
            f" {f}::Sm90RowBroadcast<0, {tile}, cutlass::half_t, float>>"
        )


def operation(variant: Variant, out: str) -> GemmOperation:
    math = L.MathInstruction([64, variant.tile[1], 32], L.DataType.s8, L.DataType.s8, L.DataType.s32,
                             L.OpcodeClass.TensorOp, L.MathOperation.multiply_add)
    tile = L.TileDescription(list(variant.tile), 0, [4, 1, 1], math, 90, 90, list(variant.cluster))
    out_dtype = L.DataType.f16 if out == "f16" else L.DataType.bf16
    kernel_schedule, epilogue_schedule = _SCHEDULES[variant.schedule]
    return GemmOperation(
        L.GemmKind.Universal3x, 90, tile,
        L.TensorDescription(L.DataType.s8, L.LayoutType.RowMajor, 16),
        L.TensorDescription(L.DataType.s8, L.LayoutType.ColumnMajor, 16),
        L.TensorDescription(L.DataType.void, L.LayoutType.RowMajor, 8),
        L.DataType.f32,
        epilogue_functor=ScaleEpilogue(variant.tile, OUT_TYPES[out]),
        D=L.TensorDescription(out_dtype, L.LayoutType.RowMajor, 8),
        kernel_schedule=kernel_schedule, epilogue_schedule=epilogue_schedule,
    )


LAUNCHER = """
extern "C" int dgq_gemm_{symbol}(const int8_t* x, const int8_t* w, const float* s_x, const void* s1,
                                 void* out, int m, int n, int k, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {{
  return dgq::run_gemm<cutlass::gemm::device::GemmUniversalAdapter<{op}>>(
      x, w, s_x, s1, out, m, n, k, workspace, workspace_bytes, stream);
}}
extern "C" size_t dgq_gemm_{symbol}_workspace(int m, int n, int k) {{
  return dgq::gemm_workspace<cutlass::gemm::device::GemmUniversalAdapter<{op}>>(m, n, k);
}}
"""


def emit_variant(variant: Variant, out: str) -> str:
    op = operation(variant, out)
    emitter = EmitGemmUniversal3xInstance()
    # cutlass_library 4.2 reads a custom functor from the emitter, not from the operation
    emitter.epilogue_functor = op.epilogue_functor
    body = emitter.emit(op)
    name = op.procedural_name()
    return (
        '#include "dgq_gemm_sm90.cuh"\n'
        + body
        + LAUNCHER.format(symbol=f"{variant.name}_{out}", op=name)
    )


@dataclass(frozen=True)
class Sm80Variant:
    """One CUTLASS 2.x tile configuration: threadblock and warp tiles, mainloop stages."""

    tile: tuple[int, int, int]
    warp: tuple[int, int, int]
    stages: int

    @property
    def name(self) -> str:
        m, n, k = self.tile
        return f"a_{m}x{n}x{k}_s{self.stages}"

    def description(self) -> L.TileDescription:
        math = L.MathInstruction([16, 8, 32], L.DataType.s8, L.DataType.s8, L.DataType.s32,
                                 L.OpcodeClass.TensorOp, L.MathOperation.multiply_add_saturate)
        warps = [t // w for t, w in zip(self.tile, self.warp)]
        return L.TileDescription(list(self.tile), self.stages, warps, math, 80, 1024)


# The int8 configuration CUTLASS's own library generator lists first for Ampere tensor ops; one
# variant keeps the CPU compile check short (the tensor-core DGQ kernel covers M <= 64 anyway).
SM80_VARIANTS = (Sm80Variant((128, 128, 64), (64, 64, 64), 4),)

SM80_INSTANCE = """#include "dgq_gemm_sm80.cuh"

using {config} = dgq::sm80::ScaledGemm<cutlass::gemm::GemmShape<{tm}, {tn}, {tk}>,
                                       cutlass::gemm::GemmShape<{wm}, {wn}, {wk}>, {stages}, {out_type}>;

extern "C" int dgq_gemm_{symbol}(const int8_t* x, const int8_t* w, const float* s_x, const void* s1,
                                 void* out, int m, int n, int k, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {{
  return dgq::sm80::run_gemm<{config}>(x, w, s_x, s1, out, m, n, k, workspace, workspace_bytes, stream);
}}
extern "C" size_t dgq_gemm_{symbol}_workspace(int m, int n, int k) {{
  return dgq::sm80::gemm_workspace<{config}>(m, n, k);
}}
"""


def emit_sm80_variant(variant: Sm80Variant, out: str) -> str:
    tile = variant.description()
    warp = [t // w for t, w in zip(tile.threadblock_shape, tile.warp_count)]
    (tm, tn, tk), (wm, wn, wk) = tile.threadblock_shape, warp
    out_type = L.DataTypeTag[L.DataType.f16 if out == "f16" else L.DataType.bf16]
    return SM80_INSTANCE.format(config=f"Config_{variant.name}_{out}", symbol=f"{variant.name}_{out}",
                                tm=tm, tn=tn, tk=tk, wm=wm, wn=wn, wk=wk, stages=tile.stages, out_type=out_type)


@dataclass(frozen=True)
class WgmmaVariant:
    """One instantiation of the fused register-sourced wgmma W4A8 kernel (dgq_wgmma_sm90.cuh):
    MT m64 tiles per consumer warpgroup (block = 128 * MT channels), BN tokens (wgmma N), STAGES
    pipeline stages. Split-K is a launch argument, not an instantiation."""

    mt: int
    bn: int
    stages: int
    cluster: int = 1  # blocks along the channels sharing (multicasting) the token tile

    @property
    def name(self) -> str:
        return f"w{128 * self.mt}x{self.bn}_s{self.stages}_c{self.cluster}"


WGMMA_VARIANTS = (
    WgmmaVariant(1, 64, 8),
    WgmmaVariant(1, 128, 6),
    WgmmaVariant(1, 256, 4),
    WgmmaVariant(2, 128, 4),
)
# Clusters of 2 sharing the token tile (multicast) are supported by the kernel and exact, but were
# slower on the H200 wherever measured (docs/kernels.md), so none is instantiated.
WGMMA_OUT = {"f16": "__half", "bf16": "__nv_bfloat16"}
WGMMA_NS = sorted({v.bn for v in WGMMA_VARIANTS})

WGMMA_INSTANCE = """
extern "C" int dgq_wgmma_{name}_{out}(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1,
                                    const int8_t* x_p, const float* s_x, void* out, int* partials, int* counters,
                                    int m, int n, int k, int group, int splits, cudaStream_t stream) {{
  return dgq_wgmma::launch<{mt}, {bn}, {stages}, {cluster}, {out_type}>(qweight, s2, zp, s1, x_p, s_x, out, partials, counters,
                                                              m, n, k, group, splits, stream);
}}
"""


def emit_wgmma_ops(ns=WGMMA_NS) -> str:
    """WgmmaRS<N>::mma: wgmma.mma_async m64nNk32 s8 x s8 -> s32, A from four registers, B from a
    shared-memory descriptor, accumulating into N / 2 registers (one asm operand list per N)."""
    out = ["// Emitted by kernels/generate.py: register-A int8 wgmma per N.", "#pragma once", "#include <cstdint>",
           "namespace dgq_wgmma {", "template <int N> struct WgmmaRS;"]
    for n in ns:
        regs = n // 2
        d = ", ".join(f"%{i}" for i in range(regs))
        a = ", ".join(f"%{regs + i}" for i in range(4))
        outs = ", ".join(f'"+r"(d[{i}])' for i in range(regs))
        out.append(
            f"template <> struct WgmmaRS<{n}> {{\n"
            f"  __device__ __forceinline__ static void mma(int (&d)[{regs}], uint32_t a0, uint32_t a1, uint32_t a2,\n"
            f"                                             uint32_t a3, uint64_t desc) {{\n"
            f'    asm volatile("wgmma.mma_async.sync.aligned.m64n{n}k32.s32.s8.s8 {{{d}}}, {{{a}}}, %{regs + 4}, 1;\\n"\n'
            f"                 : {outs}\n"
            f'                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));\n'
            f"  }}\n}};")
    out.append("}  // namespace dgq_wgmma")
    return "\n".join(out) + "\n"


def emit_wgmma_variant(variant: WgmmaVariant) -> str:
    body = ['#include "dgq_wgmma_sm90.cuh"']
    for out, out_type in WGMMA_OUT.items():
        body.append(WGMMA_INSTANCE.format(name=variant.name, out=out, mt=variant.mt, bn=variant.bn,
                                          stages=variant.stages, cluster=variant.cluster, out_type=out_type))
    return "\n".join(body)


def generate(out_dir: Path, arch: str = "sm_90a") -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sm90 = arch.startswith("sm_90")
    table = []
    for variant in VARIANTS if sm90 else SM80_VARIANTS:
        for out in OUT_TYPES:
            source = emit_variant(variant, out) if sm90 else emit_sm80_variant(variant, out)
            (out_dir / f"gemm_{variant.name}_{out}.cu").write_text(source)
        table.append({"name": variant.name, **asdict(variant)})
    (out_dir / "variants.json").write_text(json.dumps(table, indent=1))
    if sm90:
        (out_dir / "wgmma_ops.cuh").write_text(emit_wgmma_ops())
        for variant in WGMMA_VARIANTS:
            (out_dir / f"wgmma_{variant.name}.cu").write_text(emit_wgmma_variant(variant))
        (out_dir / "wgmma_common.cu").write_text(
            '#include "dgq_wgmma_sm90.cuh"\n\n// Profiling hook: the per-block trace buffer of the launches that follow (nullptr: off).\n'
            'extern "C" void dgq_wgmma_set_trace(long long* trace) { dgq_wgmma::g_trace = trace; }\n')
        (out_dir / "wgmma_variants.json").write_text(json.dumps(
            [{"name": v.name, **asdict(v)} for v in WGMMA_VARIANTS], indent=1))
    return table


if __name__ == "__main__":
    generate(Path(sys.argv[1]), *sys.argv[2:3])
