"""pack: the smoothed model with every adapter linear replaced by its packed module, written as
a checkpoint directory (dgqtool.pack owns the on-disk layout)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import is_finished, read_manifest, read_tensors, sha256_file, write_manifest
from ..errors import DGQError
from ..format import linear_weight
from ..models.adapters import decoder_layers, layer_linears
from ..models.rotation import online_rotation_of
from ..nn.dgq_linear import FORMATS, format_of
from ..resources import Usage
from .graph import Context
from .smooth import rotation_of, smoothed_model


def quantized_model(ctx: Context):
    """Returns (model with packed modules, tokenizer, adapter, weight format, search manifest, calibrate manifest)."""
    search_manifest = ctx.manifest("search")
    model, tokenizer, adapter, _, calib = smoothed_model(ctx)
    dtype = next(model.parameters()).dtype
    formats = set()
    for index, layer in enumerate(decoder_layers(model, adapter)):
        name = f"layer_{index:03d}.safetensors"
        if name not in search_manifest["outputs"]:
            raise DGQError(f"search results do not cover layer {index}; rerun `dgq search`")
        tensors = read_tensors(ctx.stage_dir("search") / name, search_manifest["outputs"][name])
        for linear_name, linear in layer_linears(layer, adapter).items():
            weight = linear_weight(linear_name, tensors)
            if weight.codes.shape != linear.weight.shape:
                raise DGQError(f"search results for layer {index} {linear_name} do not match the model's shape")
            fmt = format_of(weight)
            formats.add(fmt)
            module = FORMATS[fmt].from_weight(weight, linear.bias, tensors.get(f"{linear_name}.input_scale"), dtype,
                                              online_rotation_of(linear))
            layer.set_submodule(linear_name, module)
    return model, tokenizer, adapter, formats.pop(), search_manifest, calib


def _online_orders(model, adapter) -> dict[str, tuple[int, int]]:
    """The packed linears that read x Q at run time, with Q's (Paley, Sylvester) orders."""
    return {name: (m.online_paley.shape[0], m.sylvester_order)
            for name, m in layer_linears(decoder_layers(model, adapter)[0], adapter).items() if m.online_signs is not None}


def _activation(model, adapter, act: str) -> tuple[str, list[str]]:
    """The checkpoint's activation mode and its per-token linears: a static search whose inputs
    partly kept per-token scales (--dynamic-above) is 'mixed', one where all did is 'dynamic'."""
    if act != "static":
        return act, []
    linears = [(f"{adapter.layers}.{index}.{name}", m) for index, layer in enumerate(decoder_layers(model, adapter))
               for name, m in layer_linears(layer, adapter).items()]
    per_token = [name for name, m in linears if m.input_scale is None]
    if not per_token:
        return act, []
    return ("dynamic", []) if len(per_token) == len(linears) else ("mixed", per_token)


def _pack_options(output: Path) -> dict:
    return {"output": str(output.resolve())}


def pack(ctx: Context, output: Path) -> dict:
    from ..format import quantization_config, with_rotation
    from ..pack import write_checkpoint

    usage = Usage()
    model, tokenizer, adapter, fmt, search_manifest, calib = quantized_model(ctx)
    opts = search_manifest["options"]
    dtype = next(model.parameters()).dtype
    act, per_token = _activation(model, adapter, opts["act"])
    qconfig = quantization_config(adapter, fmt, opts["method"], opts["group"], act, dtype, per_token)
    qconfig["source_model_sha256"] = calib["inputs"]["model"]  # lets verify tell a wrong reference model
    qconfig = with_rotation(qconfig, rotation_of(calib), calib["options"]["seed"], _online_orders(model, adapter))
    manifest = write_checkpoint(model, tokenizer, qconfig, output, force=True)
    write_manifest(ctx.stage_dir("pack"), "pack", _pack_options(output), {"search": search_manifest["fingerprint"]}, {},
                   checkpoint=manifest["files"], resources=usage.snapshot())
    shown = f"mixed: static, {len(per_token)} linears per token" if per_token else act
    ctx.reporter.info(f"pack: wrote {output} ({fmt} format, {opts['method']}, g{opts['group']}, {shown})")
    return manifest


def pack_is_current(ctx: Context, output: Path) -> bool:
    """The checkpoint in `output` was packed from the current search results and is intact."""
    from ..format import MANIFEST

    search_manifest = ctx.manifest("search")
    if ctx.force or not is_finished(ctx.stage_dir("pack"), "pack", _pack_options(output), {"search": search_manifest["fingerprint"]}):
        return False
    return packed_here(ctx.work, output) and (output / MANIFEST).is_file()


def packed_here(work: Path, output: Path) -> bool:
    """`output` holds exactly the checkpoint files this work directory's pack stage recorded."""
    try:
        manifest = read_manifest(work / "pack", "pack")
        if manifest.get("options", {}).get("output") != str(output.resolve()):
            return False
        return all(sha256_file(output / name) == digest for name, digest in manifest["checkpoint"].items())
    except (DGQError, OSError, KeyError, AttributeError):
        return False

