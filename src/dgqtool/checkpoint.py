"""Load a packed checkpoint into a transformers model whose quantized linears are DGQ modules.

The model skeleton is built on the meta device, so no float copy of the quantized weights is ever
allocated; only the unquantized tensors (embeddings, norms, lm_head) and the packed buffers are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import read_json, read_tensors
from .errors import DGQError
from .models.adapters import adapter_for, decoder_layers
from .models.load import DTYPES
from .nn.dgq_linear import FORMATS
from .pack import CHECKPOINT_MANIFEST, WEIGHTS, read_checkpoint_config


def load_checkpoint(path: str | Path, device: str = "cpu", check_hashes: bool = True):
    """Returns (model in eval mode, tokenizer, quantization_config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config_dict = read_checkpoint_config(path)
    q = config_dict["quantization_config"]
    if q.get("format") not in FORMATS:
        raise DGQError(f"{path}: unknown dgq weight format '{q.get('format')}'")
    expected = read_json(path / CHECKPOINT_MANIFEST)["files"].get(WEIGHTS) if check_hashes else None
    state = read_tensors(path / WEIGHTS, expected)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours, not a transformers quantizer
    dtype = DTYPES.get(q.get("compute_dtype", "float32"), torch.float32)
    adapter = adapter_for(config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    module_type = FORMATS[q["format"]]
    group, static = int(q["group_size"]), q.get("activation") == "static"
    for index, layer in enumerate(decoder_layers(model, adapter)):
        for name in adapter.linear_names():
            linear = layer.get_submodule(name)
            module_group = linear.in_features if q.get("method") == "channelwise" else group
            with torch.device("meta"):
                module = module_type(linear.in_features, linear.out_features, module_group,
                                     bias=linear.bias is not None, static=static, dtype=dtype)
            layer.set_submodule(name, module)
    model.to_empty(device="cpu")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise DGQError(f"{path}: tensors do not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied - _non_persistent(model) or unexpected:
        raise DGQError(f"{path}: tensors missing {sorted(set(missing) - tied)[:3]} / unexpected {sorted(unexpected)[:3]}")
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)) and getattr(module, "_non_persistent_buffers_set", None):
            model._init_weights(module)  # recompute rotary tables and other derived buffers
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval(), tokenizer, q


def _non_persistent(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_non_persistent_buffers()}
