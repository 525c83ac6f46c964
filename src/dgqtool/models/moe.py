"""Mixture-of-experts layers as quantizable linears.

transformers 5 keeps a layer's experts as fused 3-D parameters and runs them with one
F.linear per expert slice; nothing there is an nn.Linear that a DGQ module could replace. split_experts
puts in place of that module an ExpertLinears: one ExpertMLP per expert holding gate_proj / up_proj /
down_proj as nn.Linear (sliced from the fused parameters, which the adapter table names), with the
same forward signature (hidden_states, top_k_index, top_k_weights) and the same arithmetic.

During calibration capture (`capture = True`) every expert runs on every token, so each expert's
statistics and search see all calibration tokens (as llm-compressor's calibrate-all-experts and
GPTQModel do); only the routed top-k outputs are summed into the layer output, which therefore is
exactly the routed model's. `routed` counts the tokens the float router actually sent to each expert.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DGQError


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)); the linears are nn.Linear or their DGQ replacements."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """Stands where a fused-parameter experts module was; children "0" .. "E-1" are ExpertMLPs."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.capture = False
        self.routed = torch.zeros(len(experts), dtype=torch.long)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        flat = top_k_index.flatten()
        counts = torch.bincount(flat, minlength=len(self))[: len(self)]
        order = torch.argsort(flat, stable=True)  # (token, slot) positions grouped by expert, tokens ascending
        rows_of, slot_of = order // top_k_index.shape[-1], order % top_k_index.shape[-1]
        sizes = counts.tolist()  # the one host sync per layer
        if self.capture:
            self.routed += torch.tensor(sizes)
        # a token picks an expert at most once, so each expert adds to distinct rows: the order of
        # experts does not change the sum
        start = 0
        for e, (expert, size) in enumerate(zip(self, sizes)):
            rows, slot = rows_of[start:start + size], slot_of[start:start + size]
            start += size
            if self.capture:
                y = expert(hidden_states)[rows]  # hooks see every token; the output keeps the routed ones
            elif size == 0:
                continue
            else:
                y = expert(hidden_states[rows])
            out.index_add_(0, rows, (y * top_k_weights[rows, slot, None]).to(out.dtype))
        return out


@torch.no_grad()
def _split(fused: nn.Module, spec) -> ExpertLinears:
    if not getattr(fused, "is_concatenated", True) or getattr(fused, "is_transposed", False) or getattr(fused, "has_bias", False):
        raise DGQError(f"{type(fused).__name__}: only concatenated, untransposed, bias-free expert weights are supported")
    count = getattr(fused, spec.linears[0][1]).shape[0]
    experts = []
    for e in range(count):
        linears = {}
        for name, param, part, parts in spec.linears:
            weight = getattr(fused, param)[e]
            rows = weight.shape[0] // parts
            block = weight[part * rows:(part + 1) * rows]
            linear = nn.Linear(block.shape[1], block.shape[0], bias=False, device=block.device, dtype=block.dtype)
            linear.weight = nn.Parameter(block.clone() if block.device.type != "meta" else block,
                                         requires_grad=False)
            linears[name] = linear
        experts.append(ExpertMLP(linears["gate_proj"], linears["up_proj"], linears["down_proj"], fused.act_fn))
    return ExpertLinears(experts)


def split_experts(model: nn.Module, adapter) -> int:
    """Replace every layer's fused experts by an ExpertLinears (idempotent); returns the expert count."""
    from .adapters import decoder_layers

    counts = set()
    for index, layer in enumerate(decoder_layers(model, adapter)):
        try:
            module = layer.get_submodule(adapter.experts.path)
        except AttributeError:
            raise DGQError(f"layer {index} has no {adapter.experts.path}: layers without experts "
                           "(mlp_only_layers, decoder_sparse_step > 1) are not supported") from None
        if not isinstance(module, ExpertLinears):
            module = _split(module, adapter.experts)
            layer.set_submodule(adapter.experts.path, module)
        counts.add(len(module))
    if len(counts) != 1:
        raise DGQError(f"layers hold different numbers of experts: {sorted(counts)}")
    return counts.pop()


def expert_modules(module: nn.Module) -> list[ExpertLinears]:
    return [m for m in module.modules() if isinstance(m, ExpertLinears)]
