#!/usr/bin/env python3
"""Quantize a LLaMA-2-shaped model with random weights end to end and measure every stage.

    python scripts/bench_quantize.py --shape 7b --root /tmp/bench --text calib.txt --recipe paper
    python scripts/bench_quantize.py --shape 70b --layers 2 --root /tmp/bench70 --text calib.txt --recipe paper
    python scripts/bench_quantize.py --shape 7b --layers 4 --root /tmp/bench-rot --text calib.txt   # the default recipe

The model is built from its config (weights drawn on the GPU when there is one, a few input
channels of every norm scaled up to mimic LLaMA's activation outliers) and saved once; a BPE
tokenizer is trained on the calibration text so ids fit the vocabulary. Each stage then runs as
its own `dgq` process, so its manifest's peak RSS and peak GPU memory are that stage's alone.
Writes bench.json and bench.md under --root. `--stages` runs a subset (a later call continues).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
STAGES = ("calibrate", "smooth", "search", "pack")
OUTLIER_CHANNELS, OUTLIER_GAIN = 4, 25.0


def build(shape: str, layers: int | None, text: Path, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text.read_text()], trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, dtype="float16", **dims)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape, device=device)
                value[torch.randperm(param.numel(), generator=gen, device=device)[:OUTLIER_CHANNELS]] = OUTLIER_GAIN
            else:
                value = torch.randn(param.shape, generator=gen, device=device) * 0.02
            param.copy_(value.to(param.dtype))
    for module in model.modules():
        if getattr(module, "_non_persistent_buffers_set", None):
            model._init_weights(module)
    model.half().save_pretrained(path)
    tokenizer.save_pretrained(path)


def dgq(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dgqtool.cli", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, help="decoder layers to build (default: the full model)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/dgq-bench"))
    parser.add_argument("--text", type=Path, required=True, help="calibration text (also trains the tokenizer)")
    parser.add_argument("--nsamples", default="128")
    parser.add_argument("--seqlen", default="2048")
    parser.add_argument("--stages", nargs="*", default=list(STAGES))
    parser.add_argument("--recipe", help="named recipe (`dgq quantize --recipe`) for calibrate, smooth and search; "
                        "without it, dgq's default")
    args = parser.parse_args()
    model_dir, work, out = args.root / "model", args.root / "work", args.root / "packed"
    report_path = args.root / "bench.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"stages": {}}
    if not (model_dir / "config.json").exists():
        start = time.perf_counter()
        build(args.shape, args.layers, args.text, model_dir)
        report["build_seconds"] = time.perf_counter() - start
    report.update(shape=args.shape, layers=args.layers or SHAPES[args.shape]["num_hidden_layers"],
                  nsamples=int(args.nsamples), seqlen=int(args.seqlen), recipe=args.recipe,
                  model_gb=sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9)
    named = ("--recipe", args.recipe) if args.recipe else ()
    commands = {
        "calibrate": ("calibrate", str(model_dir), "-w", str(work), "--calib-data", str(args.text),
                      "--nsamples", args.nsamples, "--seqlen", args.seqlen, *named),
        "smooth": ("smooth", "-w", str(work), *named),
        "search": ("search", "-w", str(work), *named),
        "pack": ("pack", "-w", str(work), "-o", str(out)),
    }
    for stage in args.stages:
        wall = dgq(*commands[stage])
        resources = json.loads((work / stage / "manifest.json").read_text())["resources"]
        report["stages"][stage] = {"wall_seconds": round(wall, 1), **resources}
        report_path.write_text(json.dumps(report, indent=2))
    lines = ["| stage | wall s | peak GPU GiB | peak RSS GiB |", "|---|---|---|---|"]
    for stage, r in report["stages"].items():
        lines.append(f"| {stage} | {r['wall_seconds']:.1f} | {r['peak_gpu_mb'] / 1024:.1f} | {r['peak_rss_mb'] / 1024:.1f} |")
    total = sum(r["wall_seconds"] for r in report["stages"].values())
    lines.append(f"| **total** | **{total:.1f}** | {max(r['peak_gpu_mb'] for r in report['stages'].values()) / 1024:.1f} | "
                 f"{max(r['peak_rss_mb'] for r in report['stages'].values()) / 1024:.1f} |")
    (args.root / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
