"""Everything architecture-specific, as data: one table entry per model family.

An entry names where the decoder layers are, which linears read the same activation (they share
calibration statistics and one smoothing vector), and what produces that activation, so smoothing
can fold 1 / k into it. Adding a family whose code follows one of these shapes is one table line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DGQError


@dataclass(frozen=True)
class InputGroup:
    """Linears (paths inside a decoder layer) that read one activation, and its producer.

    producer is a norm or a linear inside the same layer whose output rows can absorb 1 / k; None
    when nothing can (the activation passes through a non-homogeneous function first).
    """

    linears: tuple[str, ...]
    producer: str | None


@dataclass(frozen=True)
class Adapter:
    base: str  # module whose forward embeds tokens and runs the layer stack
    layers: str  # the nn.ModuleList of decoder layers, from the causal-LM root
    inputs: tuple[InputGroup, ...]  # in execution order within a layer
    layer_returns_tuple: bool = False

    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.inputs for name in group.linears)


_LLAMA = Adapter(
    base="model",
    layers="model.layers",
    inputs=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        InputGroup(("self_attn.o_proj",), "self_attn.v_proj"),
        InputGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        InputGroup(("mlp.down_proj",), "mlp.up_proj"),
    ),
)

_OPT = Adapter(
    base="model",
    layers="model.decoder.layers",
    inputs=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm"),
        InputGroup(("self_attn.out_proj",), "self_attn.v_proj"),
        InputGroup(("fc1",), "final_layer_norm"),
        InputGroup(("fc2",), "fc1"),  # ReLU is positively homogeneous, so fc1's rows can absorb 1 / k
    ),
)

_BLOOM = Adapter(
    base="transformer",
    layers="transformer.h",
    inputs=(
        InputGroup(("self_attention.query_key_value",), "input_layernorm"),
        InputGroup(("self_attention.dense",), None),  # fused qkv: v's rows are interleaved per head
        InputGroup(("mlp.dense_h_to_4h",), "post_attention_layernorm"),
        InputGroup(("mlp.dense_4h_to_h",), None),  # GELU in between
    ),
    layer_returns_tuple=True,
)

ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": _OPT,
    "bloom": _BLOOM,
}


def adapter_for(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise DGQError(f"unsupported architecture '{model_type}'; supported: {supported}") from None


def decoder_layers(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    return model.get_submodule(adapter.layers)


def layer_linears(layer: nn.Module, adapter: Adapter) -> dict[str, nn.Linear]:
    return {name: layer.get_submodule(name) for name in adapter.linear_names()}


def can_fold(layer: nn.Module, group: InputGroup) -> bool:
    """Smoothing applies when the producer's output width equals the consumers' input width
    (e.g. v_proj -> o_proj is skipped under grouped-query attention)."""
    if group.producer is None:
        return False
    producer = layer.get_submodule(group.producer)
    width = producer.weight.shape[0]
    return all(layer.get_submodule(name).in_features == width for name in group.linears)


def check_group_size(model: nn.Module, adapter: Adapter, group: int) -> None:
    """Every quantized linear's input size must be a multiple of the group size."""
    if group <= 0:
        raise DGQError(f"group size must be positive, got {group}")
    layer = decoder_layers(model, adapter)[0]
    for name, linear in layer_linears(layer, adapter).items():
        if linear.in_features % group:
            raise DGQError(
                f"group size {group} does not divide the input size {linear.in_features} of {name}; "
                f"try --group {largest_group(model, adapter)}"
            )


def largest_group(model: nn.Module, adapter: Adapter) -> int:
    layer = decoder_layers(model, adapter)[0]
    widths = [lin.in_features for lin in layer_linears(layer, adapter).values()]
    return next((g for g in (128, 64, 32, 16, 8) if all(w % g == 0 for w in widths)), 1)


def layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
