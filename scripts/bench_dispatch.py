"""Eager cost of one DGQ linear against bf16 at decode sizes (issue #18: DGQ <= 1.3x bf16 at M = 1).

For the four Llama-2-7B linear shapes (N x K: qkv 12288x4096, o 4096x4096, gate_up 22016x4096,
down 4096x11008) and M = 1 and 8 tokens: a DGQLinear (g128, dynamic activations; its forward goes
through `torch.ops.dgq.linear`) and bf16 `F.linear` on the same input, each called back to back
after a warm-up, timed with CUDA events over the whole run of calls (per-call time = elapsed /
calls; median of the rounds). Eager back-to-back timing measures whichever is slower, the host's
dispatch or the GPU's kernels; the DGQ linear replayed from a CUDA graph (GPU only) and the host's
issue time per call (perf_counter around the loop, which the queue never blocks at these counts)
show which one it was. Writes dispatch.json and dispatch.md to --out.

    python scripts/bench_dispatch.py --out results/dispatch [--calls 200] [--rounds 7]
    python scripts/bench_dispatch.py --registration   # CPU: host cost of the op registration styles
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
TOKENS = (1, 8)
GROUP = 128
TARGET = 1.3  # DGQ eager / bf16 eager at M = 1


def per_call_us(fn, calls: int, rounds: int, warmups: int = 50) -> tuple[float, float]:
    """(GPU-event microseconds per call, host issue microseconds per call), medians over rounds."""
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(gpu)[len(gpu) // 2], sorted(host)[len(host) // 2]


def graph_us(fn, calls: int, rounds: int) -> float:
    """Microseconds per call of `fn` captured once in a CUDA graph and replayed back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return per_call_us(graph.replay, calls, rounds)[0]


@torch.no_grad()
def measure(calls: int, rounds: int) -> list[dict]:
    from dgqtool import ops
    from dgqtool.nn.dgq_linear import DGQLinear
    from dgqtool.quant.dual_grained import random_dual_grained

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        dgq = DGQLinear.from_weight(random_dual_grained(n, k, GROUP, gen), None, None, torch.bfloat16).cuda()
        weight = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
        for m in TOKENS:
            x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)  # (batch, tokens, hidden) as in decode
            dgq_us, dgq_host = per_call_us(lambda: dgq(x), calls, rounds)
            bf16_us, bf16_host = per_call_us(lambda: F.linear(x, weight), calls, rounds)
            # the op alone (no module), through its C++ and its Python CUDA kernel
            args = (x.view(m, k), dgq.qweight, dgq.scales_s2, dgq.qzeros, dgq.scales_s1, GROUP)
            op_us = per_call_us(lambda: ops.linear(*args), calls, rounds)[0]
            op_python_us = per_call_us(lambda: ops.linear_python(*args), calls, rounds)[0]
            row = {"shape": name, "n": n, "k": k, "m": m, "dgq_us": dgq_us, "bf16_us": bf16_us,
                   "dgq_host_us": dgq_host, "bf16_host_us": bf16_host, "op_us": op_us, "op_python_us": op_python_us,
                   "dgq_graph_us": graph_us(lambda: dgq(x), calls, rounds), "ratio": dgq_us / bf16_us}
            rows.append(row)
            print(f"{name:8s} M={m}: DGQ {dgq_us:6.1f} us (host {dgq_host:5.1f}, graph {row['dgq_graph_us']:5.1f}; op "
                  f"{op_us:5.1f}, Python kernel {op_python_us:5.1f})  bf16 {bf16_us:6.1f} us (host {bf16_host:5.1f})  "
                  f"DGQ/bf16 {row['ratio']:.2f}", flush=True)
        del dgq, weight
    return rows


def report(rows: list[dict], device: str, command: str, kernels: str) -> str:
    ones = [r for r in rows if r["m"] == 1]
    met = all(r["ratio"] <= TARGET for r in ones)
    ratios = ", ".join(f"{r['shape']} {r['ratio']:.2f}" for r in ones)
    lines = [f"Eager per-linear time, {device}, bf16 activations, DGQ g128 dynamic; CUDA events over back-to-back "
             "calls after warm-up (host: issue time per call; graph: the DGQ linear replayed from a CUDA graph; "
             f"op: dgq::linear called alone, through its {kernels} CUDA kernel and through its Python one).", "",
             f"`{command}`", "",
             "| shape (N x K) | M | DGQ eager (us) | bf16 eager (us) | DGQ / bf16 | DGQ host (us) | bf16 host (us) "
             "| DGQ graph (us) | op (us) | op, Python kernel (us) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['dgq_us']:.1f} | {r['bf16_us']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['dgq_host_us']:.1f} | {r['bf16_host_us']:.1f} | {r['dgq_graph_us']:.1f} | "
                     f"{r['op_us']:.1f} | {r['op_python_us']:.1f} |")
    lines += ["", f"Target DGQ eager <= {TARGET}x bf16 eager at M = 1: {'met' if met else 'MISSED'} "
              f"({ratios})."]
    return "\n".join(lines) + "\n"


def registration_us(calls: int = 20000) -> dict[str, float]:
    """CPU: host microseconds per call of a trivial op (returns a preallocated tensor) registered as
    `torch.library.custom_op` and through the low-level `torch.library.Library`, as dgq::linear is."""
    x, out = torch.randn(1, 64), torch.randn(1, 64)

    @torch.library.custom_op("dgq_bench::wrapped", mutates_args=())
    def wrapped(x: torch.Tensor, group: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        return out

    library = torch.library.Library("dgq_bench", "FRAGMENT")
    library.define("low(Tensor x, int group, Tensor? scale=None) -> Tensor")
    library.impl("low", lambda x, group, scale=None: out, "CPU")
    timings = {}
    for label, fn in [("custom_op", torch.ops.dgq_bench.wrapped.default), ("Library", torch.ops.dgq_bench.low.default)]:
        for _ in range(1000):
            fn(x, 32, None)
        start = time.perf_counter()
        for _ in range(calls):
            fn(x, 32, None)
        timings[label] = (time.perf_counter() - start) / calls * 1e6
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/dispatch"))
    parser.add_argument("--calls", type=int, default=200, help="back-to-back calls per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--registration", action="store_true", help="only the CPU cost of the two op registrations")
    args = parser.parse_args()
    if args.registration:
        print("  ".join(f"{label} {us:.2f} us/call" for label, us in registration_us().items()))
        return
    from dgqtool.ops import load_native  # registers dgq::linear

    kernels = "C++" if load_native() else "Python (C++ unavailable)"
    rows = measure(args.calls, args.rounds)
    device = torch.cuda.get_device_name()
    command = f"python scripts/bench_dispatch.py --calls {args.calls} --rounds {args.rounds}"
    text = report(rows, device, command, kernels)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dispatch.json").write_text(json.dumps({"device": device, "command": command, "kernels": kernels,
                                                        "rows": rows}, indent=1))
    (args.out / "dispatch.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
