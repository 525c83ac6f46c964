"""Where a decode step's GPU time goes, bf16 vs DGQ, at Llama-2-7B scale (batch 1 by default).

Same model and quantization as scripts/bench_e2e.py. After a 512-token prefill into a static KV
cache (per sequence of the batch), torch.profiler records eager decode steps (the kernels are those `dgq run` replays from its
CUDA graph; eager adds only launch gaps, which the device-time sums below leave out) and sums each
kernel's device time per token into categories:
  dgq linears   our kernels: activation quantization, GEMV, tensor-core kernel, expansion + GEMM;
  bf16 GEMMs    cuBLAS / CUTLASS matmuls (all linears for bf16; lm_head for both);
  attention     scaled-dot-product attention kernels;
  other         everything else: norms, rotary, residual adds, KV-cache writes, masks, copies.

    python scripts/profile_decode.py [--layers 32] [--steps 8] [--batch 256]

At batch 256 the bf16 KV cache is what bench_e2e's decode rows were estimated to be bound by
(docs/kernels.md): the attention row measures its reads (the cache writes count under other).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from bench_e2e import CONTEXT, build, quantize_in_place

from dgqtool.checkpoint import fuse_for_inference

CATEGORIES = (
    ("dgq linears", re.compile(r"mma_kernel|gemv_kernel|quantize_rows|unpack_s8|dgq|GemmUniversal|cutlass3x", re.I)),
    ("bf16 GEMMs", re.compile(r"gemm|gemv|cublas|nvjet|sm90_xmma|cutlass", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient", re.I)),
)


def category(kernel: str) -> str:
    return next((name for name, pattern in CATEGORIES if pattern.search(kernel)), "other")


@torch.no_grad()
def profile(model, steps: int, batch: int = 1) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Device milliseconds per decode step (one token for each of `batch` sequences) by category,
    and the top kernels."""
    from transformers import StaticCache

    ids = torch.randint(0, model.config.vocab_size, (batch, CONTEXT), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=CONTEXT + steps + 4)
    model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(CONTEXT, device="cuda"))
    token = torch.zeros(batch, 1, dtype=torch.long, device="cuda")

    def step(i: int):
        model(input_ids=token, past_key_values=cache, cache_position=torch.tensor([CONTEXT + i], device="cuda"))

    step(0)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(1, steps + 1):
            step(i)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.time_range.elapsed_us() / 1e3 / steps
    by_category: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        by_category[category(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return dict(by_category), top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    args = parser.parse_args()
    model = build(args.layers)
    results = {"bf16": profile(model, args.steps, args.batch)}
    quantize_in_place(model)
    fuse_for_inference(model)
    results["dgq"] = profile(model, args.steps, args.batch)
    names = [name for name, _ in CATEGORIES] + ["other"]
    print(f"| device ms per step (batch {args.batch}) | " + " | ".join(names) + " | total |")
    print("|---" * (len(names) + 2) + "|")
    for label, (by_category, _) in results.items():
        cells = " | ".join(f"{by_category.get(n, 0.0):.3f}" for n in names)
        print(f"| {label} | {cells} | {sum(by_category.values()):.3f} |")
    for label, (_, top) in results.items():
        print(f"\n{label}: top kernels (ms per step)")
        for name, ms in top:
            print(f"  {ms:7.3f}  [{category(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
