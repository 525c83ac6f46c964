"""Export a packed checkpoint for serving engines.

compressed-tensors "pack-quantized" (what vLLM and llm-compressor read): per linear the 4-bit codes
as int32 words, one scale per (channel, group) and the zero points. The compressed-tensors package
itself quantizes and packs the tensors. DGQ's two scale levels fold into one float scale s1 * S2,
rounded to the checkpoint's dtype: that rounding is the only difference from DGQ's weights, and
the summary reports its size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .artifacts import write_json, write_tensors
from .errors import DGQError
from .format import CHANNELWISE, CONFIG, MANIFEST, WEIGHTS, online_rotations, read_checkpoint, split_linears, write_dir
from .models.adapters import adapter_for
from .models.load import DTYPES
from .quant.dual_grained import DualGrainedWeight, QuantizedWeight

FORMATS = ("dgq", "compressed-tensors")
# int4 in compressed-tensors is signed, [-8, 7]: DGQ's unsigned codes and zero points shift by 8
SIGNED_OFFSET = 8


PACKED_FORMAT = "pack-quantized"


def _scheme(group: int, symmetric: bool, static: bool, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group, symmetric=symmetric)
    acts = (QuantizationArgs(num_bits=8, type="int", strategy="tensor", dynamic=False, symmetric=True) if static else
            QuantizationArgs(num_bits=8, type="int", strategy="token", dynamic=True, symmetric=True))
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts, format=PACKED_FORMAT)


def _config_groups(state: dict[str, torch.Tensor], linears: list[str], group: int, symmetric: bool) -> dict:
    """One scheme for every Linear, or, where only some linears have a static input scale (a
    'mixed' checkpoint), a static and a per-token scheme naming their linears."""
    static = sorted(p for p in linears if f"{p}.input_scale" in state)
    per_token = sorted(p for p in linears if f"{p}.input_scale" not in state)
    if static and per_token:
        return {"group_0": _scheme(group, symmetric, True, static), "group_1": _scheme(group, symmetric, False, per_token)}
    return {"group_0": _scheme(group, symmetric, bool(static), ["Linear"])}


def _combined_scale(weight: QuantizedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(channel, group) float scale and its max relative error against DGQ's exact s1 * S2."""
    if isinstance(weight, DualGrainedWeight):
        exact = weight.s1.double().unsqueeze(1) * weight.s2.double()
    else:  # baseline group-wise format: already one float scale per group
        exact = weight.scale.double()
    scale = exact.to(dtype)
    return scale, float(((scale.double() - exact).abs() / exact.abs().clamp(min=1e-30)).max())


def compressed_state(state: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype):
    """Returns (tensors, config groups, max scale error): every quantized linear compressed, the rest as is."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    weights, out = split_linears(state)
    if not weights:
        raise DGQError("the checkpoint holds no quantized linears")
    if qconfig["group_size"] == CHANNELWISE:
        raise DGQError("a channel-wise checkpoint has no group-wise compressed-tensors form; export a grouped recipe")
    symmetric = all(bool((w.zero == SIGNED_OFFSET).all()) for w in weights.values())
    groups = _config_groups(state, list(weights), qconfig["group_size"], symmetric)
    scheme = groups["group_0"]  # the weights' arguments, the same in every group
    worst = 0.0
    for prefix, qweight in weights.items():
        codes, zero, group = qweight.codes.to(torch.int32), qweight.zero.to(torch.int32), qweight.group
        scale, err = _combined_scale(qweight, dtype)
        worst = max(worst, err)
        # the float weight the exported checkpoint means; the compressor re-derives the codes from it
        weight = (codes - zero.repeat_interleave(group, 1)).float() * scale.float().repeat_interleave(group, 1)
        module_state = {"weight": weight, "weight_scale": scale,
                        "weight_zero_point": (zero - SIGNED_OFFSET).to(torch.int8)}
        for name, tensor in PackedQuantizationCompressor.compress(module_state, scheme).items():
            out[f"{prefix}.{name}"] = tensor
    return out, groups, worst


def write_quantization_config(directory: Path, config: dict, groups: dict) -> None:
    """config.json with compressed-tensors' block as its own ModelCompressor writes it (version,
    per-scheme and global format, status)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    write_json(directory / CONFIG, {k: v for k, v in config.items() if k != "quantization_config"})
    ignore = list(adapter_for(config["model_type"]).ignore)  # lm_head, routers, a vision tower
    qconfig = QuantizationConfig(config_groups=groups, format=PACKED_FORMAT,
                                 quantization_status="compressed", ignore=ignore)
    ModelCompressor(quantization_config=qconfig).update_config(str(directory))


def export_checkpoint(src: Path, out: Path, fmt: str = "compressed-tensors", force: bool = False) -> dict:
    """Write `src` (a packed dgq checkpoint) to `out` in `fmt`; returns a summary."""
    if fmt not in FORMATS:
        raise DGQError(f"unknown export format '{fmt}'; formats: {', '.join(FORMATS)}")
    config, state = read_checkpoint(src)
    qconfig = config["quantization_config"]
    summary = {"source": str(src), "output": str(out), "format": fmt}
    if fmt == "dgq":
        def contents(tmp: Path) -> dict[str, str]:
            for path in src.iterdir():
                if path.is_file() and path.name != MANIFEST:
                    shutil.copy2(path, tmp / path.name)
            return {}
    else:
        online = sorted(online_rotations(qconfig))
        if online:
            raise DGQError(f"{src} rotates the input of {', '.join(online)} online (--online-rotation), which a "
                           "compressed-tensors checkpoint cannot express; quantize without it to export")
        try:
            import compressed_tensors  # noqa: F401
        except ImportError as exc:
            raise DGQError(f"compressed-tensors export needs the package ({exc}): pip install compressed-tensors") from None
        dtype = DTYPES.get(qconfig.get("compute_dtype"), torch.float16)
        tensors, groups, scale_error = compressed_state(state, qconfig, dtype)
        summary["max_scale_rel_error"], summary["scale_dtype"] = scale_error, str(dtype).removeprefix("torch.")

        def contents(tmp: Path) -> dict[str, str]:
            for path in src.iterdir():  # tokenizer and generation files
                if path.is_file() and path.name not in {WEIGHTS, CONFIG, MANIFEST}:
                    shutil.copy2(path, tmp / path.name)
            digest = write_tensors(tmp / WEIGHTS, tensors, {"format": "pt"})
            write_quantization_config(tmp, config, groups)
            return {WEIGHTS: digest}

    summary["files"] = write_dir(out, force, contents)["files"]
    return summary
