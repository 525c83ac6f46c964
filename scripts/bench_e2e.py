"""End-to-end W4A8 DGQ vs bf16 at Llama-2-7B scale on one GPU, both measured in the same run.

The model is the Llama-2-7B architecture with random weights (built on the meta device, filled on
the GPU; no download). DGQ replaces every decoder linear with the RTN dual-grained weight (the fast
path: accuracy is irrelevant for speed) in DGQLinear modules running the CUDA kernels, with q/k/v and
gate/up fused into one GEMM each as `dgq run` loads them.
Measured: prefill time at batch 1 and 8 for 512 / 2048 / 4096 tokens; decode tokens/s at batch 1,
8, 32 after a 512-token context (static KV cache, one CUDA graph per token, as `dgq run`); the
weight memory of the quantized linears and peak memory. Writes e2e.json, e2e.md and e2e.png.

    python scripts/bench_e2e.py --out results/e2e [--layers 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dgqtool.checkpoint import fuse_for_inference
from dgqtool.nn.dgq_linear import DGQLinear
from dgqtool.quant.search import rtn_dual_grained
from dgqtool.run import graph_decode

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
PREFILL = [(1, 512), (1, 2048), (1, 4096), (8, 512), (8, 2048), (8, 4096)]
DECODE_BATCHES = [1, 8, 32]
CONTEXT, NEW_TOKENS = 512, 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **LLAMA2_7B)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, device="cuda") * 0.02)
    for module in model.modules():
        if getattr(module, "_non_persistent_buffers_set", None):
            model._init_weights(module)
    return model.bfloat16().eval()


def linear_bytes(model) -> int:
    total = 0
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                if hasattr(module, name):
                    child = getattr(module, name)
                    total += sum(t.numel() * t.element_size() for t in list(child.parameters()) + list(child.buffers()))
    return total


@torch.no_grad()
def quantize_in_place(model, group: int = 128) -> None:
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                if hasattr(module, name):
                    linear = getattr(module, name)
                    weight = rtn_dual_grained(linear.weight.float(), group)
                    setattr(module, name, DGQLinear.from_weight(weight, linear.bias, None, torch.bfloat16).cuda())
                    del linear
    torch.cuda.empty_cache()


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure(model, label: str) -> dict:
    result = {"weights_linear_gb": linear_bytes(model) / 1e9, "prefill_ms": {}, "decode_tok_s": {}, "peak_gb": {}}
    vocab = model.config.vocab_size
    for batch, seqlen in PREFILL:
        ids = torch.randint(0, vocab, (batch, seqlen), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))
        key = f"b{batch}_s{seqlen}"
        result["prefill_ms"][key] = ms
        result["peak_gb"][f"prefill_{key}"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"{label:5s} prefill batch {batch} x {seqlen}: {ms:8.1f} ms", flush=True)
    for batch in DECODE_BATCHES:
        ids = torch.randint(0, vocab, (batch, CONTEXT), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        full = timed(lambda: graph_decode(model, ids, NEW_TOKENS + 1), repeats=2)
        base = timed(lambda: graph_decode(model, ids, 1), repeats=2)  # prefill, warm-up and capture
        tok_s = batch * NEW_TOKENS / ((full - base) / 1e3)
        result["decode_tok_s"][f"b{batch}"] = tok_s
        result["peak_gb"][f"decode_b{batch}"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"{label:5s} decode batch {batch}: {tok_s:9.1f} tokens/s", flush=True)
    return result


def report(bf16: dict, dgq: dict, out: Path, device: str) -> str:
    lines = [f"Llama-2-7B architecture, random weights, {device}; DGQ = W4A8 g128 dynamic, CUDA kernels.", "",
             "| measurement | bf16 | DGQ W4A8 | bf16 / DGQ |", "|---|---|---|---|"]
    for key, ms in bf16["prefill_ms"].items():
        lines.append(f"| prefill {key.replace('_', ' ')} (ms) | {ms:.1f} | {dgq['prefill_ms'][key]:.1f} | {ms / dgq['prefill_ms'][key]:.2f}× |")
    for key, tps in bf16["decode_tok_s"].items():
        lines.append(f"| decode {key}, {CONTEXT} context (tokens/s) | {tps:.0f} | {dgq['decode_tok_s'][key]:.0f} | {dgq['decode_tok_s'][key] / tps:.2f}× faster |")
    lines.append(f"| weight memory of the linears (GB) | {bf16['weights_linear_gb']:.2f} | {dgq['weights_linear_gb']:.2f} | "
                 f"{dgq['weights_linear_gb'] / bf16['weights_linear_gb']:.3f} of bf16 |")
    for key in ("prefill_b8_s4096", "decode_b32"):
        lines.append(f"| peak memory, {key} (GB) | {bf16['peak_gb'][key]:.1f} | {dgq['peak_gb'][key]:.1f} | |")
    text = "\n".join(lines) + "\n"
    (out / "e2e.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(bf16["prefill_ms"]) + list(bf16["decode_tok_s"])
        speedup = [bf16["prefill_ms"][k] / dgq["prefill_ms"][k] for k in bf16["prefill_ms"]]
        speedup += [dgq["decode_tok_s"][k] / bf16["decode_tok_s"][k] for k in bf16["decode_tok_s"]]
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ax.bar([("prefill " if i < len(PREFILL) else "decode ") + k for i, k in enumerate(keys)], speedup)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speed-up over bf16")
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / "e2e.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/e2e"))
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build(args.layers)
    bf16 = measure(model, "bf16")
    quantize_in_place(model)
    fuse_for_inference(model)  # as dgq run does: q/k/v and gate/up as one GEMM each
    dgq = measure(model, "dgq")
    device = torch.cuda.get_device_name()
    (args.out / "e2e.json").write_text(json.dumps({"device": device, "layers": args.layers, "bf16": bf16, "dgq": dgq}, indent=1))
    print(report(bf16, dgq, args.out, device))


if __name__ == "__main__":
    main()
