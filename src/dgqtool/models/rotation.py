"""Rotate a float model's residual stream (and each head's v -> o space) offline, in place.

Every RMSNorm weight is first folded into the linears it feeds (norm weights become 1), so each
norm only divides by the token's RMS, which a rotation leaves unchanged. Then with one orthogonal
Q per model: embeddings E Q, every reader of the stream (q/k/v, gate/up, lm_head) W Q, every
writer (o/down) Q^T W. The per-head matrix R rotates v_proj's output rows and o_proj's input
columns of each head alike (attention mixes tokens, not channels, so R passes through it). The
rotated float model computes the same logits; nothing is applied at run time.

The online rotation (--online-rotation down | down-o) is the one exception: a linear with no
linear producer (down_proj reads act(gate) * up; o_proj the heads side by side) reads x Q,
Q = factored_hadamard(in_features), applied to its input at run time; W Q is folded into its
weight, so the float model is unchanged too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DGQError
from ..quant.rotate import (
    KINDS,
    FactoredHadamard,
    factored_hadamard,
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


# --online-rotation -> the roles (adapters.Residual.online) whose linears it rotates
ONLINE_KINDS: dict[str, tuple[str, ...]] = {"none": (), "down": ("down",), "down-o": ("down", "o")}


def online_rotation_of(linear: nn.Module) -> FactoredHadamard | None:
    """The online rotation a float linear's input takes (rotate_online attached it), if any."""
    return getattr(linear, "online_rotation", None)


def _attach_online_rotation(linear: nn.Linear, rotation: FactoredHadamard) -> None:
    """x -> x Q before the linear and before every hook registered on it (the stages' captures
    see what the packed module will multiply); kept on the module for pack."""
    linear.online_rotation = rotation
    linear.register_forward_pre_hook(lambda module, args: (rotation.apply(args[0]), *args[1:]), prepend=True)


@torch.no_grad()
def rotate_online(model: nn.Module, adapter: Adapter, kind: str, seed: int) -> None:
    """--online-rotation: 'down' ('down-o') gives each of the family's online linears of those roles
    (Residual.online: down_proj; and o_proj) the rotation x -> x Q at run time with W Q folded into
    its weight, Q = factored_hadamard(in, seed + 2) (seed: the residual rotation's, seed + 1: the
    heads'); 'none' leaves the model untouched."""
    if kind not in ONLINE_KINDS:
        raise DGQError(f"--online-rotation must be one of {', '.join(ONLINE_KINDS)}; got '{kind}'")
    if kind == "none":
        return
    residual = _residual(model, adapter)
    names = [name for role, name in residual.online if role in ONLINE_KINDS[kind]]
    if not names:
        raise DGQError(f"--online-rotation {kind}: the {model.config.model_type} adapter names no linear to rotate online")
    rotations: dict[int, FactoredHadamard] = {}
    for layer in decoder_layers(model, adapter):
        for name in names:
            linear = layer.get_submodule(name)
            if linear.in_features not in rotations:
                rotations[linear.in_features] = factored_hadamard(linear.in_features, seed + 2)
            rotation = rotations[linear.in_features]
            linear.weight.copy_(rotation.apply(linear.weight.double()).to(linear.weight.dtype))  # W Q, row by row
            _attach_online_rotation(linear, rotation)
