"""The stage graph: calibrate -> smooth -> search -> pack (-> verify), each reading the previous
stage's artifacts from a work directory and writing its own with a manifest.

    WORK/calibrate/  tokens + per-input channel maxima (stats.safetensors), manifest.json
    WORK/smooth/     smoothing vectors and smoothed channel maxima (scales.safetensors)
    WORK/search/     one layer_NNN.safetensors per decoder layer (resumable per layer)
    OUT/             the packed checkpoint (pack.py)

A stage whose manifest fingerprint (its options + its inputs' hashes) matches is skipped on rerun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from .artifacts import fingerprint, is_finished, read_manifest, read_tensors, sha256_file, write_manifest, write_tensors
from .calib.capture import run_layers
from .calib.data import calibration_tokens
from .errors import DGQError
from .models.adapters import (
    Adapter,
    InputGroup,
    adapter_for,
    can_fold,
    check_group_size,
    decoder_layers,
    layer_linears,
)
from .models.load import load_model
from .nn.dgq_linear import FORMATS, format_of
from .progress import Reporter
from .quant.dual_grained import DualGrainedWeight, GroupWeight, QuantizedWeight, pack_nibbles, unpack_nibbles
from .quant.quantizer import INT8_MAX, fake_quantize_activations
from .quant.search import SecondMoments, SearchResult, accumulate_moments, quantize_weight
from .quant.smooth import cap_column_growth, fold_into_consumer, fold_into_producer, percentile_scales, smoothquant_scales
from .resources import Usage
from .recipe import CALIBRATE_OPTIONS, SEARCH_OPTIONS, SMOOTH_OPTIONS, Recipe

STAGES = ("calibrate", "smooth", "search", "pack")


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DGQError(f"--device {requested} requested but no CUDA GPU is available")
    if not (requested == "cpu" or requested.startswith("cuda")):
        raise DGQError(f"--device must be auto, cpu or cuda[:N]; got '{requested}'")
    return requested


def input_key(layer_index: int, group: InputGroup) -> str:
    """Statistics of one activation are stored under the first linear that reads it."""
    return f"{layer_index}.{group.linears[0]}"


@dataclass
class Context:
    """What every stage needs: the work directory, the resolved recipe, where output goes."""

    work: Path
    recipe: Recipe
    device: str
    reporter: Reporter
    force: bool = False

    def stage_dir(self, stage: str) -> Path:
        return self.work / stage

    def finished(self, stage: str, options: dict, inputs: dict[str, str]) -> dict | None:
        """The stage's manifest when a previous run already produced it from these options and
        inputs (and --force is off), else None."""
        if self.force or not is_finished(self.stage_dir(stage), stage, options, inputs):
            return None
        self.reporter.info(f"{stage}: up to date, skipped")
        return read_manifest(self.stage_dir(stage), stage)


# ----------------------------------------------------------------------------------- calibrate


class _ChannelMaxima:
    """Hooks recording max |x| per input channel of every input group, rejecting NaN/inf."""

    def __init__(self, adapter: Adapter, stats: dict[str, torch.Tensor]):
        self.adapter, self.stats = adapter, stats

    def attach(self, index: int, layer: nn.Module) -> list:
        handles = []
        for group in self.adapter.inputs:
            key = input_key(index, group)

            def hook(module, args, key=key):
                x = args[0].detach()
                if not torch.isfinite(x).all():
                    raise DGQError(f"non-finite calibration activations at the input of layer {key}")
                m = x.reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()
                self.stats[key] = m if key not in self.stats else torch.maximum(self.stats[key], m)

            handles.append(layer.get_submodule(group.linears[0]).register_forward_pre_hook(hook))
        return handles

    def finish(self, index: int, layer: nn.Module) -> bool:
        return False


def calibrate(ctx: Context, model_spec: str) -> dict:
    r = ctx.recipe
    options = {"model": model_spec, **r.subset(CALIBRATE_OPTIONS)}
    stage_dir = ctx.stage_dir("calibrate")
    if (done := ctx.finished("calibrate", options, {})) is not None:
        return done
    usage = Usage()
    model, tokenizer, source = load_model(model_spec, r.dtype, r.trust_remote_code)
    adapter = adapter_for(model.config.model_type)
    tokens = calibration_tokens(tokenizer, r.calib_data, r.nsamples, r.seqlen, r.seed, r.data_dir)
    stats: dict[str, torch.Tensor] = {}
    layers = decoder_layers(model, adapter)
    foldable = []
    for index, layer in enumerate(layers):
        for group in adapter.inputs:
            key = input_key(index, group)
            columns = torch.stack([layer.get_submodule(n).weight.detach().abs().amax(0) for n in group.linears])
            stats[f"{key}.weight_absmax"] = columns.amax(0).float()
            if can_fold(layer, group):
                foldable.append(key)
    maxima: dict[str, torch.Tensor] = {}
    with ctx.reporter.task(f"calibrate {len(tokens)}x{tokens.shape[1]} tokens", len(layers)) as step:
        run_layers(model, adapter, tokens, _ChannelMaxima(adapter, maxima), ctx.device, r.batch_size,
                   on_layer=lambda i: step.advance(f"calibrate (layer {i + 1}/{len(layers)})"))
    stats.update({f"{k}.act_absmax": v for k, v in maxima.items()})
    digest = write_tensors(stage_dir / "stats.safetensors", {"tokens": tokens, **stats})
    return write_manifest(
        stage_dir, "calibrate", options, {}, {"stats.safetensors": digest},
        model_type=model.config.model_type, source=source.describe(), foldable=foldable,
        num_layers=len(layers), resources=usage.snapshot(),
    )


# ----------------------------------------------------------------------------------- smooth


def smooth(ctx: Context) -> dict:
    r = ctx.recipe
    calib = read_manifest(ctx.stage_dir("calibrate"), "calibrate")
    inputs = {"calibrate": calib["fingerprint"]}
    options = r.subset(SMOOTH_OPTIONS)
    stage_dir = ctx.stage_dir("smooth")
    if (done := ctx.finished("smooth", options, inputs)) is not None:
        return done
    usage = Usage()
    stats = read_tensors(ctx.stage_dir("calibrate") / "stats.safetensors", calib["outputs"]["stats.safetensors"])
    out: dict[str, torch.Tensor] = {}
    keys = sorted({k.rsplit(".", 1)[0] for k in stats if k.endswith(".act_absmax")})
    for key in keys:
        act = stats[f"{key}.act_absmax"]
        k = torch.ones_like(act)
        if key in calib["foldable"] and r.smooth == "percentile":
            k = percentile_scales(act, r.percentile)
        elif key in calib["foldable"] and r.smooth == "smoothquant":
            k = smoothquant_scales(act, stats[f"{key}.weight_absmax"], r.alpha)
        if key in calib["foldable"] and r.smooth != "none" and r.max_column_growth is not None:
            k = cap_column_growth(k, stats[f"{key}.weight_absmax"], r.max_column_growth)
        if key in calib["foldable"] and r.smooth != "none":
            out[f"{key}.smooth"] = k
        out[f"{key}.act_absmax"] = act / k
    digest = write_tensors(stage_dir / "scales.safetensors", out)
    shrunk = sum(int((v > 1).sum()) for n, v in out.items() if n.endswith(".smooth"))
    ctx.reporter.info(f"smooth: {r.smooth}, {shrunk} outlier channels rescaled")
    return write_manifest(stage_dir, "smooth", options, inputs, {"scales.safetensors": digest},
                          resources=usage.snapshot())


def apply_smoothing(model: nn.Module, adapter: Adapter, scales: dict[str, torch.Tensor]) -> None:
    """Fold each smoothing vector: producer rows / k, consumer columns * k (float output unchanged)."""
    for index, layer in enumerate(decoder_layers(model, adapter)):
        for group in adapter.inputs:
            k = scales.get(f"{input_key(index, group)}.smooth")
            if k is None:
                continue
            producer = layer.get_submodule(group.producer)
            fold_into_producer(producer.weight.data, getattr(producer, "bias", None), k)
            for name in group.linears:
                fold_into_consumer(layer.get_submodule(name).weight.data, k)


def _smoothed_model(ctx: Context):
    """The float model of the calibrate stage with the smooth stage's vectors folded in."""
    calib = read_manifest(ctx.stage_dir("calibrate"), "calibrate")
    smooth_manifest = read_manifest(ctx.stage_dir("smooth"), "smooth")
    model, tokenizer, _ = load_model(calib["options"]["model"], calib["options"]["dtype"], ctx.recipe.trust_remote_code)
    adapter = adapter_for(model.config.model_type)
    scales = read_tensors(ctx.stage_dir("smooth") / "scales.safetensors", smooth_manifest["outputs"]["scales.safetensors"])
    apply_smoothing(model, adapter, scales)
    return model, tokenizer, adapter, scales, calib, smooth_manifest


# ----------------------------------------------------------------------------------- search


def static_input_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """Per-tensor static scale from the calibration maximum of the smoothed activation."""
    return (act_absmax.max() / INT8_MAX).clamp(min=1e-8).reshape(1)


def weight_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    tensors = {f"{name}.codes": pack_nibbles(weight.codes), f"{name}.zero": weight.zero}
    if isinstance(weight, DualGrainedWeight):
        tensors.update({f"{name}.s2": weight.s2, f"{name}.s1": weight.s1})
    else:
        tensors[f"{name}.scale"] = weight.scale
    return tensors


def weight_from_tensors(name: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    try:
        codes, zero = unpack_nibbles(tensors[f"{name}.codes"]), tensors[f"{name}.zero"]
        if f"{name}.s2" in tensors:
            return DualGrainedWeight(codes, zero, tensors[f"{name}.s2"], tensors[f"{name}.s1"])
        return GroupWeight(codes, zero, tensors[f"{name}.scale"])
    except KeyError as exc:
        raise DGQError(f"search artifact lacks tensor {exc.args[0]}") from None


class _LayerSearch:
    """Per layer: accumulate second moments of each (smoothed) linear input, search every linear,
    save the layer's parameters, and leave fake-quantized weights in the layer for propagation."""

    def __init__(self, ctx: Context, adapter: Adapter, scales: dict[str, torch.Tensor], layer_fp: str, step):
        self.ctx, self.adapter, self.scales, self.layer_fp, self.step = ctx, adapter, scales, layer_fp, step
        self.moments: dict[str, SecondMoments] = {}
        self.results: list[dict[str, Any]] = []
        self.done: dict[int, dict[str, torch.Tensor]] = {}

    def path(self, index: int) -> Path:
        return self.ctx.stage_dir("search") / f"layer_{index:03d}.safetensors"

    def static_scale(self, index: int, group: InputGroup) -> torch.Tensor | None:
        if self.ctx.recipe.act != "static":
            return None
        return static_input_scale(self.scales[f"{input_key(index, group)}.act_absmax"]).to(self.ctx.device)

    def _finished_layer(self, index: int) -> dict[str, torch.Tensor] | None:
        path = self.path(index)
        if self.ctx.force or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") != self.layer_fp:
                    return None
                self.results.extend(json.loads(f.metadata()["errors"]))
        except Exception:
            return None  # unreadable: search the layer again
        return read_tensors(path)

    def attach(self, index: int, layer: nn.Module) -> list:
        self.moments = {}
        previous = self._finished_layer(index)
        if previous is not None:
            self.done[index] = previous
            return []
        handles = []
        for group in self.adapter.inputs:
            key, scale = input_key(index, group), self.static_scale(index, group)

            def hook(module, args, key=key, scale=scale):
                quantize = lambda x: fake_quantize_activations(x, scale)
                self.moments[key] = accumulate_moments(args[0].detach(), quantize, self.moments.get(key))

            handles.append(layer.get_submodule(group.linears[0]).register_forward_pre_hook(hook))
        return handles

    def finish(self, index: int, layer: nn.Module) -> bool:
        r = self.ctx.recipe
        tensors = self.done.pop(index, None)
        if tensors is None:
            tensors, errors = {}, []
            for group in self.adapter.inputs:
                key = input_key(index, group)
                moments = self.moments[key]
                if not all(torch.isfinite(m).all() for m in (moments.xx, moments.xq, moments.qq)):
                    raise DGQError(f"non-finite calibration activations at the input of layer {key}")
                scale = self.static_scale(index, group)
                for name in group.linears:
                    linear = layer.get_submodule(name)
                    result: SearchResult = quantize_weight(
                        linear.weight.detach(), moments, method=r.method, group=r.group,
                        grid1=r.grid1, grid2=r.grid2, objective=r.objective, refine=r.refine, gptq=r.gptq,
                    )
                    tensors.update(weight_tensors(name, result.weight))
                    if scale is not None:
                        tensors[f"{name}.input_scale"] = scale.clone()  # safetensors stores no aliases
                    errors.append({"layer": index, "linear": name, "rtn_dg": result.error_rtn, "searched": result.error})
            self.results.extend(errors)
            metadata = {"fingerprint": self.layer_fp, "errors": json.dumps(errors)}
            write_tensors(self.path(index), tensors, metadata)
        for name, linear in layer_linears(layer, self.adapter).items():
            deq = weight_from_tensors(name, tensors).dequantize()
            linear.weight.data = deq.to(linear.weight.device, linear.weight.dtype)
        self.step.advance(f"search (layer {index + 1})")
        return True


def search(ctx: Context) -> dict:
    r = ctx.recipe
    smooth_manifest = read_manifest(ctx.stage_dir("smooth"), "smooth")
    calib = read_manifest(ctx.stage_dir("calibrate"), "calibrate")
    inputs = {"calibrate": calib["fingerprint"], "smooth": smooth_manifest["fingerprint"]}
    options = r.subset(SEARCH_OPTIONS)
    stage_dir = ctx.stage_dir("search")
    if (done := ctx.finished("search", options, inputs)) is not None:
        return done
    usage = Usage()
    model, _, adapter, scales, calib, _ = _smoothed_model(ctx)
    check_group_size(model, adapter, r.group)
    stats = read_tensors(ctx.stage_dir("calibrate") / "stats.safetensors", calib["outputs"]["stats.safetensors"])
    layers = decoder_layers(model, adapter)
    layer_fp = fingerprint({"options": options, "inputs": inputs})
    with ctx.reporter.task(f"search ({r.method}, g{r.group}, {r.act}, grid {r.grid1}x{r.grid2})", len(layers)) as step:
        visitor = _LayerSearch(ctx, adapter, scales, layer_fp, step)
        run_layers(model, adapter, stats["tokens"], visitor, ctx.device, r.batch_size)
    outputs = {f"layer_{i:03d}.safetensors": sha256_file(visitor.path(i)) for i in range(len(layers))}
    ctx.reporter.table(error_table(visitor.results))
    return write_manifest(stage_dir, "search", options, inputs, outputs, errors=visitor.results,
                          resources=usage.snapshot())


def error_table(rows: list[dict[str, Any]]) -> Table:
    """Per layer: mean relative output error of RTN dual-grained vs the searched parameters."""
    table = Table(title="relative output error per layer (||XW - X^Q||^2 / ||XW||^2)")
    for column in ("layer", "linears", "rtn-dg", "searched", "ratio"):
        table.add_column(column, justify="right")
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row)
    for layer, items in sorted(by_layer.items()):
        before = sum(i["rtn_dg"] for i in items) / len(items)
        after = sum(i["searched"] for i in items) / len(items)
        table.add_row(str(layer), str(len(items)), f"{before:.3e}", f"{after:.3e}", f"{after / max(before, 1e-30):.3f}")
    return table


# ----------------------------------------------------------------------------------- pack


def quantized_model(ctx: Context):
    """The smoothed model with every adapter linear replaced by its packed module (search results)."""
    search_manifest = read_manifest(ctx.stage_dir("search"), "search")
    model, tokenizer, adapter, _, calib, _ = _smoothed_model(ctx)
    dtype = next(model.parameters()).dtype
    formats = set()
    for index, layer in enumerate(decoder_layers(model, adapter)):
        name = f"layer_{index:03d}.safetensors"
        if name not in search_manifest["outputs"]:
            raise DGQError(f"search results do not cover layer {index}; rerun `dgq search`")
        tensors = read_tensors(ctx.stage_dir("search") / name, search_manifest["outputs"][name])
        for linear_name, linear in layer_linears(layer, adapter).items():
            weight = weight_from_tensors(linear_name, tensors)
            if weight.codes.shape != linear.weight.shape:
                raise DGQError(f"search results for layer {index} {linear_name} do not match the model's shape")
            fmt = format_of(weight)
            formats.add(fmt)
            module = FORMATS[fmt].from_weight(weight, linear.bias, tensors.get(f"{linear_name}.input_scale"), dtype)
            layer.set_submodule(linear_name, module)
    return model, tokenizer, adapter, formats.pop(), search_manifest, calib


def pack(ctx: Context, output: Path) -> dict:
    from .pack import quantization_config, write_checkpoint

    usage = Usage()
    model, tokenizer, adapter, fmt, search_manifest, _ = quantized_model(ctx)
    opts = search_manifest["options"]
    dtype = next(model.parameters()).dtype
    qconfig = quantization_config(adapter, fmt, opts["method"], opts["group"], opts["act"], dtype)
    manifest = write_checkpoint(model, tokenizer, qconfig, output, force=True)
    write_manifest(ctx.stage_dir("pack"), "pack", {"output": str(output.resolve())},
                   {"search": search_manifest["fingerprint"]}, {}, checkpoint=manifest["files"],
                   resources=usage.snapshot())
    ctx.reporter.info(f"pack: wrote {output} ({fmt} format, {opts['method']}, g{opts['group']}, {opts['act']})")
    return manifest


def _pack_is_current(ctx: Context, output: Path) -> bool:
    """The checkpoint in `output` was packed from the current search results and is intact."""
    from .pack import CHECKPOINT_MANIFEST

    search_manifest = read_manifest(ctx.stage_dir("search"), "search")
    if ctx.force or not is_finished(ctx.stage_dir("pack"), "pack", {"output": str(output.resolve())},
                                    {"search": search_manifest["fingerprint"]}):
        return False
    recorded = read_manifest(ctx.stage_dir("pack"), "pack")["checkpoint"]
    try:
        return all(sha256_file(output / name) == digest for name, digest in recorded.items()) and (output / CHECKPOINT_MANIFEST).is_file()
    except OSError:
        return False


def verify(checkpoint: Path, work: Path | None, model_spec: str | None, reporter: Reporter,
           gate: dict | None = None) -> list:
    """Verify a checkpoint; the reference model and tokens come from --model or the work directory.
    gate: {"task", "limit", "seqlen", "data_dir", "max_increase", "max_ratio"} for a perplexity threshold."""
    from .verify import PplGate, raise_on_failure, verify_checkpoint

    tokens = None
    if work is not None:
        calib = read_manifest(work / "calibrate", "calibrate")
        model_spec = model_spec or calib["options"]["model"]
        stats = read_tensors(work / "calibrate" / "stats.safetensors", calib["outputs"]["stats.safetensors"])
        tokens = stats["tokens"][:2, :256]
    if gate and not model_spec:
        raise DGQError("a perplexity gate needs the original model: pass --model or --work")
    reference, tokenizer = load_model(model_spec, "float32")[:2] if model_spec else (None, None)
    ppl_gate = None
    if gate:
        from .eval.data import ppl_windows

        windows = ppl_windows(gate["task"], tokenizer, gate["seqlen"], gate.get("data_dir"), gate["limit"])
        ppl_gate = PplGate(windows, gate.get("max_increase"), gate.get("max_ratio"), f"{gate['task']} ppl")
    checks, table = verify_checkpoint(checkpoint, reference, tokens, gate=ppl_gate)
    reporter.table(table)
    raise_on_failure(checks)
    return checks


def quantize(ctx: Context, model_spec: str, output: Path, run_verify: bool = True, export: str | None = None) -> dict:
    """All stages in order; each is skipped when its artifacts are current. Returns a run summary."""
    manifests = {"calibrate": calibrate(ctx, model_spec), "smooth": smooth(ctx), "search": search(ctx)}
    if _pack_is_current(ctx, output):
        ctx.reporter.info(f"pack: {output} is up to date, skipped")
        manifests["pack"] = read_manifest(ctx.stage_dir("pack"), "pack")
    else:
        pack(ctx, output)
        manifests["pack"] = read_manifest(ctx.stage_dir("pack"), "pack")
    summary = {
        "model": model_spec, "output": str(output), "work": str(ctx.work),
        "stages": {name: {"outputs": m.get("outputs", {}) | m.get("checkpoint", {}),
                          "seconds": (m.get("resources") or {}).get("seconds")} for name, m in manifests.items()},
        "recipe": manifests["search"].get("options", {}),
    }
    if run_verify:
        checks = verify(output, ctx.work, None, ctx.reporter)
        summary["verify"] = [{"check": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
    if export:
        from .export import export_checkpoint

        target = output.with_name(f"{output.name}-{export}")
        summary["export"] = export_checkpoint(output, target, export, force=True)
        ctx.reporter.info(f"export: wrote {target} ({export})")
    return summary
