"""Everything architecture-specific, as data: one table entry per model family.

An entry names where the decoder layers are, which linears read the same activation (they share
calibration statistics and one smoothing vector), and what produces that activation, so smoothing
can fold 1 / k into it. Adding a family whose code follows one of these shapes is one table line.

Mixture-of-experts families name their experts with an `{e}` placeholder. transformers 5 stores a
layer's experts as fused 3-D parameters (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`
(E, H, I)); `bind` splits them into one module of nn.Linear per expert (models/moe.py), so every
expert linear is an ordinary quantizable linear, and expands the placeholders into real names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DGQError

EXPERT = "{e}"


@dataclass(frozen=True)
class InputGroup:
    """Linears (paths inside a decoder layer) that read one activation, and its producer.

    producer is a norm or a linear inside the same layer whose output rows can absorb 1 / k; None
    when nothing can (the activation passes through a non-homogeneous function first).
    producer_parts: the activation is the last 1 / parts of the producer's output rows (v in a
    fused [q; k; v], up in a fused [gate; up]); it folds only when the producer is exactly `parts`
    times as wide as the consumers (so never under grouped-query attention for a fused qkv).
    float_consumers: modules that read the same activation but stay in float (MoE routers, shared-
    expert gates); their weight columns take the fold too, so the float output is unchanged.
    note: why the pair is exact, or why it is skipped (rendered into the README).
    """

    linears: tuple[str, ...]
    producer: str | None
    producer_parts: int = 1
    float_consumers: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Experts:
    """Where a layer's fused expert parameters are and how they split into per-expert linears.

    linears: (linear name, fused parameter, part, parts): part `part` of `parts` equal row blocks of
    parameter[e]; the expert computes down(act(gate(x)) * up(x)) with the module's own act_fn.
    """

    path: str
    linears: tuple[tuple[str, str, int, int], ...] = (
        ("gate_proj", "gate_up_proj", 0, 2),
        ("up_proj", "gate_up_proj", 1, 2),
        ("down_proj", "down_proj", 0, 1),
    )


@dataclass(frozen=True)
class Residual:
    """Where the residual stream enters, is read and is written, for rotating it (models/rotation.py).

    Only RMSNorm families: an RMSNorm whose weight is folded into its readers commutes with an
    orthogonal rotation; LayerNorm's mean subtraction does not.
    """

    embedding: str  # the token embedding, from the causal-LM root
    final_norm: str  # the norm before the output head, from the root
    head: str  # the output head, from the root
    norms: tuple[str, ...]  # norms inside a layer; their readers are the InputGroups they produce
    writers: tuple[str, ...]  # linears inside a layer whose outputs are added to the stream
    value: tuple[str, str]  # (v, o): the per-head space between them can be rotated too
    # (role, linear) pairs whose input can take an online Hadamard at run time (--online-rotation
    # names roles): no linear producer to fold it into (down_proj reads act(gate) * up; o_proj the
    # heads side by side, which the offline v -> o rotation mixes only within each head)
    online: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GatedMLP:
    """A layer's MLP computing down(act(gate(x)) * up(x)), paths inside the layer: with act SiLU, the
    runtime computes silu(gate) * up inside down_proj's quantizer (nn/fused.py)."""

    path: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Adapter:
    base: str  # module whose forward embeds tokens and runs the layer stack
    layers: str  # the nn.ModuleList of decoder layers, from the causal-LM root
    inputs: tuple[InputGroup, ...]  # in execution order within a layer
    layer_returns_tuple: bool = False
    family: str = ""  # the checkpoints this entry is for, as users call them
    norm_offset: float = 0.0  # norms compute x_hat * (offset + w): Gemma's (1 + w)
    experts: Experts | None = None
    ignore: tuple[str, ...] = ("lm_head",)  # modules left in float, compressed-tensors' `ignore`
    notes: str = ""  # what else is particular to the family and needs nothing from dgq
    num_experts: int = 0  # set by bind()
    fusion: tuple[InputGroup, ...] | None = None  # set by bind(): groups that share one GEMM at runtime
    residual: Residual | None = None  # None: the family's residual stream cannot be rotated
    gated_mlp: GatedMLP | None = None  # the MLP whose activation the runtime may fuse into down_proj

    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.inputs for name in group.linears)

    def fusion_groups(self) -> tuple[InputGroup, ...]:
        """Groups whose linears may run as one GEMM: per expert for MoE (each expert sees its own
        tokens at runtime), else the input groups."""
        return self.fusion if self.fusion is not None else self.inputs

    def bind(self, model: nn.Module) -> Adapter:
        """The adapter for this model instance: experts split into linears, placeholders expanded."""
        if self.experts is None:
            return self
        if EXPERT not in "".join(self.linear_names()):
            return self  # already bound
        from .moe import split_experts

        count = split_experts(model, self)
        inputs, fusion = [], []
        for group in self.inputs:
            expanded = _expand(group, count)
            inputs.extend(expanded)
            fusion.extend(_expand(group, count, per_expert=True))
        return dataclasses.replace(self, inputs=tuple(inputs), fusion=tuple(fusion), num_experts=count)


def _expand(group: InputGroup, count: int, per_expert: bool = False) -> list[InputGroup]:
    """A group whose producer is per expert becomes one group per expert; one whose producer is
    shared (the norm before the MoE block) stays one group over every expert's linears, since all
    of them read that one activation. per_expert: split the latter too (the runtime's fusion
    groups: each expert sees only its routed tokens), non-expert linears as a group of their own."""
    templated = [n for n in group.linears if EXPERT in n]
    if not templated:
        return [group]
    plain = tuple(n for n in group.linears if EXPERT not in n)

    def at(e: int) -> InputGroup:
        producer = group.producer.replace(EXPERT, str(e)) if group.producer else None
        return dataclasses.replace(group, linears=tuple(n.replace(EXPERT, str(e)) for n in templated), producer=producer)

    if per_expert or (group.producer and EXPERT in group.producer):
        return [at(e) for e in range(count)] + ([dataclasses.replace(group, linears=plain)] if plain else [])
    names = tuple(n.replace(EXPERT, str(e)) for e in range(count) for n in templated)
    return [dataclasses.replace(group, linears=names + plain)]


# ----------------------------------------------------------------------------------- the table

_GQA = "not under grouped-query attention"
_LLAMA = Adapter(
    base="model",
    layers="model.layers",
    inputs=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        InputGroup(("self_attn.o_proj",), "self_attn.v_proj", note=_GQA),
        InputGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        InputGroup(("mlp.down_proj",), "mlp.up_proj", note="act(gate) * up is linear in up"),
    ),
    family="LLaMA 1/2/3.x, Mistral, Qwen2 / Qwen2.5",
    notes="Llama-3 rope scaling lives in the rotary tables the capture records; tied or untied "
          "embeddings; Qwen2.5's q/k/v biases: column scaling leaves them, v's bias takes 1 / k",
    residual=Residual(
        embedding="model.embed_tokens",
        final_norm="model.norm",
        head="lm_head",
        norms=("input_layernorm", "post_attention_layernorm"),
        writers=("self_attn.o_proj", "mlp.down_proj"),
        value=("self_attn.v_proj", "self_attn.o_proj"),
        online=(("down", "mlp.down_proj"), ("o", "self_attn.o_proj")),
    ),
    gated_mlp=GatedMLP("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

_QWEN3 = dataclasses.replace(
    _LLAMA,
    family="Qwen3",
    notes="per-head q_norm / k_norm come after q and k, which produce no quantized input: no pair "
          "crosses them, all stay exact; head_dim may differ from hidden / heads",
)

_PHI3 = Adapter(
    base="model",
    layers="model.layers",
    inputs=(
        InputGroup(("self_attn.qkv_proj",), "input_layernorm"),
        InputGroup(("self_attn.o_proj",), "self_attn.qkv_proj", producer_parts=3,
                   note="v = the last third of qkv's rows; only when q, k, v are equally wide (no GQA)"),
        InputGroup(("mlp.gate_up_proj",), "post_attention_layernorm"),
        InputGroup(("mlp.down_proj",), "mlp.gate_up_proj", producer_parts=2, note="up = the second half of gate_up's rows"),
    ),
    family="Phi-3 / Phi-3.5 / Phi-4",
    notes="fused qkv_proj and gate_up_proj are quantized as they are, one GEMM each",
)

_GEMMA = Adapter(
    base="model",
    layers="model.layers",
    inputs=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
                   note="(1 + w) / k folds as w' = (1 + w) / k - 1"),
        InputGroup(("self_attn.o_proj",), "self_attn.v_proj", note=_GQA),
        InputGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm", note="(1 + w) as above"),
        InputGroup(("mlp.down_proj",), "mlp.up_proj"),
    ),
    family="Gemma 2, Gemma 3 (text)",
    norm_offset=1.0,
    notes="post-attention / post-feedforward norms read o's and down's outputs, which smoothing "
          "leaves unchanged: no fold; embedding scaling runs before layer 0; attention and final-logit "
          "soft-capping sit after q/k and lm_head, outside every pair; sliding and global layers get "
          "their own masks and rotary tables; exact in fp32 (logits 1e-6); stored in bf16 a folded "
          "w' = (1 + w) / k - 1 near -1 keeps fewer bits: logits move as much as a plain norm's fold "
          "(2e-2) for k <= 10, 4-9x that for k up to 100",
)

_GEMMA3_MM = dataclasses.replace(
    _GEMMA,
    base="model.language_model",
    layers="model.language_model.layers",
    family="Gemma 3 multimodal checkpoints (4B and up)",
    ignore=("lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"),
    notes="the language model as Gemma 3 (text); vision tower and projector stay float; text-only calibration",
)

_MOE_NOTE = ("calibration sends every token to every expert (each expert's statistics and search see "
             "all tokens) while the layer output keeps the float top-k routing; routed token counts "
             "per expert go to the calibrate manifest")

_MIXTRAL = Adapter(
    base="model",
    layers="model.layers",
    inputs=(
        _LLAMA.inputs[0],
        _LLAMA.inputs[1],
        InputGroup(("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "post_attention_layernorm",
                   float_consumers=("mlp.gate",), note="all experts read one activation; the float router takes k"),
        InputGroup(("mlp.experts.{e}.down_proj",), "mlp.experts.{e}.up_proj", note="per expert"),
    ),
    family="Mixtral",
    experts=Experts("mlp.experts"),
    ignore=("lm_head", "re:.*mlp.gate$"),
    notes=_MOE_NOTE,
)

_QWEN3_MOE = dataclasses.replace(
    _MIXTRAL,
    family="Qwen3-MoE",
    notes="q_norm / k_norm as in Qwen3; every layer sparse (no mlp_only_layers, decoder_sparse_step 1); " + _MOE_NOTE,
)

_QWEN2_MOE = dataclasses.replace(
    _MIXTRAL,
    inputs=(
        _LLAMA.inputs[0],
        _LLAMA.inputs[1],
        InputGroup(("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.shared_expert.gate_proj",
                    "mlp.shared_expert.up_proj"), "post_attention_layernorm",
                   float_consumers=("mlp.gate", "mlp.shared_expert_gate"),
                   note="experts and shared expert read one activation; router and shared-expert gate take k in float"),
        InputGroup(("mlp.experts.{e}.down_proj",), "mlp.experts.{e}.up_proj", note="per expert"),
        InputGroup(("mlp.shared_expert.down_proj",), "mlp.shared_expert.up_proj"),
    ),
    family="Qwen1.5-MoE / Qwen2-MoE",
    ignore=("lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"),
    notes=_MOE_NOTE,
)

_OPT = Adapter(
    base="model",
    layers="model.decoder.layers",
    inputs=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm"),
        InputGroup(("self_attn.out_proj",), "self_attn.v_proj"),
        InputGroup(("fc1",), "final_layer_norm"),
        InputGroup(("fc2",), "fc1", note="ReLU is positively homogeneous"),
    ),
    family="OPT",
)

_BLOOM = Adapter(
    base="transformer",
    layers="transformer.h",
    inputs=(
        InputGroup(("self_attention.query_key_value",), "input_layernorm"),
        InputGroup(("self_attention.dense",), None, note="fused qkv's v rows are interleaved per head"),
        InputGroup(("mlp.dense_h_to_4h",), "post_attention_layernorm"),
        InputGroup(("mlp.dense_4h_to_h",), None, note="GELU in between"),
    ),
    layer_returns_tuple=True,
    family="BLOOM",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "phi3": _PHI3,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": _GEMMA3_MM,
    "mixtral": _MIXTRAL,
    "qwen3_moe": _QWEN3_MOE,
    "qwen2_moe": _QWEN2_MOE,
    "opt": _OPT,
    "bloom": _BLOOM,
}


def adapter_for(model_type: str) -> Adapter:
    """The table entry (expert names still as placeholders; use adapter_for_model for a model)."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise DGQError(f"unsupported architecture '{model_type}'; supported: {supported}") from None


def adapter_for_model(model: nn.Module) -> Adapter:
    """The bound adapter of a loaded (or meta-built) model; MoE experts are split into linears."""
    return adapter_for(model.config.model_type).bind(model)


def _short(names: tuple[str, ...]) -> str:
    """mlp.experts.{e}.gate_proj -> experts' gate_proj; self_attn.q_proj -> q_proj."""
    out = []
    for name in names:
        parts = name.split(".")
        short = f"experts' {parts[-1]}" if EXPERT in parts else ("shared " if "shared_expert" in parts else "") + parts[-1]
        if short not in out:
            out.append(short)
    return " / ".join(out)


def describe(adapter: Adapter) -> str:
    """The smoothing pairs of one entry, in words: producer -> consumers (note), or why none."""
    pairs = []
    for group in adapter.inputs:
        if group.producer is None:
            pairs.append(f"{_short(group.linears)}: no fold ({group.note})")
            continue
        text = f"{_short((group.producer,))} -> {_short(group.linears)}"
        pairs.append(f"{text} ({group.note})" if group.note else text)
    return "; ".join(pairs)


def supported_architectures(short: bool = False) -> str:
    """The supported architectures rendered from the table (Markdown): with `short`, the README's
    list; in full, docs/architectures.md's. Tests keep both files equal to it:
    python -c 'from dgqtool.models.adapters import supported_architectures as s; print(s())'"""
    by_entry: dict[int, tuple[Adapter, list[str]]] = {}
    for model_type, adapter in ADAPTERS.items():
        by_entry.setdefault(id(adapter), (adapter, []))[1].append(f"`{model_type}`")
    if short:
        return "\n".join(f"- {adapter.family} ({', '.join(types)})" for adapter, types in by_entry.values())
    lines = []
    for adapter, types in by_entry.values():
        kept = ", ".join(f"`{name}`" for name in adapter.ignore)
        line = f"- **{adapter.family}** ({', '.join(types)}). Smoothing: {describe(adapter)}. Float: {kept}, embeddings."
        lines.append(line + (f" Also: {adapter.notes}." if adapter.notes else ""))
    return "\n".join(lines)


def decoder_layers(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    return model.get_submodule(adapter.layers)


def layer_linears(layer: nn.Module, adapter: Adapter) -> dict[str, nn.Linear]:
    return {name: layer.get_submodule(name) for name in adapter.linear_names()}


def _width(module: nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[1]


def can_fold(layer: nn.Module, group: InputGroup) -> bool:
    """Smoothing applies when the producer's output width (its last 1 / parts rows) equals the
    consumers' input width (e.g. v_proj -> o_proj is skipped under grouped-query attention)."""
    if group.producer is None:
        return False
    producer = layer.get_submodule(group.producer)
    width = layer.get_submodule(group.linears[0]).in_features
    if producer.weight.shape[0] != group.producer_parts * width:
        return False
    return all(_width(layer.get_submodule(name)) == width for name in group.linears + group.float_consumers)


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
