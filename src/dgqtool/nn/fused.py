"""Quantized linears that read one activation (q/k/v, gate/up) run as one GEMM.

Every packed tensor of both weight formats is per output channel, so the members' rows concatenate
into one module of the same format: the activation is quantized once and one kernel streams all
their weights. Each member is replaced by a slice of the shared output, so the model's own forward
code (which calls q_proj, k_proj, v_proj in turn on the same tensor) runs unchanged. The integers and
the fp32 epilogue of every output element are the same as unfused: outputs are bit-identical.

Where the group's activation is an RMSNorm's output read by nothing else (the adapter says so), the
norm moves into the fused DGQ linear (ops.norm_linear: the norm inside the activation quantizer) and
the norm module becomes NormInLinears, which passes its input through. On the CPU that is
bit-identical too; on a GPU the kernel's own sum of squares may move a row's 1 / rms by a few ulp.
Where the layer's gated MLP computes down(silu(gate(x)) * up(x)) on a fused gate/up and a DGQ down
(the adapter's GatedMLP), GatedMLPInLinears runs it as the fused gate/up output into
ops.silu_mul_linear: the activation is computed inside down_proj's quantizer, bit-identical to
torch's ops on the same device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapters import Adapter, GatedMLP, InputGroup, decoder_layers
from .dgq_linear import DGQLinear, _W4A8Linear


class SharedInputLinear(nn.Module):
    """One fused quantized linear whose output is handed out in member slices."""

    def __init__(self, fused: _W4A8Linear, widths: tuple[int, ...]):
        super().__init__()
        self.fused, self.widths = fused, widths
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._pending: set[int] = set()
        self.norm: NormInLinears | None = None  # set by fuse_shared_inputs; not a submodule (the layer holds it)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return self.fused(x)
        return self.fused.forward_normed(x, self.norm.weight, self.norm.eps)

    def output_for(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """The fused output for x, computed on the first member's call and dropped after the last's."""
        if self._input is not x or member not in self._pending:
            self._input, self._output, self._pending = x, self.compute(x), set(range(len(self.widths)))
        self._pending.discard(member)
        out = self._output
        if not self._pending:
            self._input = self._output = None
        return out


class ProjectionSlice(nn.Module):
    """Stands where a member linear was: its columns [start, stop) of the shared output."""

    def __init__(self, shared: SharedInputLinear, member: int, start: int, stop: int):
        super().__init__()
        if member == 0:
            self.shared = shared  # registered once, so state_dict and .to() see its buffers once
        else:
            object.__setattr__(self, "shared", shared)
        self.member, self.start, self.stop = member, start, stop
        self.in_features, self.out_features = shared.fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(x, self.member)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a fused {type(self.shared.fused).__name__}"


class NormInLinears(nn.Module):
    """Stands where an RMSNorm was whose only readers are one fused DGQ linear, which now computes
    the norm itself: its input passes through. Keeps the norm's weight (same state_dict key) and eps."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, computed by the linears that read it"


def _computes_llama_rmsnorm(norm: nn.Module) -> bool:
    """Whether the module's forward is transformers' LlamaRMSNorm.forward, op for op (Mistral's and
    Qwen's are copies of it): what ops.rms_norm and the fused kernel compute. A norm of another
    rounding (one cast after the weight) or one whose forward a kernel hub replaced is not."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _same_forward(norm, LlamaRMSNorm)


def _deferrable_norm(layer: nn.Module, adapter: Adapter, group: InputGroup, shared: SharedInputLinear) -> nn.Module | None:
    """The group's producer if it is an RMSNorm computing LlamaRMSNorm's formula (families with a
    rotatable residual and no norm offset) that nothing but this group reads."""
    residual = adapter.residual
    if residual is None or adapter.norm_offset or group.producer not in residual.norms or group.float_consumers:
        return None
    if sum(g.producer == group.producer for g in adapter.inputs) != 1 or not isinstance(shared.fused, DGQLinear):
        return None
    norm = layer.get_submodule(group.producer)
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if not _computes_llama_rmsnorm(norm) or not isinstance(eps, float) or not isinstance(weight, nn.Parameter):
        return None
    return norm if weight.shape == (shared.fused.in_features,) else None


class GatedMLPInLinears(nn.Module):
    """Stands where a gated MLP was whose gate/up run as one fused linear and whose down_proj is DGQ:
    down_proj reads [gate | up] and computes silu(gate) * up in its quantizer. Keeps the MLP's
    linears under their names (same state_dict keys)."""

    def __init__(self, gate_proj: ProjectionSlice, up_proj: ProjectionSlice, down_proj: DGQLinear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_mul(self.gate_proj.shared.compute(x))


def _same_forward(module: nn.Module, reference: type) -> bool:
    """Whether the module's forward is `reference`'s, op for op (transformers' "Copied from" classes
    are): what the fused kernels reproduce. One that a kernel hub replaced, or of other roundings, is not."""
    code, want = getattr(type(module).forward, "__code__", None), reference.forward.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names) == (want.co_code, want.co_consts, want.co_names)


def _fusable_mlp(layer: nn.Module, spec: GatedMLP) -> bool:
    """The layer's MLP is LlamaMLP's down(silu(gate(x)) * up(x)) over one fused [gate; up] and a DGQ
    down_proj without an online rotation."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp, gate, up, down = (layer.get_submodule(name) for name in (spec.path, spec.gate, spec.up, spec.down))
    act = getattr(mlp, "act_fn", None)
    silu = type(act) is nn.SiLU or (isinstance(act, nn.Module) and _same_forward(act, SiLUActivation))
    if not _same_forward(mlp, LlamaMLP) or not silu:
        return False
    if not (isinstance(gate, ProjectionSlice) and isinstance(up, ProjectionSlice) and gate.shared is up.shared):
        return False
    halves = (gate.start, gate.stop, up.start, up.stop) == (0, down.in_features, down.in_features, 2 * down.in_features)
    return (halves and gate.shared.fused.out_features == 2 * down.in_features and type(down) is DGQLinear
            and down.online_signs is None)


def _fusable(members: list[nn.Module]) -> bool:
    first = members[0]
    if len(members) < 2 or not all(type(m) is type(first) and isinstance(m, _W4A8Linear) for m in members):
        return False
    if any(m.in_features != first.in_features or m.group != first.group for m in members):
        return False
    if any(m.online_signs is not None for m in members):  # the fused module has no input rotation
        return False
    scales = [m.input_scale for m in members]
    if any(s is None for s in scales):  # static scales must agree to share one quantization
        return all(s is None for s in scales)
    return all(torch.equal(s, scales[0]) for s in scales)


@torch.no_grad()
def fuse(members: list[_W4A8Linear]) -> _W4A8Linear:
    """One module of the members' format whose rows are theirs, in order."""
    first = members[0]
    biases = [m.bias for m in members]
    dtype = next((b.dtype for b in biases if b is not None), torch.float32)
    fused = type(first)(first.in_features, sum(m.out_features for m in members), first.group,
                        bias=any(b is not None for b in biases), static=first.input_scale is not None, dtype=dtype,
                        scale_dtype=first.scale_dtype)
    fused = fused.to(first.qweight.device)
    for name in fused.FORMAT.names():  # every packed tensor is per output channel
        getattr(fused, name).copy_(torch.cat([getattr(m, name) for m in members]))
    if fused.bias is not None:
        fused.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype,
                                    device=fused.bias.device) for m in members]))
    if fused.input_scale is not None:
        fused.input_scale.copy_(first.input_scale)
    return fused


def fuse_shared_inputs(model: nn.Module, adapter: Adapter, float_ops: bool = True) -> int:
    """Fuse, in every decoder layer, each adapter input group of several quantized linears, and
    (float_ops) move the RMSNorm that feeds a fused DGQ group into it and the gated MLP's activation into
    its DGQ down_proj. Returns the number of fused groups."""
    count = 0
    for layer in decoder_layers(model, adapter):
        for group in adapter.fusion_groups():
            members = [layer.get_submodule(name) for name in group.linears]
            if not _fusable(members):
                continue
            shared = SharedInputLinear(fuse(members), tuple(m.out_features for m in members))
            start = 0
            for i, (name, member) in enumerate(zip(group.linears, members)):
                layer.set_submodule(name, ProjectionSlice(shared, i, start, start + member.out_features))
                start += member.out_features
            norm = _deferrable_norm(layer, adapter, group, shared) if float_ops else None
            if norm is not None:
                deferred = NormInLinears(norm.weight, norm.variance_epsilon)
                layer.set_submodule(group.producer, deferred)
                object.__setattr__(shared, "norm", deferred)  # the layer owns it: one state_dict key
            count += 1
        spec = adapter.gated_mlp
        if float_ops and spec is not None and _fusable_mlp(layer, spec):
            layer.set_submodule(spec.path, GatedMLPInLinears(*(layer.get_submodule(n) for n in (spec.gate, spec.up, spec.down))))
    return count
