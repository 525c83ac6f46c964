"""Layer-by-layer forward with offload: only the current decoder layer sits on the compute device.

The layer-0 inputs (hidden states plus whatever the model passes each layer: masks, rotary
embeddings, position ids) are recorded by running the model's own base forward with the layer
stack swapped for a recorder, so no architecture-specific argument plumbing is needed here.
Each layer is then run on its recorded inputs; its outputs, on CPU, become the next layer's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import DGQError
from ..models.adapters import Adapter, decoder_layers, layer_output


@dataclass
class LayerInputs:
    """Per calibration batch: hidden states (CPU) and the keyword arguments each layer receives."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class _Recorder(nn.Module):
    """Stands in for the whole layer stack: records what the first layer would receive."""

    def __init__(self, sink: LayerInputs, returns_tuple: bool):
        super().__init__()
        self.sink, self.returns_tuple = sink, returns_tuple

    def forward(self, hidden, *args, **kwargs):
        if args:
            raise DGQError("decoder layers called with positional extras are not supported")
        self.sink.hidden.append(hidden.detach().to("cpu"))
        self.sink.kwargs.append(to_device(kwargs, "cpu"))
        return (hidden,) if self.returns_tuple else hidden


def to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def record_layer_inputs(model: nn.Module, adapter: Adapter, tokens: torch.Tensor, batch_size: int, device) -> LayerInputs:
    """Run embeddings (and whatever precedes layer 0) on `device`; everything else stays put."""
    sink = LayerInputs()
    parent_path, _, attr = adapter.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    base = model.get_submodule(adapter.base)
    setattr(parent, attr, nn.ModuleList([_Recorder(sink, adapter.layer_returns_tuple)]))
    # The base forward slices layers[:num_hidden_layers]; one recorder entry is enough. With the real
    # layers detached, moving the base moves only embeddings, positions and final norm.
    try:
        base.to(device)
        for batch in tokens.split(batch_size):
            base(input_ids=batch.to(device), use_cache=False)
    finally:
        base.to("cpu")
        setattr(parent, attr, layers)
    return sink


class LayerVisitor(Protocol):
    def attach(self, index: int, layer: nn.Module) -> list[Any]:
        """Register hooks before the calibration pass of a layer; return their handles."""

    def finish(self, index: int, layer: nn.Module) -> bool:
        """Use what the hooks saw; return True if the layer was changed (its outputs are recomputed)."""


def _forward(layer: nn.Module, inputs: LayerInputs, device) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = layer_output(layer(hidden.to(device), **to_device(kwargs, device)))
        outs.append(out.to("cpu"))
    return outs


@torch.no_grad()
def run_layers(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    visitor: LayerVisitor,
    device,
    batch_size: int = 4,
    on_layer: Callable[[int], None] | None = None,
) -> None:
    """The sequential pipeline: per layer, a calibration pass with hooks, the visitor's work, and
    (only if the layer changed) a second pass whose outputs feed the next layer.

    The layer stack is consumed: a finished layer moves to the meta device instead of back to the
    CPU, so peak memory is the loaded model plus one layer's activations, not a second copy."""
    inputs = record_layer_inputs(model, adapter, tokens, batch_size, device)
    for index, layer in enumerate(decoder_layers(model, adapter)):
        layer.to(device)
        handles = visitor.attach(index, layer)
        try:
            outs = _forward(layer, inputs, device)
        finally:
            for handle in handles:
                handle.remove()
        if visitor.finish(index, layer):
            outs = _forward(layer, inputs, device)
        layer.to("meta")
        inputs.hidden = outs
        if on_layer is not None:
            on_layer(index)
