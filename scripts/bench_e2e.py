"""End-to-end W4A8 DGQ vs FP8 W8A8 vs bf16 at Llama-2-7B scale on one GPU, all measured in the same run.

The model is the Llama-2-7B architecture with random weights (built on the meta device, filled on
the GPU; no download). Three sets of decoder linears are built from the same weights and kept
resident, and every measurement runs the three back to back (swapping the linears in), so clocks
and the GPU's state are shared:
  bf16  the model as built (cuBLAS bf16);
  FP8   W8A8 baseline: every decoder linear through `torch._scaled_mm`, per-channel e4m3 weights
        (row-wise scales), per-token dynamic e4m3 activations (quantized by torch ops in the forward);
  DGQ   every decoder linear as the RTN dual-grained weight (the fast path: accuracy is irrelevant
        for speed) in DGQLinear modules running the CUDA kernels.
FP8 and DGQ both get q/k/v and gate/up fused into one GEMM each, as `dgq run` loads DGQ; all three
decode over a static KV cache with one CUDA graph per token (`dgq run`'s graph_decode). With
--compile, all three decode through the same torch.compile'd step (`dgq run`'s compile_step:
inductor, default mode, fullgraph) captured in that CUDA graph; the prefill stays eager. Not
"reduce-overhead" (inductor's own CUDA graphs would nest inside graph_decode's capture) nor
"max-autotune" (minutes of GEMM autotuning per shape for bf16 and FP8, which cuBLAS/_scaled_mm
already pick; the DGQ op is opaque to it). Compiling happens in graph_decode's warm-up step, before
the timed interval: once per variant for batch 1, once more for the dynamic batch.
Measured: prefill time (default batch 1 and 8 for 512 / 2048 / 4096 tokens); decode tokens/s at
batch 1 ... 256 after a 512-token context; the weight memory of the linears and peak memory (the
other variants' resident linears subtracted). Writes e2e.json, e2e.md and e2e.png.

    python scripts/bench_e2e.py --out results/e2e [--layers 32] [--prefill 1x512,8x2048] [--decode 1,64] [--compile]
    python scripts/bench_e2e.py --check     # tiny model on CPU (or GPU): the FP8 path against bf16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from dgqtool.checkpoint import fuse_for_inference
from dgqtool.models.adapters import adapter_for, decoder_layers
from dgqtool.nn.dgq_linear import DGQLinear
from dgqtool.nn.fused import ProjectionSlice, SharedInputLinear
from dgqtool.quant.search import rtn_dual_grained
from dgqtool.run import compile_step, graph_decode

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(LLAMA2_7B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=512, max_position_embeddings=256)
PREFILL = [(1, 512), (1, 2048), (1, 4096), (8, 512), (8, 2048), (8, 4096)]
DECODE_BATCHES = [1, 8, 32, 64, 128, 256]
CONTEXT, NEW_TOKENS = 512, 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS = ("bf16", "fp8", "dgq")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class FP8Linear(nn.Module):
    """W8A8 FP8 baseline: y = (x_q · s_x) (W_q · s_w)ᵀ by `torch._scaled_mm` with row-wise scales, e4m3
    weights quantized per output channel, activations quantized per token at run time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        w = weight.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (w / scale).to(FP8))  # (out, in) row-major: .t() is column-major
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, out) fp32
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
        amax = amax.clamp(min=1e-12)
        xq = (x2 * (FP8_MAX / amax)).to(FP8)
        scale_x = amax / FP8_MAX
        if x2.is_cuda:
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_x, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=self.out_dtype)
        else:  # CPU check only: the same arithmetic emulated in fp32
            out = (xq.float() @ self.weight.float().t()) * scale_x * self.weight_scale
            out = (out if self.bias is None else out + self.bias.float()).to(self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def build(layers: int, shape: dict = LLAMA2_7B, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, device=device) * 0.02)
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


def linears_of(model) -> list[dict[str, nn.Module]]:
    """The MLP module, decoder linears and norms now in the model, per layer, by adapter name ('mlp',
    'self_attn.q_proj', 'input_layernorm', ...), the MLP first: a variant swaps all of them, since
    DGQ's fused linears compute their norms and its down_proj the MLP's activation."""
    adapter = adapter_for(model.config.model_type)
    names = (adapter.gated_mlp.path,) + adapter.linear_names() + adapter.residual.norms
    return [{name: layer.get_submodule(name) for name in names} for layer in decoder_layers(model, adapter)]


def install(model, variant: list[dict[str, nn.Module]]) -> None:
    for layer, modules in zip(decoder_layers(model, adapter_for(model.config.model_type)), variant):
        for name, module in modules.items():
            layer.set_submodule(name, module)


@torch.no_grad()
def fp8_variant(model, bf16: list[dict[str, nn.Module]]) -> list[dict[str, nn.Module]]:
    """FP8Linear modules from the bf16 linears, each adapter input group (q/k/v, gate/up) fused into
    one GEMM through the same SharedInputLinear / ProjectionSlice as the DGQ model."""
    adapter = adapter_for(model.config.model_type)
    variant = []
    for linears in bf16:
        modules = {adapter.gated_mlp.path: linears[adapter.gated_mlp.path]}  # bf16's MLP, FP8 linears set into it
        for group in adapter.inputs:
            members = [linears[name] for name in group.linears]
            weight = torch.cat([m.weight for m in members])
            biases = [m.bias for m in members]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else torch.zeros(m.out_features, device=weight.device) for b, m in zip(biases, members)])
            fused = FP8Linear(weight, bias, model.dtype)
            if len(members) == 1:
                modules[group.linears[0]] = fused
                continue
            shared, start = SharedInputLinear(fused, tuple(m.out_features for m in members)), 0
            for i, (name, member) in enumerate(zip(group.linears, members)):
                modules[name] = ProjectionSlice(shared, i, start, start + member.out_features)
                start += member.out_features
        modules.update({name: linears[name] for name in adapter.residual.norms})  # bf16's own norms
        variant.append(modules)
    return variant


@torch.no_grad()
def quantize_in_place(model, group: int = 128) -> None:
    device = next(model.parameters()).device
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                if hasattr(module, name):
                    linear = getattr(module, name)
                    weight = rtn_dual_grained(linear.weight.float(), group)
                    with torch.device(device):  # built where it runs, no round trip through the host
                        setattr(module, name, DGQLinear.from_weight(weight, linear.bias, None, torch.bfloat16).to(device))
                    del linear
    torch.cuda.empty_cache()


def timed(fn, repeats: int = 3, warmups: int = 1) -> float:
    """Median milliseconds of `fn` over `repeats` runs timed with CUDA events, after `warmups`."""
    for _ in range(warmups):
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


def decode_ms_per_token(model, ids: torch.Tensor, repeats: int, step_model=None) -> float:
    """Milliseconds per decode step (graph replay + token pick), from CUDA events recorded as each
    token is handed out; median of `repeats` graph_decode calls. The interval runs from the second
    token to the last (NEW_TOKENS - 1 replays): graph_decode hands out its first token before the
    eager warm-up step and the capture, which must not count."""
    times = []
    for _ in range(repeats):
        events = []

        def mark(_token):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append(event)

        graph_decode(model, ids, NEW_TOKENS + 1, on_token=mark, step_model=step_model)
        events[-1].synchronize()
        times.append(events[1].elapsed_time(events[-1]) / (len(events) - 2))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure(model, variants: dict, prefill, decode_batches, decode_repeats: int, step_model=None) -> dict:
    """Every case for every variant back to back; prints each figure and the ratios as they come.
    step_model: the compiled decode step (compile_step(model)), else eager."""
    results = {label: {"prefill_ms": {}, "decode_tok_s": {}, "peak_gb": {}} for label in variants}
    weights = {}
    for label, variant in variants.items():
        install(model, variant)
        weights[label] = linear_bytes(model)
        results[label]["weights_linear_gb"] = weights[label] / 1e9
    vocab = model.config.vocab_size

    def run_case(kind, key, fn):
        for label, variant in variants.items():
            install(model, variant)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            value = fn()
            others = sum(weights.values()) - weights[label]  # the other variants' linears stay resident
            results[label]["peak_gb"][f"{kind}_{key}"] = (torch.cuda.max_memory_allocated() - others) / 1e9
            results[label]["prefill_ms" if kind == "prefill" else "decode_tok_s"][key] = value
        row = {label: results[label]["prefill_ms" if kind == "prefill" else "decode_tok_s"][key] for label in variants}
        unit = "ms" if kind == "prefill" else "tokens/s"
        figures = "  ".join(f"{label} {value:9.1f}" for label, value in row.items())
        if {"bf16", "fp8", "dgq"} <= row.keys():
            speed = (lambda a, b: a / b) if kind == "prefill" else (lambda a, b: b / a)
            figures += f"  DGQ/bf16 {speed(row['bf16'], row['dgq']):.2f}x  DGQ/FP8 {speed(row['fp8'], row['dgq']):.2f}x"
        print(f"{kind:7s} {key:9s} ({unit}): {figures}", flush=True)

    for batch, seqlen in prefill:
        ids = torch.randint(0, vocab, (batch, seqlen), device="cuda")
        run_case("prefill", f"b{batch}_s{seqlen}", lambda: timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)))
    for batch in decode_batches:
        ids = torch.randint(0, vocab, (batch, CONTEXT), device="cuda")
        run_case("decode", f"b{batch}", lambda: batch / (decode_ms_per_token(model, ids, decode_repeats, step_model) / 1e3))
    return results


def report(results: dict, out: Path, device: str, command: str, compiled: bool) -> str:
    bf16, fp8, dgq = results["bf16"], results["fp8"], results["dgq"]
    step = "the torch.compile'd step (inductor, default mode)" if compiled else "the eager step"
    lines = [f"Llama-2-7B architecture, random weights, {device}; FP8 = W8A8 e4m3 row-wise `_scaled_mm`, dynamic "
             f"per-token activations; DGQ = W4A8 g128 dynamic, CUDA kernels; q/k/v and gate/up fused in FP8 and DGQ; "
             f"decode: static KV cache, one CUDA graph per token of {step}, {NEW_TOKENS} tokens after {CONTEXT} context. "
             f"Ratios > 1: DGQ faster.", "", f"`{command}`", "",
             "| measurement | bf16 | FP8 W8A8 | DGQ W4A8 | DGQ / bf16 | DGQ / FP8 |", "|---|---|---|---|---|---|"]
    for key, ms in bf16["prefill_ms"].items():
        d, f = dgq["prefill_ms"][key], fp8["prefill_ms"][key]
        lines.append(f"| prefill {key.replace('_', ' ')} (ms) | {ms:.1f} | {f:.1f} | {d:.1f} | {ms / d:.2f}× | {f / d:.2f}× |")
    for key, tps in bf16["decode_tok_s"].items():
        d, f = dgq["decode_tok_s"][key], fp8["decode_tok_s"][key]
        lines.append(f"| decode {key} (tokens/s) | {tps:.0f} | {f:.0f} | {d:.0f} | {d / tps:.2f}× | {d / f:.2f}× |")
    lines.append(f"| weight memory of the linears (GB) | {bf16['weights_linear_gb']:.2f} | {fp8['weights_linear_gb']:.2f} | "
                 f"{dgq['weights_linear_gb']:.2f} | {dgq['weights_linear_gb'] / bf16['weights_linear_gb']:.3f} of bf16 | "
                 f"{dgq['weights_linear_gb'] / fp8['weights_linear_gb']:.3f} of FP8 |")
    peaks = [k for k in bf16["peak_gb"] if k.startswith("prefill")][-1:] + [k for k in bf16["peak_gb"] if k.startswith("decode")][-1:]
    for key in peaks:
        lines.append(f"| peak memory, {key} (GB) | {bf16['peak_gb'][key]:.1f} | {fp8['peak_gb'][key]:.1f} | {dgq['peak_gb'][key]:.1f} | | |")
    decode = [(k, dgq["decode_tok_s"][k] / bf16["decode_tok_s"][k], dgq["decode_tok_s"][k] / fp8["decode_tok_s"][k])
              for k in bf16["decode_tok_s"]]
    prefill = [(k, fp8["prefill_ms"][k] / dgq["prefill_ms"][k]) for k in bf16["prefill_ms"]]
    b1 = [b for k, b, _ in decode if k == "b1"]
    lines += ["", *([f"Issue #18 target: decode b1 DGQ >= 2.5x bf16 {'met' if b1[0] >= 2.5 else 'MISSED'} ({b1[0]:.2f})."]
                    if b1 else []),
              "Issue #17 targets: decode DGQ >= 1.5x bf16 "
              f"{'met' if all(b >= 1.5 for _, b, _ in decode) else 'MISSED'} "
              f"({', '.join(f'{k} {b:.2f}' for k, b, _ in decode)}); decode DGQ >= 1.2x FP8 "
              f"{'met' if all(f >= 1.2 for _, _, f in decode) else 'MISSED'} "
              f"({', '.join(f'{k} {f:.2f}' for k, _, f in decode)}); no prefill slower than FP8 "
              f"{'met' if all(f >= 1.0 for _, f in prefill) else 'MISSED'} ({', '.join(f'{k} {f:.2f}' for k, f in prefill)})."]
    text = "\n".join(lines) + "\n"
    (out / "e2e.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [f"prefill {k}" for k in bf16["prefill_ms"]] + [f"decode {k}" for k in bf16["decode_tok_s"]]
        over_bf16 = [bf16["prefill_ms"][k] / dgq["prefill_ms"][k] for k in bf16["prefill_ms"]] + [b for _, b, _ in decode]
        over_fp8 = [f for _, f in prefill] + [f for _, _, f in decode]
        x = torch.arange(len(names)).tolist()
        fig, ax = plt.subplots(figsize=(10, 3.8))
        ax.bar([i - 0.2 for i in x], over_bf16, width=0.4, label="DGQ / bf16")
        ax.bar([i + 0.2 for i in x], over_fp8, width=0.4, label="DGQ / FP8 W8A8")
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("DGQ speed-up")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "e2e.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    return text


@torch.no_grad()
def check(device: str) -> None:
    """Tiny model: the FP8 linear against its fp32 emulation (GPU) and the FP8 model's logits
    against bf16 (the fusion wiring and the quantization; random weights, so a loose bound)."""
    if device == "cuda":
        x, w = torch.randn(37, 4096, device=device, dtype=torch.bfloat16), torch.randn(1024, 4096, device=device) * 0.02
        layer = FP8Linear(w, None)
        amax = x.float().abs().amax(-1, keepdim=True)
        xq = (x.float() * (FP8_MAX / amax)).to(FP8)
        ref = (xq.float() @ layer.weight.float().t()) * (amax / FP8_MAX) * layer.weight_scale
        err = ((layer(x).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"_scaled_mm differs from its emulation: relative error {err:.3g}"
    model = build(2, TINY, device)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), device=device)
    ref = model(input_ids=ids, use_cache=False).logits.float()
    bf16 = linears_of(model)
    install(model, fp8_variant(model, bf16))
    assert isinstance(model.model.layers[0].self_attn.k_proj, ProjectionSlice)
    got = model(input_ids=ids, use_cache=False).logits.float()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 0.25, f"FP8 logits off by {err:.3g} relative to bf16"
    print(f"check ({device}): FP8 model logits within {err:.3g} (relative) of bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/e2e"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prefill", default=",".join(f"{b}x{s}" for b, s in PREFILL),
                        help="prefill cases BATCHxTOKENS, comma-separated")
    parser.add_argument("--decode", default=",".join(map(str, DECODE_BATCHES)), help="decode batches, comma-separated")
    parser.add_argument("--decode-repeats", type=int, default=2, help="graph_decode calls per decode case (median)")
    parser.add_argument("--compile", action="store_true", help="decode through the torch.compile'd step (all three)")
    parser.add_argument("--check", action="store_true", help="only the tiny-model check of the FP8 path (CPU if no GPU)")
    args = parser.parse_args()
    if args.check:
        check("cuda" if torch.cuda.is_available() else "cpu")
        return
    prefill = [tuple(int(v) for v in case.split("x")) for case in args.prefill.split(",") if case]
    decode_batches = [int(b) for b in args.decode.split(",") if b]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        check("cuda")
    except (AssertionError, RuntimeError) as exc:  # the timings still stand; say so loudly
        print(f"CHECK FAILED: {exc}", flush=True)
    model = build(args.layers)
    variants = {"bf16": linears_of(model)}
    variants["fp8"] = fp8_variant(model, variants["bf16"])
    quantize_in_place(model)
    fuse_for_inference(model)  # as dgq run does: q/k/v and gate/up as one GEMM each
    variants["dgq"] = linears_of(model)
    from dgqtool.kernels import runtime

    lib = runtime.library(torch.device("cuda"))  # built here if not cached
    print(f"models built in {time.perf_counter() - start:.0f} s; kernel library: "
          f"{lib.arch if lib is not None else 'NONE (DGQ on the fallback path)'}", flush=True)
    step_model = None
    if args.compile:
        torch._dynamo.config.recompile_limit = 16  # 3 variants x (batch 1, dynamic batch), with room
        step_model = compile_step(model)  # install() swaps linears inside it: the guards recompile per variant
    results = measure(model, variants, prefill, decode_batches, args.decode_repeats, step_model)
    device = torch.cuda.get_device_name()
    command = "python scripts/bench_e2e.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("check", "compile"))
    command += " --compile" if args.compile else ""
    (args.out / "e2e.json").write_text(json.dumps({"device": device, "layers": args.layers, "command": command,
                                                   "context": CONTEXT, "new_tokens": NEW_TOKENS, "compile": args.compile, **results}, indent=1))
    print(report(results, args.out, device, command, args.compile))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
