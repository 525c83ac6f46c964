#!/usr/bin/env python3
"""llm-compressor's W4A8 recipes on the same model, calibration tokens and eval windows as `dgq`.

    pip install "dgqtool[peers]"       # llm-compressor; it pins its own transformers range
    python scripts/peer_llmcompressor.py smollm2-135m --group 64 --out results/peers \
        --tasks wikitext2 ptb piqa arc_easy

Each recipe runs llm-compressor's `oneshot` on a fresh copy of the float model with the exact
calibration windows `dgq calibrate` draws (same text, seed, count and length), then scores the
in-memory result with dgqtool's own evaluators: compressed-tensors applies the 4-bit weights and the
per-token int8 activations as fake quantization in the forward pass. Writes PEERS.json and PEERS.md
after every recipe. The rotation peers (QuIP, SpinQuant) are `--recipes QuIP SpinQuant`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dgqtool.calib.windows import calibration_tokens
from dgqtool.corpora import data_dir
from dgqtool.eval.runner import headline, score_model
from dgqtool.models.load import load_model


def w4a8_scheme(group: int, symmetric: bool) -> dict:
    """The shape of compressed-tensors' W4A8 preset at our group size: 4-bit group weights,
    int8 per-token dynamic symmetric activations."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return {"group_0": QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
    )}


def recipes(group: int, smoothing_strength: float) -> dict[str, list]:
    """SmoothQuant and the rotation transforms (QuIP: an online randomized Hadamard on every linear's
    input, its inverse fused into the weight; SpinQuant R1 + R2: the residual stream and each head's
    v -> o space rotated offline, norms fused, as `dgq --rotate hadamard`), each before GPTQ.
    Randomized Hadamard: plain Hadamard needs powers of two; SmolLM2's 576 = 36 x 16 and 1536 = 12 x 128
    are in compressed-tensors' table."""
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    def gptq(symmetric: bool) -> GPTQModifier:
        return GPTQModifier(config_groups=w4a8_scheme(group, symmetric), ignore=["lm_head"])

    def smooth() -> SmoothQuantModifier:
        return SmoothQuantModifier(smoothing_strength=smoothing_strength)

    def quip(*targets: str) -> QuIPModifier:
        where = {"targets": [f"re:.*{t}$" for t in targets]} if targets else {}
        return QuIPModifier(rotations=["v"], transform_type="random-hadamard", ignore="lm_head", **where)

    def spinquant(*rotations: str) -> SpinQuantModifier:
        return SpinQuantModifier(rotations=list(rotations), transform_type="random-hadamard")

    table = {}
    for symmetry, symmetric in (("asymmetric", False), ("symmetric", True)):  # asymmetric first: the stronger peers
        table |= {
            f"llm-compressor GPTQ, {symmetry}": [gptq(symmetric)],
            f"llm-compressor SmoothQuant + GPTQ, {symmetry}": [smooth(), gptq(symmetric)],
            f"llm-compressor QuIP (online input Hadamard) + GPTQ, {symmetry}": [quip(), gptq(symmetric)],
            f"llm-compressor SpinQuant R1 R2 (offline) + GPTQ, {symmetry}": [spinquant("R1", "R2"), gptq(symmetric)],
        }
    # R4: an online Hadamard on down_proj's input, the rotation dgq measured but does not build
    table["llm-compressor SpinQuant R1 R2 R4 + GPTQ, asymmetric"] = [spinquant("R1", "R2", "R4"), gptq(False)]
    # the rotations of dgq's --online-rotation down-o: the residual offline, o_proj's and down_proj's inputs online
    table["llm-compressor SpinQuant R1 + QuIP on o_proj and down_proj + GPTQ, asymmetric"] = [
        spinquant("R1"), quip("o_proj", "down_proj"), gptq(False)]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("results/peers"))
    parser.add_argument("--tasks", nargs="+", default=["wikitext2"])
    parser.add_argument("--recipes", nargs="*", help="subset of recipe names (substring match, any of them)")
    parser.add_argument("--calib-data", default="ptb")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (the GPTQ protocol's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoothing-strength", type=float, default=0.8, help="llm-compressor's default")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--limit", type=int, help="windows / items per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    local = data_dir(args.data_dir)
    args.data_dir = str(local) if local else None

    from datasets import Dataset
    from llmcompressor import oneshot

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    _, tokenizer, _ = load_model(args.model, args.dtype)
    tokens = calibration_tokens(tokenizer, args.calib_data, args.nsamples, args.seqlen, args.seed, args.data_dir)
    calibration = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})

    table: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name, modifiers in recipes(args.group, args.smoothing_strength).items():
        if args.recipes and not any(r in name for r in args.recipes):
            continue
        model, _, _ = load_model(args.model, args.dtype)
        model = model.to(device)
        start = time.time()
        oneshot(model=model, dataset=calibration, recipe=modifiers, max_seq_length=args.seqlen,
                num_calibration_samples=args.nsamples)
        seconds[name] = time.time() - start
        table[name] = score_model(model, tokenizer, args.tasks, seqlen=args.eval_seqlen, limit=args.limit,
                                  batch_size=args.batch_size, data_dir=args.data_dir, device=device)
        print(name, {t: headline(r) for t, r in table[name].items()}, flush=True)
        write_results(args.out, args, table, seconds)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def write_results(out: Path, args, table: dict, seconds: dict) -> None:
    settings = {k: getattr(args, k) for k in ("model", "group", "calib_data", "nsamples", "seqlen", "eval_seqlen",
                                              "seed", "smoothing_strength", "dtype", "limit")}
    (out / "PEERS.json").write_text(json.dumps({"settings": settings, "results": table, "oneshot_seconds": seconds},
                                               indent=2))
    lines = ["| recipe | " + " | ".join(args.tasks) + " | oneshot s |", "|---" * (len(args.tasks) + 2) + "|"]
    for name, scores in table.items():
        cells = " | ".join(f"{headline(scores[t])[1]:.4g}" for t in args.tasks)
        lines.append(f"| {name} | {cells} | {seconds[name]:.0f} |")
    (out / "PEERS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
