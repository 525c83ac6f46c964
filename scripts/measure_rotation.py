#!/usr/bin/env python3
"""Which rotation x smoothing x search x GPTQ x activation recipe quantizes a model best: runs the
stages in-process on the real model, scores the first N windows of WikiText-2 and PTB (GPTQ
protocol) and keeps every linear's searched output error.

    DGQ_DATA_DIR=../shared/assets/data python scripts/measure_rotation.py smollm2-135m \
        --rows paper hadamard-gptq --windows 6 --out docs/results/rotation

Rows (ROWS below) name a rotation of the residual stream (models/rotation.py) and recipe options;
`online_down` also rotates down_proj's input with a Hadamard matrix at run time (an extra module
here, not in the kernels or the checkpoint format) to measure what such a kernel would buy.
Appends one JSON object per row to OUT/rows.jsonl and prints a markdown line per row.

`--probe-layers 11 20` instead searches only those layers' linears, on inputs captured from the
float (rotated) model without smoothing or quantized propagation, and appends per-linear output
errors to OUT/probe.jsonl: minutes instead of an hour a row on a small CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from dgqtool.calib.capture import run_layers
from dgqtool.calib.windows import calibration_tokens
from dgqtool.eval.windows import ppl_windows
from dgqtool.eval.ppl import perplexity
from dgqtool.models.adapters import Adapter, InputGroup, adapter_for_model, decoder_layers
from dgqtool.models.load import load_model
from dgqtool.models.rotation import rotate_model
from dgqtool.progress import Silent
from dgqtool.quant.quantizer import fake_quantize_activations
from dgqtool.quant.rotate import rotation_matrix
from dgqtool.quant.search import accumulate_moments, quantize_weight
from dgqtool.recipe import Recipe, load_config
from dgqtool.stages import calibrate as calibrate_stage
from dgqtool.stages import smooth as smooth_stage
from dgqtool.stages.graph import Context
from dgqtool.stages.pack import quantized_model
from dgqtool.stages.search import search


@dataclasses.dataclass(frozen=True)
class Row:
    rotate: str = "none"
    value_heads: bool = True
    online_down: bool = False
    quantized: bool = True
    recipe: tuple[tuple[str, object], ...] = ()  # Recipe overrides


def row(rotate="none", value_heads=True, online_down=False, **recipe) -> Row:
    return Row(rotate, value_heads, online_down, True, tuple(sorted(recipe.items())))


ROWS: dict[str, Row] = {
    "fp": Row(quantized=False),
    "fp-hadamard": Row("hadamard", quantized=False),  # the fold is exact: the same ppl as fp
    "paper": row(),
    "paper-32": row(nsamples=32),
    "gptq": row(gptq=True),
    "capped": row(max_column_growth=1.0),
    "hadamard": row("hadamard"),
    "hadamard-nosmooth": row("hadamard", smooth="none"),
    "hadamard-gptq": row("hadamard", gptq=True),
    "hadamard-gptq-32": row("hadamard", gptq=True, nsamples=32),  # 4x the CPU calibration tokens
    "hadamard-nosmooth-gptq": row("hadamard", smooth="none", gptq=True),
    "hadamard-capped-gptq": row("hadamard", max_column_growth=1.0, gptq=True),
    "hadamard-novo-gptq": row("hadamard", value_heads=False, gptq=True),
    "random-gptq": row("random", gptq=True),
    "random-nosmooth-gptq": row("random", smooth="none", gptq=True),
    "hadamard-groupwise-gptq": row("hadamard", method="groupwise", gptq=True),
    "hadamard-static-gptq": row("hadamard", act="static", gptq=True),
    "static-gptq": row(act="static", gptq=True),
    "hadamard-online-gptq": row("hadamard", online_down=True, gptq=True),
    "hadamard-online-nosmooth-gptq": row("hadamard", online_down=True, smooth="none", gptq=True),
}


class OnlineRotation(nn.Module):
    """x -> x Q in float before the next module: what a fused Hadamard + quantize kernel would do."""

    def __init__(self, q: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q.to(x.dtype)


def _online_adapter(adapter: Adapter) -> Adapter:
    """down_proj becomes down_proj.1 behind the rotation; up_proj can no longer absorb smoothing."""
    inputs = tuple(InputGroup(("mlp.down_proj.1",), None) if g.linears == ("mlp.down_proj",) else g for g in adapter.inputs)
    return dataclasses.replace(adapter, inputs=inputs)


def prepare(model: nn.Module, adapter: Adapter, spec_row: Row, seed: int) -> None:
    """The float model as the row's stages see it: rotated, optionally with online down rotation."""
    rotate_model(model, adapter, spec_row.rotate, seed, value_heads=spec_row.value_heads)
    if spec_row.online_down:
        q = rotation_matrix("hadamard", model.config.intermediate_size, seed + 2)
        for layer in decoder_layers(model, adapter):
            down = layer.mlp.down_proj
            with torch.no_grad():
                down.weight.copy_((down.weight.double() @ q).to(down.weight.dtype))
            layer.mlp.down_proj = nn.Sequential(OnlineRotation(q.to(down.weight.dtype)), down)


def quantize_row(spec: str, base: Recipe, spec_row: Row, work: Path, seed: int, force: bool):
    recipe, _ = base.with_overrides(**dict(spec_row.recipe)).resolved("cpu")
    ctx = Context(work, recipe, "cpu", Silent(), force=force)
    # the stages rotate right after loading (--rotate); the row's rotation takes that place
    rotate = lambda model, adapter, kind, seed_: prepare(model, adapter, spec_row, seed_)
    wrap = _online_adapter if spec_row.online_down else (lambda a: a)
    with contextlib.ExitStack() as patches:
        for stage in (calibrate_stage, smooth_stage):
            patches.enter_context(mock.patch.object(stage, "rotate_model", rotate))
            patches.enter_context(mock.patch.object(stage, "adapter_for_model", lambda m: wrap(adapter_for_model(m))))
        calibrate_stage.calibrate(ctx, spec)
        smooth_stage.smooth(ctx)
        manifest = search(ctx)
        model, tokenizer, *_ = quantized_model(ctx)
    return model, tokenizer, manifest["errors"]


class _Probe:
    """Moments of each input group at the chosen layers; every linear searched there, float model left as is."""

    def __init__(self, adapter: Adapter, layers: set[int], recipe: Recipe):
        self.adapter, self.layers, self.recipe, self.errors = adapter, layers, recipe, []

    def attach(self, index: int, layer: nn.Module) -> list:
        self.moments = {}
        if index not in self.layers:
            return []

        def hook(module, args, key):
            self.moments[key] = accumulate_moments(args[0], fake_quantize_activations, self.moments.get(key))

        return [layer.get_submodule(g.linears[0]).register_forward_pre_hook(lambda m, a, k=g.linears[0]: hook(m, a, k))
                for g in self.adapter.inputs]

    def finish(self, index: int, layer: nn.Module) -> bool:
        r = self.recipe
        for group in self.adapter.inputs if index in self.layers else ():
            for name in group.linears:
                result = quantize_weight(layer.get_submodule(name).weight, self.moments[group.linears[0]], method=r.method,
                                         group=r.group, grid1=r.grid1, grid2=r.grid2, objective=r.objective, gptq=r.gptq)
                self.errors.append({"layer": index, "linear": name, "rtn_dg": result.error_rtn, "searched": result.error})
        return False


def probe_row(spec: str, base: Recipe, spec_row: Row, layers: set[int], seed: int) -> list[dict]:
    recipe, _ = base.with_overrides(**dict(spec_row.recipe)).resolved("cpu")
    model, tokenizer, _ = load_model(spec, recipe.dtype)
    adapter = adapter_for_model(model)
    prepare(model, adapter, spec_row, seed)
    adapter = _online_adapter(adapter) if spec_row.online_down else adapter
    tokens = calibration_tokens(tokenizer, recipe.calib_data, recipe.nsamples, recipe.seqlen, recipe.seed, recipe.data_dir)
    visitor = _Probe(adapter, layers, recipe)
    run_layers(model, adapter, tokens, visitor, "cpu", recipe.batch_size)
    return visitor.errors


def by_projection(errors: list[dict]) -> dict[str, dict[str, float]]:
    buckets: dict[str, list[dict]] = defaultdict(list)
    for e in errors:
        buckets[e["linear"].split(".")[-1] if not e["linear"].endswith(".1") else "down_proj"].append(e)
    return {name: {"searched_mean": sum(e["searched"] for e in rows) / len(rows),
                   "searched_max": max(e["searched"] for e in rows),
                   "worst_layer": max(rows, key=lambda e: e["searched"])["layer"]}
            for name, rows in buckets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), required=True)
    parser.add_argument("--windows", type=int, default=8, help="first N 2048-token windows of each task")
    parser.add_argument("--config", default="configs/smollm2-g64.yaml", help="the recipe every row starts from")
    parser.add_argument("--tasks", nargs="+", default=["wikitext2", "ptb"])
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("out/rotation-work"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/rotation"))
    parser.add_argument("--force", action="store_true", help="redo stages even when their artifacts are current")
    parser.add_argument("--probe-layers", type=int, nargs="+", help="only search these layers (see above)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    for name in args.rows if args.probe_layers else ():
        errors = probe_row(args.model, load_config(args.config), ROWS[name], set(args.probe_layers), args.seed)
        with (args.out / "probe.jsonl").open("a") as f:
            f.write(json.dumps({"row": name, "spec": dataclasses.asdict(ROWS[name]), "errors": errors}) + "\n")
        print(f"| {name} | " + " | ".join(f"{e['layer']}.{e['linear'].split('.')[1]} {e['searched']:.2e}" for e in errors), flush=True)
    for name in args.rows if not args.probe_layers else ():
        spec_row, start, errors = ROWS[name], time.time(), []
        if not spec_row.quantized:
            model, tokenizer, _ = load_model(args.model, "float32")
            prepare(model, adapter_for_model(model), spec_row, args.seed)
        else:
            key = f"{spec_row.rotate}-vo{int(spec_row.value_heads)}-online{int(spec_row.online_down)}-seed{args.seed}"
            model, tokenizer, errors = quantize_row(args.model, load_config(args.config), spec_row, args.work / key, args.seed, args.force)
        quantized_s = time.time() - start
        ppl = {task: perplexity(model, ppl_windows(task, tokenizer, args.seqlen, None, args.windows)).ppl for task in args.tasks}
        result = {"row": name, "spec": dataclasses.asdict(spec_row), "windows": args.windows,
                  "ppl": ppl, "quantize_s": round(quantized_s, 1), "eval_s": round(time.time() - start - quantized_s, 1),
                  "by_projection": by_projection(errors) if errors else {}, "errors": errors}
        with (args.out / "rows.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in ppl.values()) + f" | {quantized_s:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
