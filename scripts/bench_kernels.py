"""W4A8 DGQ kernel benchmark on one GPU, with the baselines measured in the same run.

For Llama-2-7B linear shapes and M from decode to long prefill it times, in microseconds (median of
CUDA-event timings, weights rotating over several copies so L2 cannot hold them):
  dgq      the whole DGQ linear from fp16 activations: per-token int8 quantization kernel, then the
           fused GEMV (M <= 16) or the int4 -> int8 expansion + CUTLASS sm90 GEMM (larger M);
  gemv / unpack+gemm   the two GEMM paths alone on int8 activations (the dispatch picks one by M);
  int8     cuBLAS int8 torch._int_mm (M padded to 17, its minimum) -- no scales, no quantization;
  bf16     cuBLAS bf16 matmul;
  fp8      torch._scaled_mm, e4m3 with row-wise scales.
and prints ratios baseline / dgq (> 1: DGQ faster). --tune also times every emitted GEMM variant per
(M, N, K) and writes the fastest into kernels/tuned_sm90.json, which the runtime reads.

    python scripts/bench_kernels.py --out results/kernels [--tune]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dgqtool.kernels import build, runtime
from dgqtool.quant.dual_grained import pack_nibbles, random_dual_grained

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
ROWS = [1, 8, 16, 32, 64, 256, 1024, 4096, 8192]
GROUP = 128
COPIES = 6


def bench(fn, iters: int = 20, calls: int = 12) -> float:
    """Median microseconds per call of `calls` back-to-back calls replayed from one CUDA graph, so
    Python and launch overhead (which CUDA graphs remove in `dgq run` too) do not count."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


class Rotation:
    """Cycles through weight copies so each call reads its weights from HBM."""

    def __init__(self, copies):
        self.copies, self.i = copies, 0

    def next(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/kernels"))
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    lib = runtime.library(dev)
    assert lib is not None, "kernel library unavailable"
    name = torch.cuda.get_device_name()
    print(f"device {name}, arch {lib.arch}, GEMM variants {lib.gemm_variants}")
    rows, choice = [], {}
    gen = torch.Generator().manual_seed(0)
    for shape, (n, k) in SHAPES.items():
        packed = []
        for _ in range(COPIES):
            w = random_dual_grained(n, k, GROUP, gen)
            packed.append((pack_nibbles(w.codes).to(dev), w.s2.to(dev), w.zero.to(dev), w.s1.half().to(dev)))
        dgq_w = Rotation(packed)
        bf16_w = Rotation([torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)])
        int8_w = Rotation([torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(COPIES)])
        fp8_w = Rotation([(torch.randn(n, k, device=dev) * 0.02).to(torch.float8_e4m3fn) for _ in range(COPIES)])
        s_w = torch.rand(1, n, device=dev)
        for m in args.rows:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb, x8 = x.bfloat16(), torch.randint(-127, 128, (max(m, 17), k), device=dev, dtype=torch.int8)
            xf8, s_x = x.to(torch.float8_e4m3fn), torch.rand(m, 1, device=dev)
            x_q = x8[:m].contiguous()

            def dgq():
                qw, s2, zp, s1 = dgq_w.next()
                runtime.dgq_linear(lib, x, qw, s2, zp, s1, GROUP)

            def gemv():
                qw, s2, zp, s1 = dgq_w.next()
                runtime.gemv(lib, x_q, s_x, qw, s2, zp, s1, GROUP, torch.float16)

            def unpack_gemm():
                qw, s2, zp, s1 = dgq_w.next()
                runtime.int8_gemm(lib, x_q, s_x, runtime.unpack_s8(lib, qw, s2, zp, GROUP), s1, torch.float16)

            row = {"shape": shape, "N": n, "K": k, "M": m, "dgq_us": bench(dgq),
                   "unpack_gemm_us": bench(unpack_gemm),
                   "int8_us": bench(lambda: torch._int_mm(x8, int8_w.next().T)),
                   "bf16_us": bench(lambda: xb @ bf16_w.next().T),
                   "fp8_us": bench(lambda: torch._scaled_mm(xf8, fp8_w.next().T, scale_a=s_x, scale_b=s_w,
                                                             out_dtype=torch.bfloat16))}
            if m <= 16:
                row["gemv_us"] = bench(gemv)
            if args.tune and m > runtime.GEMV_MAX_ROWS and lib.gemm_variants:
                w_s8 = runtime.unpack_s8(lib, *dgq_w.next()[:3], GROUP)
                times = {v: bench(lambda v=v: runtime.int8_gemm(lib, x_q, s_x, w_s8, packed[0][3], torch.float16, v),
                                  iters=20) for v in lib.gemm_variants}
                best = min(times, key=times.get)
                choice[f"{1 << max(m - 1, 0).bit_length()},{n},{k}"] = best
                row["variants_us"] = times
            for base in ("int8", "bf16", "fp8"):
                row[f"{base}_over_dgq"] = row[f"{base}_us"] / row["dgq_us"]
            rows.append(row)
            print(f"{shape:8s} M={m:5d}  dgq {row['dgq_us']:8.1f}  gemv {row.get('gemv_us', 0):8.1f}  "
                  f"unpack+gemm {row['unpack_gemm_us']:8.1f}  "
                  f"int8 {row['int8_us']:8.1f}  bf16 {row['bf16_us']:8.1f}  fp8 {row['fp8_us']:8.1f} us   "
                  f"x int8 {row['int8_over_dgq']:.2f}  x bf16 {row['bf16_over_dgq']:.2f}  x fp8 {row['fp8_over_dgq']:.2f}",
                  flush=True)
        del packed, dgq_w, bf16_w, int8_w, fp8_w
        torch.cuda.empty_cache()
    (args.out / "kernels.json").write_text(json.dumps({"device": name, "group": GROUP, "rows": rows}, indent=1))
    lines = ["| shape (N×K) | M | DGQ linear µs | fused GEMV µs | unpack+GEMM µs | int8 `_int_mm` µs | bf16 µs | fp8 µs | int8/DGQ | bf16/DGQ | fp8/DGQ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gemv_us = f"{r['gemv_us']:.1f}" if "gemv_us" in r else "–"
        lines.append(f"| {r['shape']} {r['N']}×{r['K']} | {r['M']} | {r['dgq_us']:.1f} | {gemv_us} | {r['unpack_gemm_us']:.1f} | "
                     f"{r['int8_us']:.1f} | {r['bf16_us']:.1f} | {r['fp8_us']:.1f} | {r['int8_over_dgq']:.2f} | "
                     f"{r['bf16_over_dgq']:.2f} | {r['fp8_over_dgq']:.2f} |")
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.tune:
        tuned = {"device": name, "note": "fastest emitted GEMM variant per (M bucket, N, K); scripts/bench_kernels.py --tune",
                 "choice": choice}
        (args.out / "tuned_sm90.json").write_text(json.dumps(tuned, indent=1))
        print(f"tuning table: {args.out / 'tuned_sm90.json'} (copy to {build.source_dir() / 'tuned_sm90.json'})")


if __name__ == "__main__":
    main()
