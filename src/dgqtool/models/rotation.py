"""Rotate a float model's residual stream (and each head's v -> o space) offline, in place.

Every RMSNorm weight is first folded into the linears it feeds (norm weights become 1), so each
norm only divides by the token's RMS, which a rotation leaves unchanged. Then with one orthogonal
Q per model: embeddings E Q, every reader of the stream (q/k/v, gate/up, lm_head) W Q, every
writer (o/down) Q^T W. The per-head matrix R rotates v_proj's output rows and o_proj's input
columns of each head alike (attention mixes tokens, not channels, so R passes through it). The
rotated float model computes the same logits; nothing is applied at run time.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DGQError
from ..quant.rotate import (
    KINDS,
    rotate_head_inputs,
    rotate_head_outputs,
    rotate_inputs,
    rotate_outputs,
    rotation_matrix,
    scale_inputs,
)
from .adapters import Adapter, Residual, decoder_layers


def _untie_head(model: nn.Module, residual: Residual) -> None:
    """A tied head would need E diag(g) Q and the embedding E Q at once: give the head its own copy."""
    head = model.get_submodule(residual.head)
    embedding = model.get_submodule(residual.embedding)
    if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    for linear in readers:
        scale_inputs(linear.weight, norm.weight)
    norm.weight.fill_(1.0)


def _readers(layer: nn.Module, adapter: Adapter, norm: str) -> list[nn.Linear]:
    return [layer.get_submodule(name) for group in adapter.inputs if group.producer == norm for name in group.linears]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _fold_norms(model: nn.Module, adapter: Adapter) -> None:
    """Every RMSNorm weight into its readers' input columns; the norms keep weight 1."""
    residual = _residual(model, adapter)
    _untie_head(model, residual)
    for layer in decoder_layers(model, adapter):
        for norm in residual.norms:
            _fold_norm(layer.get_submodule(norm), _readers(layer, adapter, norm))
    _fold_norm(model.get_submodule(residual.final_norm), [model.get_submodule(residual.head)])


def _residual(model: nn.Module, adapter: Adapter) -> Residual:
    if adapter.residual is None:
        raise DGQError(f"rotation needs an RMSNorm model family; {model.config.model_type} is not supported")
    return adapter.residual


def resolve_rotation(kind: str, adapter: Adapter) -> str:
    """--rotate's value as applied: 'auto' is hadamard where the family has a residual entry, else none."""
    if kind != "auto":
        return kind
    return "hadamard" if adapter.residual is not None else "none"


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: Adapter, kind: str, seed: int, value_heads: bool = True,
                 device: str = "cpu") -> None:
    """Fold the norms and rotate the residual stream with `kind` (quant.rotate.KINDS), seeded;
    value_heads also rotates each head's v -> o space. 'none' leaves the model untouched. The
    float64 GEMMs run on `device`; the weights stay where they are."""
    if kind not in KINDS:
        raise DGQError(f"--rotate must be one of {', '.join(KINDS)}; got '{kind}'")
    if kind == "none":
        return
    residual = _residual(model, adapter)
    _fold_norms(model, adapter)
    q = rotation_matrix(kind, model.config.hidden_size, seed).to(device)
    r = rotation_matrix(kind, _head_dim(model.config), seed + 1).to(device)
    rotate_inputs(model.get_submodule(residual.embedding).weight, q)
    rotate_inputs(model.get_submodule(residual.head).weight, q)
    for layer in decoder_layers(model, adapter):
        for norm in residual.norms:
            for linear in _readers(layer, adapter, norm):
                rotate_inputs(linear.weight, q)
        for name in residual.writers:
            linear = layer.get_submodule(name)
            rotate_outputs(linear.weight, linear.bias, q)
        if value_heads:
            v, o = (layer.get_submodule(name) for name in residual.value)
            rotate_head_outputs(v.weight, v.bias, r)
            rotate_head_inputs(o.weight, r)
