"""What an online rotation of down_proj's input costs in the kernel path (issue #20), one GPU.

The `hadamard-online-*` rows of scripts/measure_rotation.py rotate down_proj's input at run time
(x -> x Q, Q folded into down_proj's weight; SmolLM2-135M WikiText-2 25.01 -> 24.34). Before such a
rotation goes into the checkpoint format, this times it next to the DGQ down linear it feeds, in
the same run, for SmolLM2-135M's down_proj (576 x 1536, g64) and Llama-2-7B's (4096 x 11008,
g128 as in docs/kernels.md), bf16:
  rotate     quant.rotate.FactoredHadamard.apply (a small dense Paley factor and a fast
             Walsh-Hadamard transform, torch ops in float32; 11008 gets blocks of 256);
  compiled   the same through torch.compile (inductor fuses the butterflies);
  dense      x @ Q with the dense (n, n) bf16 matrix, for scale;
  linear     the whole DGQ down linear (activation quantization + the dispatched kernel);
  quantize   the per-token int8 quantization alone,
  fused      the rotation fused into it (dgq_hadamard_quantize_rows: Sylvester blocks only, so
             SmolLM2's 12 x 128 is timed as blocks of 128, what a block-diagonal format would pay), and
  kernel     the rotation alone (dgq_hadamard_rows, x Q written in x's dtype), and
  rotated    the whole rotated linear as an online-rotated checkpoint runs it (dgq::rotated_linear:
             on the GEMV / tensor-core paths the rotation fused into the quantizer, else the
             rotation kernel, then the linear);
each the median of CUDA-graph replays (scripts/bench_gemm.py's `bench`). Prints rotate / linear
and compiled / linear per M, what the fused kernel adds over the plain quantization, and the
rotation kernel and the rotated linear over the linear.

    python scripts/bench_online_rotation.py [--rows 1 8 64 512 4096]
    python scripts/bench_online_rotation.py --check     # CPU: apply() equals x Q (block by block) on both shapes
"""

from __future__ import annotations

import argparse

import torch

from dgqtool.quant.rotate import factored_hadamard

SHAPES = {"smollm2-135m down": (576, 1536, 64), "llama-2-7b down": (4096, 11008, 128)}  # (out, in, group)
ROWS = [1, 8, 64, 512, 4096]


def check() -> None:
    for name, (_, n, _) in SHAPES.items():
        f = factored_hadamard(n, seed=2)
        x = torch.randn(5, n, dtype=torch.float64)
        blockwise = ((x * f.signs).reshape(5, -1, f.block) @ f.block_matrix()).reshape(5, n)  # Q block by block
        err = (f.apply(x) - blockwise).abs().max().item()
        assert err < 1e-10, (name, err)
        print(f"{name}: n = {n}, blocks of {f.block} = {f.paley.shape[0]} x {f.sylvester_order}, |apply - x Q| = {err:.1e}")


def measure(rows: list[int]) -> None:
    from bench_gemm import bench

    from dgqtool import ops
    from dgqtool.kernels import runtime
    from dgqtool.quant.dual_grained import pack_nibbles, random_dual_grained

    lib = runtime.library(torch.device("cuda"))
    assert lib is not None, "kernel library unavailable"
    print("| shape | M | rotate us | compiled us | dense us | DGQ linear us | rotate / linear | compiled / linear "
          "| quantize us | fused us | (fused - quantize) / linear | kernel us | kernel / linear | rotated linear us "
          "| rotated / linear |")
    print("|---" * 15 + "|")
    for name, (out_features, n, group) in SHAPES.items():
        f = factored_hadamard(n, seed=2).to("cuda")  # no host copies inside the captured graphs
        dense = f.matrix().to("cuda", torch.bfloat16)
        compiled = torch.compile(f.apply, fullgraph=True)
        w = random_dual_grained(out_features, n, group, torch.Generator().manual_seed(0))
        weight = (pack_nibbles(w.codes).cuda(), w.s2.cuda(), w.zero.cuda(), w.s1.half().cuda())
        block = f.sylvester_order if f.paley.shape[0] == 1 else 128
        signs = f.signs.to("cuda", torch.float32)
        for m in rows:
            x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            rotate = bench(lambda: f.apply(x))
            fused = bench(lambda: compiled(x))
            matmul = bench(lambda: x @ dense)
            linear = bench(lambda: runtime.dgq_linear(lib, x, *weight, group))
            plain = bench(lambda: runtime.quantize_rows(lib, x))
            fused_quant = bench(lambda: runtime.hadamard_quantize_rows(lib, x, signs, block))
            alone = bench(lambda: runtime.hadamard_rows(lib, x, signs, block))
            rotated = bench(lambda: ops.rotated_linear(x, signs, block, *weight, group))
            print(f"| {name} | {m} | {rotate:.1f} | {fused:.1f} | {matmul:.1f} | {linear:.1f} | "
                  f"{rotate / linear:.2f} | {fused / linear:.2f} | {plain:.1f} | {fused_quant:.1f} | "
                  f"{(fused_quant - plain) / linear:.2f} | {alone:.1f} | {alone / linear:.2f} | {rotated:.1f} | "
                  f"{rotated / linear:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS)
    parser.add_argument("--check", action="store_true", help="CPU: the factored transform equals x @ Q")
    args = parser.parse_args()
    if args.check:
        check()
    else:
        measure(args.rows)


if __name__ == "__main__":
    main()
