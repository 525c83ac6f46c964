"""W4A8 DGQ GEMM benchmark on one GPU, with the baselines measured in the same run.

For Llama-2-7B linear shapes and M from decode to long prefill it times, in microseconds (median of
CUDA-graph replays, weights rotating over several copies so L2 cannot hold them):
  dgq      the whole DGQ linear from fp16 activations as the runtime dispatches it: per-token int8
           quantization kernel, then the path chosen for (M, N, K);
  gemv / mma / wgmma / unpack+gemm   the GEMM paths alone on int8 activations: the dp4a GEMV
           (M = 1), the fused mma.sync kernel (M <= 1024), the fused register-A wgmma kernel (sm90,
           M >= 16; each the best of its configurations, split-K included), and the int4 -> int8
           expansion + CUTLASS sm90 GEMM;
  quantize the per-token int8 activation quantization kernel alone (part of dgq);
  pre+dgq  the DGQ linear with the float op before it fused into its quantizer: for qkv and
           gate_up the RMSNorm (ops.norm_linear), for down the MLP's silu(gate) * up from the
           (M, 2K) gate/up output (ops.silu_mul_linear); pre the float op alone as inductor
           compiles it (one kernel); in-pre = pre+dgq - pre, the linear's own cost when its
           quantization rides in the op the model runs anyway (FP8's baseline still gets its
           activations for free);
  int8     cuBLAS int8 torch._int_mm (M padded to 17, its minimum) -- no scales, no quantization;
  bf16     cuBLAS bf16 matmul;
  fp8      torch._scaled_mm, e4m3 with row-wise scales;
  a16w4    tinygemm torch._weight_int4pack_mm (bf16 activations, 4-bit weights, group 128);
  bound    the 4-bit weight-streaming time: bytes of codes + S2 + zp + s1 / measured copy bandwidth
           (a plain 4 GiB device-to-device copy timed with CUDA events, read + write counted).
It prints ratios baseline / dgq (> 1: DGQ faster) and writes gemm.json, gemm.md and gemm.png.
--tune also times every emitted GEMM variant and every path per (M bucket, N, K) and writes the
choices into tuned_sm90.json (copy it to kernels/), which the runtime reads.

    python scripts/bench_gemm.py --out results/gemm [--tune]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dgqtool.kernels import build, runtime
from dgqtool.quant.dual_grained import pack_nibbles, random_dual_grained

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
ROWS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
GROUP = 128
COPIES = 6
MMA_ROWS = 1024  # the tensor-core kernel is timed up to here
WGMMA_MIN_ROWS = 16  # the fused wgmma kernel is timed from here
NORMED = ("qkv", "gate_up")  # the shapes whose input is an RMSNorm's output (down's: silu(gate) * up)
EPS = 1e-5
SPLITS = (1, 2, 3, 4, 6, 8)  # split-K candidates where a shape has fewer blocks than SMs


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


def copy_bandwidth(dev, gib: int = 4) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the streaming ceiling: one plain
    copy of `gib` GiB timed with CUDA events, median of 10. (Two 1 GiB copies replayed from a CUDA
    graph read 2.76 TB/s on the H200, where this reads ~4.3: the graph's copy nodes are slower.)"""
    x = torch.empty(gib << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / sorted(times)[len(times) // 2]


def wgmma_configs(lib, m: int, n: int, k: int, sms: int) -> list[tuple[int, int, int, int]]:
    """Every instantiated wgmma tile, with the split-K counts that keep the grid within ~2 waves."""
    configs = []
    for bm, bn, stages, cluster in lib.wgmma_variants:
        if bn > 64 and m <= 32 or bn > 128 and m <= 64:
            continue  # a block mostly of padding tokens
        tiles = runtime._wgmma_tiles(m, n, bm, bn, cluster)
        for splits in SPLITS:
            if splits == 1 or tiles * splits <= 2 * sms and k // 128 >= 4 * splits:
                configs.append((bm, bn, stages, cluster, splits))
    return configs


def parse_config(name: str) -> tuple[int, ...]:
    """A configuration as the tables name it ("128x256x4x1x1") -> its integers."""
    return tuple(int(v) for v in name.split("x"))


class Rotation:
    """Cycles through weight copies so each call reads its weights from HBM."""

    def __init__(self, copies):
        self.copies, self.i = copies, 0

    def next(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


def tinygemm_weights(n: int, k: int, dev) -> list | None:
    try:
        return [(torch._convert_weight_to_int4pack(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev), 8),
                 torch.ones(k // GROUP, n, 2, device=dev, dtype=torch.bfloat16)) for _ in range(COPIES)]
    except (RuntimeError, TypeError) as exc:
        print(f"tinygemm unavailable: {exc}")
        return None


def measure_shape(lib, shape: str, n: int, k: int, rows: list[int], bandwidth: float, tune: bool, dev):
    gen = torch.Generator().manual_seed(0)
    packed = []
    for _ in range(COPIES):
        w = random_dual_grained(n, k, GROUP, gen)
        packed.append((pack_nibbles(w.codes).to(dev), w.s2.to(dev), w.zero.to(dev), w.s1.half().to(dev)))
    dgq_w = Rotation(packed)
    bf16_w = Rotation([torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)])
    int8_w = Rotation([torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(COPIES)])
    fp8_w = Rotation([(torch.randn(n, k, device=dev) * 0.02).to(torch.float8_e4m3fn) for _ in range(COPIES)])
    a16w4 = tinygemm_weights(n, k, dev)
    a16w4_w = Rotation(a16w4) if a16w4 else None
    s_w = torch.rand(1, n, device=dev)
    weight_bytes = sum(t.numel() * t.element_size() for t in packed[0])
    results, paths, variants = [], {}, {}
    for m in rows:
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        xb, x8 = x.bfloat16(), torch.randint(-127, 128, (max(m, 17), k), device=dev, dtype=torch.int8)
        xf8, s_x = x.to(torch.float8_e4m3fn), torch.rand(m, 1, device=dev)
        x_q = x8[:m].contiguous()
        key = f"{1 << max(m - 1, 0).bit_length()},{n},{k}"

        def unpack_gemm():
            qw, s2, zp, s1 = dgq_w.next()
            w_s8 = runtime.unpack_s8(lib, qw, s2, zp, GROUP)
            if lib.gemm_variants:
                runtime.int8_gemm(lib, x_q, s_x, w_s8, s1, torch.float16)
            else:
                from dgqtool.gemm import dual_scale_gemm

                dual_scale_gemm(x_q, s_x, w_s8, s1, torch.float16)

        row = {"shape": shape, "N": n, "K": k, "M": m, "bound_us": weight_bytes / bandwidth * 1e6,
               "unpack_gemm_us": bench(unpack_gemm),
               "quantize_us": bench(lambda: runtime.quantize_rows(lib, x)),
               "int8_us": bench(lambda: torch._int_mm(x8, int8_w.next().T)),
               "bf16_us": bench(lambda: xb @ bf16_w.next().T),
               "fp8_us": bench(lambda: torch._scaled_mm(xf8, fp8_w.next().T, scale_a=s_x, scale_b=s_w,
                                                         out_dtype=torch.bfloat16))}
        if a16w4_w is not None:
            def tinygemm():
                w4, scales_and_zeros = a16w4_w.next()
                torch._weight_int4pack_mm(xb, w4, GROUP, scales_and_zeros)

            row["a16w4_us"] = bench(tinygemm)
        if m == 1:
            row["gemv_configs_us"] = {f"{c[0]}x{c[1]}": bench(lambda c=c: runtime.gemv(
                lib, x_q, s_x, *dgq_w.next(), GROUP, torch.float16, c)) for c in runtime.GEMV_CONFIGS}
            best = min(row["gemv_configs_us"], key=row["gemv_configs_us"].get)
            row["gemv_us"], row["gemv_config"] = row["gemv_configs_us"][best], best
        if m <= MMA_ROWS:
            row["mma_configs_us"] = {f"{c[0]}x{c[1]}": bench(
                lambda c=c: runtime.mma(lib, x_q, s_x, *dgq_w.next(), GROUP, torch.float16, c))
                for c in runtime.mma_configs(m)}
            best = min(row["mma_configs_us"], key=row["mma_configs_us"].get)
            row["mma_us"], row["mma_config"] = row["mma_configs_us"][best], best
        if lib.wgmma_variants and m >= WGMMA_MIN_ROWS:
            x_p = runtime.permute_s8(lib, x_q)
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            row["wgmma_configs_us"] = {"x".join(map(str, c)): bench(
                lambda c=c: runtime.wgmma_permuted(lib, x_p, s_x, *dgq_w.next(), GROUP, torch.float16, c))
                for c in wgmma_configs(lib, m, n, k, sms)}
            best = min(row["wgmma_configs_us"], key=row["wgmma_configs_us"].get)
            row["wgmma_us"], row["wgmma_config"] = row["wgmma_configs_us"][best], best
            row["quantize_perm_us"] = bench(lambda: runtime.quantize_rows_permuted(lib, x))

            def quantize_then_wgmma(c=parse_config(best)):
                x_new, s_new = runtime.quantize_rows_permuted(lib, x)
                runtime.wgmma_permuted(lib, x_new, s_new, *dgq_w.next(), GROUP, torch.float16, c)

            # the two kernels of the dispatched wgmma path in sequence: tells a cost of the pair
            # (measured above the sum of the parts at M >= 1024) from one of the dispatch itself
            row["quantize_then_wgmma_us"] = bench(quantize_then_wgmma)
        if tune and lib.gemm_variants and m > 16:
            w_s8 = runtime.unpack_s8(lib, *dgq_w.next()[:3], GROUP)
            times = {v: bench(lambda v=v: runtime.int8_gemm(lib, x_q, s_x, w_s8, packed[0][3], torch.float16, v))
                     for v in lib.gemm_variants}
            variants[key] = min(times, key=times.get)
            row["variants_us"] = times
        if tune:
            # unpack+gemm was timed with the previous table's variant; tuning re-times the winner below
            # the wgmma path by its two kernels timed in sequence (its quantization is its own, and the
            # pair cost more than its parts at M >= 1024), less the quantization the others share
            wg = row.get("quantize_then_wgmma_us")
            candidates = {"gemm": row["unpack_gemm_us"], "gemv": row.get("gemv_us"), "mma": row.get("mma_us"),
                          "wgmma": None if wg is None else wg - row["quantize_us"]}
            path = min((p for p in candidates if candidates[p] is not None), key=candidates.get)
            config = row.get(f"{path}_config")
            paths[key] = [path, list(parse_config(config))] if config else [path]
            lib.paths[key] = paths[key]
            if key in variants:
                lib.tuned[key] = variants[key]
        row["dgq_us"] = bench(lambda: runtime.dgq_linear(lib, x, *dgq_w.next(), GROUP))
        if shape in NORMED:
            norm_w = torch.rand(k, device=dev, dtype=x.dtype) + 0.5
            row["pre_op"] = "rmsnorm"
            row["pre_dgq_us"] = bench(lambda: runtime.dgq_linear(lib, x, *dgq_w.next(), GROUP, norm=(norm_w, EPS)))
            row["pre_us"] = bench(lambda: compiled_norm(x, norm_w, EPS))
        elif shape == "down":
            gate_up = torch.randn(m, 2 * k, device=dev, dtype=x.dtype)
            row["pre_op"] = "silu*mul"
            row["pre_dgq_us"] = bench(lambda: runtime.dgq_linear(lib, gate_up, *dgq_w.next(), GROUP, silu_mul=True))
            row["pre_us"] = bench(lambda: compiled_silu_mul(gate_up))
        if "pre_us" in row:
            row["in_pre_us"] = row["pre_dgq_us"] - row["pre_us"]
            row["fp8_over_in_pre"] = row["fp8_us"] / row["in_pre_us"] if row["in_pre_us"] > 0 else float("nan")
        for base in ("int8", "bf16", "fp8", "a16w4"):
            if f"{base}_us" in row:
                row[f"{base}_over_dgq"] = row[f"{base}_us"] / row["dgq_us"]
        row["bound_fraction"] = row["bound_us"] / row["dgq_us"]
        results.append(row)
        row["path"] = runtime.choose_path(lib, m, n, k)[0]
        print(f"{shape:8s} M={m:5d}  dgq {row['dgq_us']:7.1f} ({row['path']})  gemv {row.get('gemv_us', 0):7.1f}  "
              f"mma {row.get('mma_us', 0):7.1f} ({row.get('mma_config', '-')})  "
              f"wgmma {row.get('wgmma_us', 0):7.1f} ({row.get('wgmma_config', '-')})  unpack+gemm {row['unpack_gemm_us']:7.1f}  "
              f"int8 {row['int8_us']:7.1f}  bf16 {row['bf16_us']:7.1f}  fp8 {row['fp8_us']:7.1f}  "
              f"a16w4 {row.get('a16w4_us', 0):7.1f}  bound {row['bound_us']:6.1f} us   x int8 {row['int8_over_dgq']:.2f}  "
              f"x bf16 {row['bf16_over_dgq']:.2f}  x fp8 {row['fp8_over_dgq']:.2f}"
              + (f"  in-{row['pre_op']} {row['in_pre_us']:.1f} x fp8 {row['fp8_over_in_pre']:.2f}" if "in_pre_us" in row else ""),
              flush=True)
    return results, paths, variants


@torch.compile(fullgraph=True)
def compiled_norm(x, weight, eps):
    from dgqtool.ops import rms_norm

    return rms_norm(x, weight, eps)


@torch.compile(fullgraph=True)
def compiled_silu_mul(x):
    from dgqtool.ops import silu_mul

    return silu_mul(x)


def _cell(row: dict, key: str, fmt: str = "{:.1f}") -> str:
    return fmt.format(row[key]) if key in row else "–"


def markdown(rows: list[dict]) -> str:
    lines = ["| shape (N×K) | M | DGQ linear µs | path | path µs: GEMV / mma / wgmma / unpack+GEMM | wgmma config "
             "| quant µs | int8 µs | bf16 µs "
             "| fp8 µs | A16W4 µs | int8/DGQ | bf16/DGQ | fp8/DGQ | A16W4/DGQ | bound/DGQ "
             "| pre op | pre+DGQ µs | pre µs | in-pre µs | fp8/in-pre |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} {r['N']}×{r['K']} | {r['M']} | {r['dgq_us']:.1f} | {r.get('path', '–')} | "
                     f"{_cell(r, 'gemv_us')} / {_cell(r, 'mma_us')} / {_cell(r, 'wgmma_us')} / {r['unpack_gemm_us']:.1f} | "
                     f"{r.get('wgmma_config', '–')} | {r['quantize_us']:.1f} | {r['int8_us']:.1f} | {r['bf16_us']:.1f} | "
                     f"{r['fp8_us']:.1f} | {_cell(r, 'a16w4_us')} | {r['int8_over_dgq']:.2f} | {r['bf16_over_dgq']:.2f} | "
                     f"{r['fp8_over_dgq']:.2f} | {_cell(r, 'a16w4_over_dgq', '{:.2f}')} | {r['bound_fraction']:.2f} | "
                     f"{r.get('pre_op', '–')} | {_cell(r, 'pre_dgq_us')} | {_cell(r, 'pre_us')} | {_cell(r, 'in_pre_us')} | "
                     f"{_cell(r, 'fp8_over_in_pre', '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in rows if r["shape"] == shape]
        for key, label in (("dgq_us", "DGQ W4A8"), ("int8_us", "int8 _int_mm"), ("bf16_us", "bf16"),
                           ("fp8_us", "fp8 _scaled_mm"), ("a16w4_us", "A16W4 tinygemm")):
            pts = [(r["M"], r[key]) for r in sel if key in r]
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="µs per call", title=f"{shape} {sel[0]['N']}×{sel[0]['K']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gemm"))
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    lib = runtime.library(dev)
    assert lib is not None, "kernel library unavailable"
    name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(dev)
    print(f"device {name}, arch {lib.arch}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, GEMM variants {lib.gemm_variants}")
    rows, paths, variants = [], {}, {}
    for shape in args.shapes:
        n, k = SHAPES[shape]
        shape_rows, shape_paths, shape_variants = measure_shape(lib, shape, n, k, args.rows, bandwidth, args.tune, dev)
        rows += shape_rows
        paths.update(shape_paths)
        variants.update(shape_variants)
        torch.cuda.empty_cache()
        write_results(args, name, bandwidth, rows, paths, variants)  # after every shape: a cut-off run keeps them
    print(markdown(rows))
    plot(rows, args.out / "gemm.png")
    if args.tune:
        print(f"tuning table: {args.out / 'tuned_sm90.json'} (copy to {build.source_dir() / 'tuned_sm90.json'})")


def write_results(args, name: str, bandwidth: float, rows: list, paths: dict, variants: dict) -> None:
    (args.out / "gemm.json").write_text(json.dumps({"device": name, "group": GROUP, "copy_TBps": bandwidth / 1e12,
                                                   "rows": rows}, indent=1))
    (args.out / "gemm.md").write_text(markdown(rows))
    if args.tune:
        # rows and shapes not re-measured keep their previous entries
        previous = json.loads((build.source_dir() / "tuned_sm90.json").read_text())
        tuned = {"device": name, "note": "per (M bucket, N, K): fastest emitted GEMM variant (choice) and fastest path "
                 "(paths: gemv [channels per warp, steps in flight] | mma [channel tiles, warps] | "
                 "wgmma [block channels, block tokens, stages, splits] | gemm); scripts/bench_gemm.py --tune",
                 "choice": {**previous.get("choice", {}), **variants}, "paths": {**previous.get("paths", {}), **paths}}
        (args.out / "tuned_sm90.json").write_text(json.dumps(tuned, indent=1))


if __name__ == "__main__":
    main()
