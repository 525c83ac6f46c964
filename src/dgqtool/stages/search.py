"""search: layer by layer on the smoothed model, accumulate the second moments of each linear input,
run the two-phase grid search, save the layer's parameters (resumable per layer) and feed the next
layer the quantized layer's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ..artifacts import fingerprint, read_tensors, sha256_file, write_manifest, write_tensors
from ..calib.capture import run_layers
from ..errors import DGQError
from ..format import FORMAT_VERSION, linear_tensors, linear_weight
from ..models.adapters import Adapter, InputGroup, check_group_size, decoder_layers, layer_linears
from ..quant.quantizer import INT8_MAX, fake_quantize_activations
from ..quant.search import SecondMoments, SearchResult, accumulate_moments, quantize_weights
from ..recipe import SEARCH_OPTIONS
from ..resources import Usage
from .graph import Context, input_key
from .smooth import smoothed_model


def static_input_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """Per-tensor static scale from the calibration maximum of the smoothed activation."""
    return (act_absmax.max() / INT8_MAX).clamp(min=1e-8).reshape(1)


class _LayerSearch:
    """Per layer: accumulate second moments of each (smoothed) linear input, search every linear,
    save the layer's parameters, and leave fake-quantized weights in the layer for propagation."""

    def __init__(self, ctx: Context, adapter: Adapter, scales: dict[str, torch.Tensor], per_token: set[str],
                 layer_fp: str, step):
        self.ctx, self.adapter, self.scales, self.layer_fp, self.step = ctx, adapter, scales, layer_fp, step
        self.per_token = per_token  # inputs kept per token under --act static (--dynamic-above)
        self.moments: dict[str, SecondMoments] = {}
        self.results: list[dict[str, Any]] = []
        self.done: dict[int, dict[str, torch.Tensor]] = {}

    def path(self, index: int) -> Path:
        return self.ctx.stage_dir("search") / f"layer_{index:03d}.safetensors"

    def static_scale(self, index: int, group: InputGroup) -> torch.Tensor | None:
        if self.ctx.recipe.act != "static" or input_key(index, group) in self.per_token:
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

    def _search_layer(self, index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        r = self.ctx.recipe
        tensors, errors = {}, []
        for group in self.adapter.inputs:
            key = input_key(index, group)
            moments = self.moments[key]
            if not all(torch.isfinite(m).all() for m in (moments.xx, moments.xq, moments.qq)):
                raise DGQError(f"non-finite calibration activations at the input of layer {key}")
            scale = self.static_scale(index, group)
            results: list[SearchResult] = quantize_weights(  # the group's linears as stacked rows
                [layer.get_submodule(name).weight.detach() for name in group.linears], moments,
                method=r.method, group=r.group, grid1=r.grid1, grid2=r.grid2, objective=r.objective,
                refine=r.refine, gptq=r.gptq, symmetric=r.symmetric, act_order=r.act_order,
            )
            for name, result in zip(group.linears, results):
                tensors.update(linear_tensors(name, result.weight, torch.float32))  # search keeps float32 scales
                if scale is not None:
                    tensors[f"{name}.input_scale"] = scale.clone()  # safetensors stores no aliases
                errors.append({"layer": index, "linear": name, "rtn_dg": result.error_rtn, "searched": result.error})
        self.results.extend(errors)
        write_tensors(self.path(index), tensors, {"fingerprint": self.layer_fp, "errors": json.dumps(errors)})
        return tensors

    def finish(self, index: int, layer: nn.Module) -> bool:
        tensors = self.done.pop(index, None)
        if tensors is None:
            tensors = self._search_layer(index, layer)
        for name, linear in layer_linears(layer, self.adapter).items():
            deq = linear_weight(name, tensors).dequantize()
            linear.weight.data = deq.to(linear.weight.device, linear.weight.dtype)
        self.step.advance(f"search (layer {index + 1})")
        return True


def massive_token_inputs(stats: dict[str, torch.Tensor], ratio: float | None) -> set[str]:
    """The inputs whose largest calibration token's abs-max exceeds `ratio` x the mean token's."""
    if ratio is None:
        return set()
    keys = [k.removesuffix(".token_absmax_mean") for k in stats if k.endswith(".token_absmax_mean")]
    return {k for k in keys if stats[f"{k}.act_absmax"].max() > ratio * stats[f"{k}.token_absmax_mean"].max()}


def search(ctx: Context) -> dict:
    r = ctx.recipe
    options = r.subset(SEARCH_OPTIONS)
    done, inputs, upstream = ctx.open("search", options, upstream=("smooth", "calibrate"))
    if done is not None:
        return done
    usage = Usage()
    model, _, adapter, scales, calib = smoothed_model(ctx)
    check_group_size(model, adapter, r.group)
    stats = read_tensors(ctx.stage_dir("calibrate") / "stats.safetensors", calib["outputs"]["stats.safetensors"])
    layers = decoder_layers(model, adapter)
    layer_fp = fingerprint({"options": options, "inputs": inputs, "format": FORMAT_VERSION})
    with ctx.reporter.task(f"search ({r.method}, g{r.group}, {r.act}, grid {r.grid1}x{r.grid2})", len(layers)) as step:
        per_token = massive_token_inputs(stats, r.dynamic_above)
        if per_token:
            ctx.reporter.info(f"search: {len(per_token)} inputs keep per-token scales (a token above {r.dynamic_above}x "
                              f"the mean token): {', '.join(sorted(per_token))}")
        visitor = _LayerSearch(ctx, adapter, scales, per_token, layer_fp, step)
        run_layers(model, adapter, stats["tokens"], visitor, ctx.device, r.batch_size)
    outputs = {f"layer_{i:03d}.safetensors": sha256_file(visitor.path(i)) for i in range(len(layers))}
    ctx.reporter.table(error_table(visitor.results))
    return write_manifest(ctx.stage_dir("search"), "search", options, inputs, outputs, errors=visitor.results,
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
