#!/usr/bin/env python3
"""Which rotation x smoothing x search x GPTQ x activation recipe quantizes a model best: runs the
stages in-process on the real model, scores WikiText-2 and PTB (GPTQ protocol; all windows, or the
first N) and keeps every linear's searched output error.

    DGQ_DATA_DIR=../shared/assets/data python scripts/measure_rotation.py smollm2-135m \
        --rows paper hadamard-gptq --windows 6 --out docs/results/rotation          # CPU, first 6 windows
    DGQ_KERNELS=0 python scripts/measure_rotation.py smollm2-135m --rows hadamard-gptq paper \
        --config configs/smollm2-g64.yaml --out OUT                                 # GPU, all windows

The stages run on --device (auto: CUDA when there is one) with that device's recipe defaults (GPU:
128 x 2048 calibration tokens, 20 x 80 grid, fp16); rows sharing a rotation share a work directory,
so a calibrate (or smooth) stage with the same options runs once for all of them. Zero-shot tasks
(--tasks piqa ...) go through lm-eval as in `dgq eval`.

Rows (ROWS below) name a rotation of the residual stream (models/rotation.py) and recipe options,
`online_rotation` among them (down_proj's input rotated at run time, as `--online-rotation down`).
Appends one JSON object per row to OUT/rows.jsonl as soon as the row is scored, and rewrites
OUT/RESULTS.md (this run's rows, with the `dgq quantize` flags that reproduce each) after each row.

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
from dgqtool.eval.runner import headline, score_model
from dgqtool.eval.windows import PPL_TASKS
from dgqtool.models.adapters import Adapter, adapter_for_model
from dgqtool.models.load import load_model
from dgqtool.models.rotation import rotate_model, rotate_online
from dgqtool.progress import Silent
from dgqtool.quant.quantizer import fake_quantize_activations
from dgqtool.quant.search import accumulate_moments, quantize_weight
from dgqtool.recipe import Recipe, flag, load_config
from dgqtool.stages import calibrate as calibrate_stage
from dgqtool.stages import smooth as smooth_stage
from dgqtool.stages.graph import Context, pick_device
from dgqtool.stages.pack import quantized_model
from dgqtool.stages.search import search


@dataclasses.dataclass(frozen=True)
class Row:
    rotate: str = "none"
    value_heads: bool = True
    quantized: bool = True
    recipe: tuple[tuple[str, object], ...] = ()  # Recipe overrides


def row(rotate="none", value_heads=True, **recipe) -> Row:
    return Row(rotate, value_heads, True, tuple(sorted(recipe.items())))


ROWS: dict[str, Row] = {
    "fp": Row(quantized=False),
    "fp-hadamard": Row("hadamard", quantized=False),  # the fold is exact: the same ppl as fp
    "paper": row(),
    "paper-32": row(nsamples=32),
    "paper-static": row(act="static"),
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
    "hadamard-online-gptq": row("hadamard", online_rotation="down", gptq=True),
    "hadamard-online-nosmooth-gptq": row("hadamard", online_rotation="down", smooth="none", gptq=True),
    "hadamard-online-capped-gptq": row("hadamard", online_rotation="down", max_column_growth=1.0, gptq=True),
    "hadamard-online-static-gptq": row("hadamard", online_rotation="down", act="static", gptq=True),
}


def prepare(model: nn.Module, adapter: Adapter, spec_row: Row, seed: int, device: str) -> None:
    """The row's rotation of the float model (the stages add its online rotation themselves)."""
    rotate_model(model, adapter, spec_row.rotate, seed, value_heads=spec_row.value_heads, device=device)


def online_of(spec_row: Row) -> str:
    return dict(spec_row.recipe).get("online_rotation", "none")


def dgq_flags(spec_row: Row) -> str:
    """The `dgq quantize` flags (on top of --config) that reproduce a row, or why none do."""
    if not spec_row.quantized:
        return "float model" + (f", rotated ({spec_row.rotate})" if spec_row.rotate != "none" else "")
    if spec_row.rotate == "random" or not spec_row.value_heads:
        return "this script only"
    parts = ["--rotate hadamard"] if spec_row.rotate == "hadamard" else []
    parts += [flag(k) if v is True else f"{flag(k)} {v:g}" if isinstance(v, float) else f"{flag(k)} {v}"
              for k, v in spec_row.recipe]
    return " ".join(parts) or "no flags"


def quantize_row(spec: str, base: Recipe, spec_row: Row, work: Path, seed: int, force: bool, device: str):
    """The row's stages in process; returns (model with packed modules, tokenizer, searched errors, stage seconds)."""
    recipe, _ = base.with_overrides(**dict(spec_row.recipe)).resolved(device)
    ctx = Context(work, recipe, device, Silent(), force=force)
    # the stages rotate right after loading (--rotate); the row's rotation takes that place
    rotate = lambda model, adapter, kind, seed_, device: prepare(model, adapter, spec_row, seed_, device)
    with contextlib.ExitStack() as patches:
        for stage in (calibrate_stage, smooth_stage):
            patches.enter_context(mock.patch.object(stage, "rotate_model", rotate))
        seconds = {}

        def timed(stage, run):
            start = time.time()
            result = run()
            seconds[stage] = round(time.time() - start, 1)  # ~0 where the stage was current (shared work dir)
            return result

        timed("calibrate", lambda: calibrate_stage.calibrate(ctx, spec))
        timed("smooth", lambda: smooth_stage.smooth(ctx))
        errors = timed("search", lambda: search(ctx))["errors"]
        model, tokenizer, *_ = timed("pack", lambda: quantized_model(ctx))
    return model, tokenizer, errors, seconds


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


def probe_row(spec: str, base: Recipe, spec_row: Row, layers: set[int], seed: int, device: str) -> list[dict]:
    recipe, _ = base.with_overrides(**dict(spec_row.recipe)).resolved(device)
    model, tokenizer, _ = load_model(spec, recipe.dtype)
    adapter = adapter_for_model(model)
    prepare(model, adapter, spec_row, seed, device)
    rotate_online(model, adapter, recipe.online_rotation, seed)
    tokens = calibration_tokens(tokenizer, recipe.calib_data, recipe.nsamples, recipe.seqlen, recipe.seed, recipe.data_dir)
    visitor = _Probe(adapter, layers, recipe)
    run_layers(model, adapter, tokens, visitor, device, recipe.batch_size)
    return visitor.errors


def by_projection(errors: list[dict]) -> dict[str, dict[str, float]]:
    buckets: dict[str, list[dict]] = defaultdict(list)
    for e in errors:
        buckets[e["linear"].split(".")[-1]].append(e)
    return {name: {"searched_mean": sum(e["searched"] for e in rows) / len(rows),
                   "searched_max": max(e["searched"] for e in rows),
                   "worst_layer": max(rows, key=lambda e: e["searched"])["layer"]}
            for name, rows in buckets.items()}


def zero_shot_mean(scores: dict) -> tuple[float, float]:
    """Mean headline accuracy over the zero-shot tasks and its standard error (tasks independent)."""
    tasks = [s for s in scores.values() if "ppl" not in s]
    heads = [headline(s) for s in tasks]
    se = sum(s[f"{m}_stderr"] ** 2 for s, (m, _) in zip(tasks, heads)) ** 0.5 / len(tasks)
    return sum(v for _, v in heads) / len(tasks), se


def write_table(out: Path, tasks: list[str], results: list[dict]) -> None:
    """OUT/RESULTS.md: this run's rows so far (perplexity, or acc_norm / acc for zero-shot tasks,
    with their mean +- its standard error)."""
    mean = [] if all(t in PPL_TASKS for t in tasks) else ["zero-shot mean"]
    lines = ["| row | `dgq quantize` flags | " + " | ".join(tasks + mean) + " | quantize s | stage s (calibrate / smooth / search / pack) |",
             "|---" * (len(tasks) + len(mean) + 4) + "|"]
    for r in results:
        cells = [f"{v:.2f}" if m == "ppl" else f"{v:.3f}" for m, v in (headline(r["scores"][t]) for t in tasks)]
        if mean:
            cells.append("{:.4f} ± {:.4f}".format(*zero_shot_mean(r["scores"])))
        stages = " / ".join(f"{v:.0f}" for v in r["stage_s"].values()) or "–"
        lines.append(f"| {r['row']} | {r['flags']} | {' | '.join(cells)} | {r['quantize_s']:.0f} | {stages} |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), required=True, help="run in this order")
    parser.add_argument("--windows", type=int, help="first N windows (items) of each task (default: all)")
    parser.add_argument("--config", default="configs/smollm2-g64.yaml", help="the recipe every row starts from")
    parser.add_argument("--tasks", nargs="+", default=["wikitext2", "ptb"], help="perplexity and zero-shot tasks, as `dgq eval`")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation windows (lm-eval requests) per forward")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]: where the stages and the evaluation run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("out/rotation-work"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/rotation"))
    parser.add_argument("--force", action="store_true", help="redo stages even when their artifacts are current")
    parser.add_argument("--probe-layers", type=int, nargs="+", help="only search these layers (see above)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    device = pick_device(args.device)
    base = load_config(args.config)
    for name in args.rows if args.probe_layers else ():
        errors = probe_row(args.model, base, ROWS[name], set(args.probe_layers), args.seed, device)
        with (args.out / "probe.jsonl").open("a") as f:
            f.write(json.dumps({"row": name, "spec": dataclasses.asdict(ROWS[name]), "errors": errors}) + "\n")
        print(f"| {name} | " + " | ".join(f"{e['layer']}.{e['linear'].split('.')[1]} {e['searched']:.2e}" for e in errors), flush=True)
    results = []
    for name in args.rows if not args.probe_layers else ():
        spec_row, start, errors, stage_s = ROWS[name], time.time(), [], {}
        if not spec_row.quantized:
            model, tokenizer, _ = load_model(args.model, base.resolved(device)[0].dtype)
            prepare(model, adapter_for_model(model), spec_row, args.seed, device)
        else:
            key = f"{spec_row.rotate}-vo{int(spec_row.value_heads)}-online-{online_of(spec_row)}-seed{args.seed}"
            model, tokenizer, errors, stage_s = quantize_row(args.model, base, spec_row, args.work / key, args.seed, args.force, device)
        quantized_s = time.time() - start
        scores = score_model(model.to(device), tokenizer, args.tasks, seqlen=args.seqlen, limit=args.windows,
                             batch_size=args.batch_size, data_dir=None, device=device)
        result = {"row": name, "spec": dataclasses.asdict(spec_row), "flags": dgq_flags(spec_row), "config": args.config,
                  "device": device, "windows": args.windows, "scores": scores,
                  "ppl": {t: s["ppl"] for t, s in scores.items() if "ppl" in s},
                  "quantize_s": round(quantized_s, 1), "stage_s": stage_s, "eval_s": round(time.time() - start - quantized_s, 1),
                  "by_projection": by_projection(errors) if errors else {}, "errors": errors}
        with (args.out / "rows.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        results.append(result)
        write_table(args.out, args.tasks, results)
        print(f"| {name} | " + " | ".join(f"{headline(s)[1]:.3f}" for s in scores.values())
              + f" | {quantized_s:.0f} s | eval {result['eval_s']:.0f} s |", flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
