"""Run the dispatched DGQ linear on Llama-2-7B linear shapes, for Nsight Compute to profile.

    ncu --set full -k regex:'gemv|mma_kernel|quantize_rows' -o results/prof \
        python scripts/profile_kernels.py --shapes o down --rows 1 8 16
    ncu --import results/prof.ncu-rep --page details --csv > results/prof.csv

Every call takes the next of several weight copies, so (with ncu's default cache flush as well)
the codes come from HBM as they do in decode.
"""

from __future__ import annotations

import argparse

import torch
from bench_gemm import COPIES, GROUP, SHAPES, Rotation, parse_config

from dgqtool.kernels import runtime
from dgqtool.quant.dual_grained import pack_nibbles, random_dual_grained


def trace_launch(lib, launch) -> None:
    """One launch with the kernel's per-unit trace on: where a unit's time goes, in µs."""
    import ctypes

    trace = torch.zeros(6 << 20, dtype=torch.int64, device="cuda")
    fn = lib.lib.dgq_wgmma_set_trace
    fn.argtypes, fn.restype = [ctypes.c_void_p], None
    torch.cuda.synchronize()
    fn(trace.data_ptr())
    launch()
    torch.cuda.synchronize()
    fn(None)
    rec = trace.view(-1, 6).cpu()
    rec = rec[rec[:, 1] > 0].double()
    t0 = rec[:, 1].min()
    span = (rec[:, 5].max() - t0) / 1e3
    setup, fill = (rec[:, 2] - rec[:, 1]) / 1e3, (rec[:, 3] - rec[:, 2]) / 1e3
    main, epi = (rec[:, 4] - rec[:, 3]) / 1e3, (rec[:, 5] - rec[:, 4]) / 1e3
    life = (rec[:, 5] - rec[:, 1]) / 1e3
    busy = torch.zeros(int(rec[:, 0].max()) + 1, dtype=torch.float64).index_add_(0, rec[:, 0].long(), life)
    first = (rec[:, 1] - t0) / 1e3
    print(f"  trace: {len(rec)} units, span {span:.1f} us; per unit mean: setup {setup.mean():.2f}  first stage "
          f"{fill.mean():.2f}  main loop {main.mean():.2f}  epilogue {epi.mean():.2f}  life {life.mean():.2f} us; "
          f"SM busy {busy.mean() / span * 100:.0f}% of span; first-wave start spread {first.kthvalue(min(len(first), 132)).values:.2f} us",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 8, 16])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--wgmma", default=None,
                        help="time the fused wgmma kernel alone in this configuration, e.g. 128x64x8x1x1 "
                             "(block channels x tokens x stages x cluster x splits) instead of the dispatched linear")
    parser.add_argument("--trace", action="store_true",
                        help="with --wgmma: per-unit %%globaltimer trace of one launch (prologue, main loop, epilogue)")
    args = parser.parse_args()
    lib = runtime.library(torch.device("cuda"))
    assert lib is not None, "kernel library unavailable"
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        n, k = SHAPES[shape]
        copies = []
        for _ in range(COPIES):
            w = random_dual_grained(n, k, GROUP, gen)
            copies.append((pack_nibbles(w.codes).cuda(), w.s2.cuda(), w.zero.cuda(), w.s1.half().cuda()))
        weights = Rotation(copies)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            if args.wgmma:
                config = parse_config(args.wgmma)
                x_p, s_x = runtime.quantize_rows_permuted(lib, x)
                print(shape, m, "wgmma", config, flush=True)
                for _ in range(args.calls):
                    runtime.wgmma_permuted(lib, x_p, s_x, *weights.next(), GROUP, torch.float16, config)
                if args.trace:
                    trace_launch(lib, lambda: runtime.wgmma_permuted(lib, x_p, s_x, *weights.next(), GROUP,
                                                                      torch.float16, config))
                continue
            print(shape, m, runtime.choose_path(lib, m, n, k), flush=True)
            for _ in range(args.calls):
                runtime.dgq_linear(lib, x, *weights.next(), GROUP)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
