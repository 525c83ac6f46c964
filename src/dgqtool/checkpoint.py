"""Load a packed checkpoint into a transformers model whose quantized linears are DGQ modules.

The model skeleton is built on the meta device, so no float copy of the quantized weights is ever
allocated; only the unquantized tensors (embeddings, norms, lm_head) and the packed buffers are.
Nothing is ever run from the checkpoint: every transformers call passes trust_remote_code=False.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from .artifacts import read_json, read_tensors
from .errors import DGQError
from .format import (
    MANIFEST,
    PACKED_NAMES,
    WEIGHT_FORMATS,
    WEIGHTS,
    check_files,
    group_of,
    online_rotations,
    read_checkpoint,
    read_config,
    static_input,
)
from .models.adapters import adapter_for_model, decoder_layers
from .models.load import DTYPES
from .nn.dgq_linear import FORMATS, _W4A8Linear
from .nn.fused import fuse_shared_inputs
from .quant.dual_grained import GroupWeight, format_violations
from .quant.rotate import factor_problems

NO_REMOTE_CODE = {"local_files_only": True, "trust_remote_code": False}


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """Returns (model in eval mode, tokenizer, quantization_config) of a dgq checkpoint, or of a
    `dgq export --format compressed-tensors` directory."""
    path = Path(path)
    if is_compressed_tensors(path):
        return load_compressed_tensors(path, device)
    config, state = read_checkpoint(path)
    q = config["quantization_config"]
    model = _quantized_model(path, state, FORMATS[q["format"]], DTYPES[q["compute_dtype"]],
                             static_input(q), lambda linear, where: group_of(q, linear.in_features, where),
                             online_rotations(q), q.get("per_token_linears", ()))
    return model.to(device).eval(), tokenizer(path), q


def checkpoint_config(path: Path) -> dict:
    """config.json of a dgq checkpoint (fields checked) or of a compressed-tensors export."""
    return read_json(path / "config.json") if is_compressed_tensors(path) else read_config(path)


def fuse_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """q/k/v and gate/up (each adapter input group) as one GEMM each; outputs are bit-identical."""
    fuse_shared_inputs(model, adapter_for_model(model))
    return model


def is_compressed_tensors(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and (read_json(config).get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def load_compressed_tensors(path: str | Path, device: str = "cpu"):
    """Load a `dgq export --format compressed-tensors` checkpoint (pack-quantized, int4 group,
    int8 activations) into group-format W4A8 modules: codes, zero points and the folded float scale.
    Returns (model, tokenizer, quantization_config)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    path = Path(path)
    config = read_json(path / "config.json")
    q = config.get("quantization_config") or {}
    groups = list((q.get("config_groups") or {}).values())
    weights = groups[0].get("weights", {}) if groups and isinstance(groups[0], dict) else {}
    if (q.get("format") != "pack-quantized" or weights.get("num_bits") != 4 or weights.get("strategy") != "group"
            or any(not isinstance(g, dict) or g.get("weights") != weights for g in groups)):
        raise DGQError(f"{path}: not a 4-bit group pack-quantized compressed-tensors checkpoint (one weight scheme)")
    if (path / MANIFEST).is_file():  # written by `dgq export`: every file checked as for a dgq checkpoint
        check_files(path)
    state = read_tensors(path / WEIGHTS)
    group_format = WEIGHT_FORMATS["w4-group"]
    # the export rounded each folded scale s1 * S2 to its dtype once: keep that dtype, round no further
    scale_dtype = next((v.dtype for k, v in state.items() if k.endswith(".weight_scale")), torch.float16)
    for prefix in [k.removesuffix(".weight_packed") for k in state if k.endswith(".weight_packed")]:
        shape = torch.Size(state.pop(f"{prefix}.weight_shape").tolist())
        codes = unpack_from_int32(state.pop(f"{prefix}.weight_packed"), 4, shape) + 8
        scale = state.pop(f"{prefix}.weight_scale")
        zero_packed = state.pop(f"{prefix}.weight_zero_point", None)
        zero = (torch.full(scale.shape, 8, dtype=torch.int32) if zero_packed is None
                else unpack_from_int32(zero_packed, 4, scale.shape, packed_dim=0).to(torch.int32) + 8)
        packed = group_format.encode(GroupWeight(codes.to(torch.uint8), zero.to(torch.uint8), scale), scale_dtype)
        state.update({f"{prefix}.{name}": tensor for name, tensor in packed.items()})
    dtype = DTYPES.get(config.get("torch_dtype") or config.get("dtype") or "float16", torch.float16)
    group = int(weights["group_size"])
    module_type = functools.partial(FORMATS[group_format.name], scale_dtype=scale_dtype)
    model = _quantized_model(path, state, module_type, dtype, _static_by_targets(groups),
                             lambda linear, where: group)
    return model.to(device).eval(), tokenizer(path), q


def _static_by_targets(groups: list[dict]):
    """name -> whether the linear's config group reads a static input scale: the only group, else
    the group whose targets name it (exactly or by an "re:" pattern), else one targeting "Linear"."""
    def static(group: dict) -> bool:
        return not (group.get("input_activations") or {}).get("dynamic", True)

    if len(groups) == 1:
        only = static(groups[0])
        return lambda _name: only

    def names(target: str, name: str) -> bool:
        return bool(re.fullmatch(target[3:], name)) if target.startswith("re:") else target == name

    def of(name: str) -> bool:
        for group in groups:
            if any(names(t, name) for t in group.get("targets", []) if t != "Linear"):
                return static(group)
        for group in groups:
            if "Linear" in group.get("targets", []):
                return static(group)
        raise DGQError(f"no config group targets {name}")
    return of


def tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **NO_REMOTE_CODE)
    except (OSError, ValueError) as exc:
        raise DGQError(f"{path}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None


def replace_linears(model: torch.nn.Module, module_type: type[_W4A8Linear], dtype, static, group_of_linear,
                    online: dict[str, tuple[int, int]], where: Path, per_token: tuple[str, ...] = ()) -> None:
    """Swap every adapter linear of a (meta) model for an empty `module_type` of its shape
    (MoE: the experts are split into linears first, as at quantization time); `static`: full module
    name -> whether its input scale is static (format.static_input); `online`: the linears with an
    online input rotation and its (Paley, Sylvester) orders (format.online_rotations); `per_token`:
    the names a mixed checkpoint lists. A misfit (group size, online rotation, an unknown name) is
    one DGQError naming `where`."""
    adapter = adapter_for_model(model)
    try:
        unknown = sorted(set(online) - set(adapter.linear_names()))
        if unknown:
            raise DGQError(f"rotation.online names {unknown[0]}, which is no quantized linear of this model")
        names = []
        for index, layer in enumerate(decoder_layers(model, adapter)):
            for name in adapter.linear_names():
                linear, full = layer.get_submodule(name), f"{adapter.layers}.{index}.{name}"
                with torch.device("meta"):
                    module = module_type(linear.in_features, linear.out_features,
                                         group_of_linear(linear, f"layer {index} {name}"), bias=linear.bias is not None,
                                         static=static(full), dtype=dtype, online=online.get(name))
                layer.set_submodule(name, module)
                names.append(full)
        unknown = sorted(set(per_token) - set(names))
        if unknown:
            raise DGQError(f"per_token_linears names {unknown[0]}, which is no quantized linear of this model")
    except (ValueError, DGQError) as exc:  # ValueError: online blocks that do not divide the linear
        raise DGQError(f"{where}: {exc}") from None


def check_quantized_modules(model: torch.nn.Module, where: Path) -> None:
    """Never run a model on out-of-range codes or scales, or on factors that are no rotation."""
    for name, module in model.named_modules():
        if isinstance(module, _W4A8Linear):
            problems = format_violations(module.quantized_weight())
            if module.online_signs is not None:
                problems += factor_problems(module.online_signs, module.online_paley)
            if problems:
                raise DGQError(f"{where}: {name}: {problems[0]}")


def packed_problem(model: torch.nn.Module, found: dict[str, tuple]) -> str | None:
    """The first mismatch between the packed tensors the model's modules hold and `found`
    (name -> (dtype, shape)), or None: a wrong dtype would be cast silently by either loader."""
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in PACKED_NAMES}
    for key, (dtype, shape) in expected.items():
        if key not in found:
            return f"tensor {key} is missing"
        if found[key][0] != dtype:
            return f"tensor {key} has dtype {found[key][0]}, expected {dtype}"
        if found[key][1] != shape:
            return f"tensors do not fit the model: {key} has shape {found[key][1]}, expected {shape}"
    extra = sorted(k for k in found if k.rsplit(".", 1)[-1] in PACKED_NAMES and k not in expected)
    return f"unexpected tensor {extra[0]}" if extra else None


def _quantized_model(path: Path, state: dict, module_type, dtype, static, group_of_linear, online=None, per_token=()):
    """A transformers model built on meta whose adapter linears are `module_type`, filled from `state`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), **NO_REMOTE_CODE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the modules are swapped here, not by a transformers quantizer
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    replace_linears(model, module_type, dtype, static, group_of_linear, online or {}, path, tuple(per_token))
    problem = packed_problem(model, {k: (v.dtype, tuple(v.shape)) for k, v in state.items()})
    if problem:
        raise DGQError(f"{path}: {problem}")
    model.to_empty(device="cpu")
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)) and getattr(module, "_non_persistent_buffers_set", None):
            model._init_weights(module)  # rotary tables, embedding scales: before loading,
            # since it re-initialises the module's parameters too (Gemma's scaled embedding)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise DGQError(f"{path}: tensors do not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied - _non_persistent(model) or unexpected:
        raise DGQError(f"{path}: tensors missing {sorted(set(missing) - tied)[:3]} / unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    check_quantized_modules(model, path)
    return model


def _non_persistent(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_non_persistent_buffers()}
