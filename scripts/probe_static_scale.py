"""Where a static per-tensor activation scale loses to per-token scales, per linear input (CPU probe).

The model as `--recipe rotate-gptq --online-rotation down-o --act static` calibrates it (residual
rotation, online down_proj and o_proj rotations; fp32, no quantized weights), PTB-validation
segments: the first half sets each input's static scale (the calibration maximum / 127, what
dgq's search stores, and the MSE-best clip of it on those tokens), the second half is scored. Per
probed layer and input: the relative int8 round-trip error ||X - Q(X)||^2 / ||X||^2 with the
maximum's scale, the clipped scale and per-token (dynamic) scales, and how far the largest token
stands out (its abs-max over the median token's).

    python scripts/probe_static_scale.py [--model smollm2-135m] [--layers 2 11 20 28] [--segments 16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dgqtool.models.adapters import adapter_for_model, decoder_layers
from dgqtool.models.load import load_model
from dgqtool.models.rotation import rotate_model, rotate_online
from dgqtool.quant.quantizer import fake_quantize_activations

CLIPS = torch.linspace(0.05, 1.0, 39).tolist() + [1.0]


def relative_error(x: torch.Tensor, scale: torch.Tensor | None) -> float:
    return ((x - fake_quantize_activations(x, scale)).pow(2).sum() / x.pow(2).sum()).item()


@torch.no_grad()
def probe(model_spec: str, layers: list[int], segments: int, seqlen: int = 512) -> list[dict]:
    model, tokenizer, _ = load_model(model_spec)
    adapter = adapter_for_model(model)
    rotate_model(model, adapter, "hadamard", 0)
    rotate_online(model, adapter, "down-o", 0)  # prepended pre-hooks: the captures below see x Q
    text = (Path(os.environ.get("DGQ_DATA_DIR", "../shared/assets/data")) / "ptb" / "ptb.valid.txt").read_text()
    ids = tokenizer(text[: 60 * seqlen * segments], return_tensors="pt").input_ids[0]
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    for index in layers:
        layer = decoder_layers(model, adapter)[index]
        for group in adapter.inputs:
            def hook(module, args, key=(index, group.linears[0])):
                captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
            layer.get_submodule(group.linears[0]).register_forward_pre_hook(hook)
    for i in range(segments):
        model(ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0))
    rows = []
    for (index, name), xs in sorted(captured.items()):
        calib, test = torch.cat(xs[: segments // 2]), torch.cat(xs[segments // 2:])
        top = calib.abs().max() / 127
        clip = min(CLIPS, key=lambda r: relative_error(calib, (r * top).reshape(1)))
        token_max = test.abs().amax(-1)
        rows.append({"layer": index, "input": name, "static_max": relative_error(test, top.reshape(1)),
                     "static_clipped": relative_error(test, (clip * top).reshape(1)), "clip": clip,
                     "dynamic": relative_error(test, None),
                     "largest_token_over_median": (token_max.max() / token_max.median()).item()})
        r = rows[-1]
        print(f"layer {index:2d} {name:22s} static max {r['static_max']:.2e}  clipped ({clip:.2f}) "
              f"{r['static_clipped']:.2e}  dynamic {r['dynamic']:.2e}  largest token / median {r['largest_token_over_median']:.1f}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="*", default=[2, 11, 20, 28])
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = probe(args.model, args.layers, args.segments)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "segments": args.segments, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
