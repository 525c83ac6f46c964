"""A packed dgq checkpoint of a tiny model in about a second: round-to-nearest DGQ weights (no
calibration), written by the real checkpoint writer. Shared by the format, integration and ops tests."""

from __future__ import annotations

from pathlib import Path

import torch

from dgqtool.format import quantization_config
from dgqtool.models.adapters import adapter_for, decoder_layers, layer_linears
from dgqtool.models.load import load_model
from dgqtool.nn.dgq_linear import DGQLinear
from dgqtool.pack import write_checkpoint
from dgqtool.quant.search import rtn_dual_grained


def write_packed(model_dir: Path, out: Path, group: int = 32, dtype: str = "float32") -> Path:
    model, tokenizer, _ = load_model(str(model_dir), dtype=dtype)
    adapter = adapter_for(model.config.model_type)
    with torch.no_grad():
        for layer in decoder_layers(model, adapter):
            for name, linear in layer_linears(layer, adapter).items():
                weight = rtn_dual_grained(linear.weight.float(), group)
                layer.set_submodule(name, DGQLinear.from_weight(weight, linear.bias, None, linear.weight.dtype))
    qconfig = quantization_config(adapter, "dgq", "rtn-dg", group, "dynamic", next(model.parameters()).dtype)
    write_checkpoint(model, tokenizer, qconfig, out, force=True)
    return out
