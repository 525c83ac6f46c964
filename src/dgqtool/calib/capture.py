"""Layer-by-layer forward with offload: only the current decoder layer sits on the compute device.

The layer inputs (hidden states plus whatever the model passes each layer: masks, rotary
embeddings, position ids) are recorded by running the model's own base forward with every layer
swapped for a recorder, so no architecture-specific argument plumbing is needed here. The keyword
arguments are recorded per layer: models that alternate sliding-window and global attention
(Gemma 2/3, Qwen2 with layer_types) hand each layer its own mask and rotary tables. Each layer is
then run on its recorded inputs; its outputs, on CPU, become the next layer's inputs.

Mixture-of-experts layers run every expert on every token while hooks are attached (see
models/moe.py), so every expert's statistics cover all calibration tokens; run_layers returns the
tokens the router actually sent to each expert, per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import DGQError
from ..models.adapters import Adapter, decoder_layers, layer_output
from ..models.moe import expert_modules


@dataclass
class LayerInputs:
    """Per calibration batch: hidden states (CPU) and, per layer, the keyword arguments it receives
    (tensors shared between layers, such as one mask for all global layers, are stored once)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)


class _Recorder(nn.Module):
    """Stands in for one decoder layer: records what it would receive and passes hidden through."""

    def __init__(self, sink: LayerInputs, index: int, returns_tuple: bool, layer: nn.Module):
        super().__init__()
        self.sink, self.index, self.returns_tuple = sink, index, returns_tuple
        object.__setattr__(self, "_layer", layer)  # not a submodule: moving the base must not move it

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the base forward reads off a layer (attention_type, ...)
            if "_layer" not in self.__dict__:
                raise
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden, *args, **kwargs):
        if args:
            raise DGQError("decoder layers called with positional extras are not supported")
        if self.index == 0:
            self.sink.hidden.append(hidden.detach().to("cpu"))
            self.sink.kwargs.append([])
        self.sink.kwargs[-1].append(to_device(kwargs, "cpu", self.sink.memo))
        return (hidden,) if self.returns_tuple else hidden


def to_device(value: Any, device: torch.device | str, memo: dict | None = None) -> Any:
    """value with every tensor moved; with a memo, one tensor object moves once (id -> (src, copy))."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        hit = memo.get(id(value))
        if hit is None or hit[0] is not value:
            hit = memo[id(value)] = (value, value.to(device))
        return hit[1]
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, memo) for k, v in value.items()}
    return value


@torch.no_grad()
def record_layer_inputs(model: nn.Module, adapter: Adapter, tokens: torch.Tensor, batch_size: int, device) -> LayerInputs:
    """Run embeddings (and whatever precedes layer 0) on `device`; everything else stays put."""
    sink = LayerInputs()
    parent_path, _, attr = adapter.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    base = model.get_submodule(adapter.base)
    recorders = [_Recorder(sink, i, adapter.layer_returns_tuple, layer) for i, layer in enumerate(layers)]
    setattr(parent, attr, nn.ModuleList(recorders))
    # With the real layers detached, moving the base moves only embeddings, positions and final norm.
    try:
        base.to(device)
        for batch in tokens.split(batch_size):
            base(input_ids=batch.to(device), use_cache=False)
            sink.memo.clear()  # tensors shared between layers are stored once per batch
    finally:
        base.to("cpu")
        setattr(parent, attr, layers)
    if any(len(per_layer) != len(layers) for per_layer in sink.kwargs):
        raise DGQError("the base forward did not run every decoder layer once per batch")
    return sink


class LayerVisitor(Protocol):
    def attach(self, index: int, layer: nn.Module) -> list[Any]:
        """Register hooks before the calibration pass of a layer; return their handles."""

    def finish(self, index: int, layer: nn.Module) -> bool:
        """Use what the hooks saw; return True if the layer was changed (its outputs are recomputed)."""


def _forward(layer: nn.Module, index: int, inputs: LayerInputs, device) -> list[torch.Tensor]:
    outs = []
    for hidden, per_layer in zip(inputs.hidden, inputs.kwargs):
        out = layer_output(layer(hidden.to(device), **to_device(per_layer[index], device)))
        outs.append(out.to("cpu"))
    return outs


def _forward_capturing(layer: nn.Module, index: int, inputs: LayerInputs, device) -> list[torch.Tensor]:
    """The hooked pass: MoE blocks send every token to every expert (outputs stay the routed ones)."""
    experts = expert_modules(layer)
    for module in experts:
        module.capture = True
    try:
        return _forward(layer, index, inputs, device)
    finally:
        for module in experts:
            module.capture = False


@torch.no_grad()
def run_layers(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    visitor: LayerVisitor,
    device,
    batch_size: int = 4,
    on_layer: Callable[[int], None] | None = None,
) -> dict[int, list[int]]:
    """The sequential pipeline: per layer, a calibration pass with hooks, the visitor's work, and
    (only if the layer changed) a second pass whose outputs feed the next layer.

    The layer stack is consumed: a finished layer moves to the meta device instead of back to the
    CPU, so peak memory is the loaded model plus one layer's activations, not a second copy.
    Returns, for MoE models, the tokens routed to each expert of each layer ({} for dense ones)."""
    inputs = record_layer_inputs(model, adapter, tokens, batch_size, device)
    routed: dict[int, list[int]] = {}
    for index, layer in enumerate(decoder_layers(model, adapter)):
        layer.to(device)
        for module in expert_modules(layer):
            module.routed.zero_()
        handles = visitor.attach(index, layer)
        try:
            outs = _forward_capturing(layer, index, inputs, device)
        finally:
            for handle in handles:
                handle.remove()
        counts = [int(c) for module in expert_modules(layer) for c in module.routed]
        if counts:
            routed[index] = counts
        if visitor.finish(index, layer):
            outs = _forward(layer, index, inputs, device)
        layer.to("meta")
        inputs.hidden = outs
        if on_layer is not None:
            on_layer(index)
    return routed
