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
from bench_gemm import COPIES, GROUP, SHAPES, Rotation

from dgqtool.kernels import runtime
from dgqtool.quant.dual_grained import pack_nibbles, random_dual_grained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 8, 16])
    parser.add_argument("--calls", type=int, default=3)
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
            print(shape, m, runtime.choose_path(lib, m, n, k), flush=True)
            for _ in range(args.calls):
                runtime.dgq_linear(lib, x, *weights.next(), GROUP)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
