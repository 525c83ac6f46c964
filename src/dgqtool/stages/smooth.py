"""smooth: smoothing vectors from the calibration maxima (Eq. 7 percentile clipping or SmoothQuant),
and the float model with them folded in, which the search and pack stages start from."""

from __future__ import annotations

import torch
from torch import nn

from ..artifacts import read_tensors, write_manifest, write_tensors
from ..models.adapters import Adapter, adapter_for_model, decoder_layers
from ..errors import DGQError
from ..models.load import load_model, model_digest
from ..models.rotation import rotate_model, rotate_online
from ..quant.smooth import cap_column_growth, fold_group, percentile_scales, smoothquant_scales
from ..recipe import SMOOTH_OPTIONS, Recipe
from ..resources import Usage
from .graph import Context, input_key


def smoothing_vector(r: Recipe, act: torch.Tensor, weight_absmax: torch.Tensor) -> torch.Tensor | None:
    """The recipe's vector k for one foldable input (None: no smoothing)."""
    if r.smooth == "none":
        return None
    k = percentile_scales(act, r.percentile) if r.smooth == "percentile" else smoothquant_scales(act, weight_absmax, r.alpha)
    return k if r.max_column_growth is None else cap_column_growth(k, weight_absmax, r.max_column_growth)


def smooth(ctx: Context) -> dict:
    r = ctx.recipe
    done, inputs, upstream = ctx.open("smooth", r.subset(SMOOTH_OPTIONS), upstream=("calibrate",))
    if done is not None:
        return done
    usage = Usage()
    calib = upstream["calibrate"]
    stats = read_tensors(ctx.stage_dir("calibrate") / "stats.safetensors", calib["outputs"]["stats.safetensors"])
    out: dict[str, torch.Tensor] = {}
    for key in sorted({k.rsplit(".", 1)[0] for k in stats if k.endswith(".act_absmax")}):
        act = stats[f"{key}.act_absmax"]
        k = smoothing_vector(r, act, stats[f"{key}.weight_absmax"]) if key in calib["foldable"] else None
        if k is not None:
            out[f"{key}.smooth"] = k
        out[f"{key}.act_absmax"] = act if k is None else act / k
    digest = write_tensors(ctx.stage_dir("smooth") / "scales.safetensors", out)
    shrunk = sum(int((v > 1).sum()) for n, v in out.items() if n.endswith(".smooth"))
    ctx.reporter.info(f"smooth: {r.smooth}, {shrunk} outlier channels rescaled")
    return write_manifest(ctx.stage_dir("smooth"), "smooth", r.subset(SMOOTH_OPTIONS), inputs,
                          {"scales.safetensors": digest}, resources=usage.snapshot())


def apply_smoothing(model: nn.Module, adapter: Adapter, scales: dict[str, torch.Tensor]) -> None:
    """Fold each smoothing vector: producer rows / k, consumer columns * k (float output unchanged)."""
    for index, layer in enumerate(decoder_layers(model, adapter)):
        for group in adapter.inputs:
            k = scales.get(f"{input_key(index, group)}.smooth")
            if k is not None:
                fold_group(layer, adapter, group, k)


def rotation_of(calib: dict) -> str:
    """The rotation the calibrate stage applied ('auto' resolved; work directories from before --rotate: none)."""
    return calib.get("rotation", calib["options"].get("rotate", "none"))


def online_rotation_option(calib: dict) -> str:
    """The calibrate stage's --online-rotation (work directories from before it: none)."""
    return calib["options"].get("online_rotation", "none")


def smoothed_model(ctx: Context):
    """The float model of the calibrate stage (rotated as it was) with the smooth stage's vectors folded in.
    Returns (model, tokenizer, adapter, scales, calibrate manifest)."""
    calib, smooth_manifest = ctx.manifest("calibrate"), ctx.manifest("smooth")
    if model_digest(calib["options"]["model"]) != calib["inputs"]["model"]:
        raise DGQError(f"the model {calib['options']['model']} changed since `dgq calibrate` ran; rerun it (or `dgq quantize`)")
    model, tokenizer, _ = load_model(calib["options"]["model"], calib["options"]["dtype"],
                                     ctx.recipe.trust_remote_code, ctx.recipe.allow_pickle)
    adapter = adapter_for_model(model)
    rotate_model(model, adapter, rotation_of(calib), calib["options"]["seed"], device=ctx.device)
    rotate_online(model, adapter, online_rotation_option(calib), calib["options"]["seed"])
    scales = read_tensors(ctx.stage_dir("smooth") / "scales.safetensors", smooth_manifest["outputs"]["scales.safetensors"])
    apply_smoothing(model, adapter, scales)
    return model, tokenizer, adapter, scales, calib
