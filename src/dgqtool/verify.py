"""`dgq verify`: is a packed checkpoint legal, is its integer path right, and how close is it to the
original model? Every check yields a row; any failed row makes the command exit non-zero."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from .checkpoint import load_checkpoint
from .errors import DGQError, VerificationError
from .nn.dgq_linear import DGQLinear, _W4A8Linear
from .quant.dual_grained import format_violations
from .quant.quantizer import fake_quantize_activations

# Integer GEMM + fp32 epilogue vs the dequantized fp32 matmul: only float rounding may differ.
INTEGER_PATH_RTOL = 1e-4
# Logits of a correct W4A8 checkpoint against its own float model: rel. L2 0.223 measured on
# SmolLM2-135M (g64, the quickest recipe: 4 x 256 calibration tokens, grid2 10; top-1 agreement 63 %);
# another model's logits are uncorrelated with these (rel. L2 near or above 1).
MAX_LOGIT_REL_DIFF = 0.5


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _ranges(model: torch.nn.Module) -> Check:
    bad = []
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, _W4A8Linear):
            count += 1
            problems = format_violations(module.quantized_weight())
            if module.input_scale is not None and not (torch.isfinite(module.input_scale).all() and module.input_scale.min() > 0):
                problems.append("bad static input scale")
            bad.extend(f"{name}: {p}" for p in problems)
    if count == 0:
        return Check("packed tensor ranges", False, "no quantized linears found")
    return Check("packed tensor ranges", not bad, "; ".join(bad[:3]) or f"{count} linears: codes, zp in [0,15], |S2(code-zp)| <= 127, scales finite")


@torch.no_grad()
def _integer_vs_float(model: torch.nn.Module, seed: int) -> Check | None:
    """Each DGQ linear's integer GEMM against fake-quantized (online-rotated, where the checkpoint
    says so) activations x dequantized weights."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    count = 0
    for module in model.modules():
        if not isinstance(module, DGQLinear):
            continue
        x = torch.randn(8, module.in_features, generator=gen) * (1 + 20 * (torch.rand(module.in_features, generator=gen) > 0.99))
        x = x.to(module.qweight.device)
        expected = fake_quantize_activations(module.rotate_input(x), module.input_scale) @ module.quantized_weight().dequantize().T
        if module.bias is not None:
            expected = expected + module.bias.float()
        got = module(x).float()
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)))
        count += 1
    if count == 0:
        return None  # baseline formats have no integer path of their own to compare
    return Check("integer path = float path", worst < INTEGER_PATH_RTOL, f"{count} linears, max rel diff {worst:.2e}")


@torch.no_grad()
def _logits_vs_reference(model, reference, tokens: torch.Tensor) -> list[Check]:
    out_q = model(input_ids=tokens).logits.float()
    out_r = reference(input_ids=tokens).logits.float()
    if not torch.isfinite(out_q).all():
        return [Check("logits finite", False, "quantized model produced NaN/inf logits")]

    def ppl(logits):
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        return float(nll.exp())

    agree = float((out_q.argmax(-1) == out_r.argmax(-1)).float().mean())
    rel = float((out_q - out_r).norm() / out_r.norm())
    detail = (f"rel. L2 diff {rel:.3f} (limit {MAX_LOGIT_REL_DIFF}), top-1 agreement {agree:.1%}, "
              f"ppl on these tokens {ppl(out_q):.2f} (original {ppl(out_r):.2f})")
    if rel > MAX_LOGIT_REL_DIFF:
        detail += "; is the reference the model this checkpoint was quantized from?"
    return [
        Check("logits finite", True, f"{tokens.numel()} tokens"),
        Check("logits vs original", rel <= MAX_LOGIT_REL_DIFF, detail),
    ]


def _same_source(qconfig: dict, reference_digest: str | None) -> Check | None:
    """The reference model's content against the digest pack recorded of the model it quantized."""
    recorded = qconfig.get("source_model_sha256")
    if recorded is None or reference_digest is None:
        return None
    return Check("reference is the quantized model", recorded == reference_digest,
                 f"content sha256 {reference_digest[:12]}" + ("" if recorded == reference_digest else
                                                           f", but the checkpoint was quantized from {recorded[:12]}"))


@dataclass(frozen=True)
class PplGate:
    """Fail verification when the checkpoint's perplexity on `windows` is too far above the original's."""

    windows: torch.Tensor
    max_increase: float | None = None
    max_ratio: float | None = None
    label: str = "ppl"

    @torch.no_grad()
    def check(self, model, reference) -> Check:
        from .eval.ppl import perplexity

        quantized, original = perplexity(model, self.windows).ppl, perplexity(reference, self.windows).ppl
        ok = ((self.max_increase is None or quantized - original <= self.max_increase)
              and (self.max_ratio is None or quantized / original <= self.max_ratio))
        limits = ", ".join(f"{k} {v}" for k, v in (("max increase", self.max_increase), ("max ratio", self.max_ratio)) if v is not None)
        return Check(f"{self.label} gate", ok, f"{quantized:.3f} vs original {original:.3f} "
                     f"(+{quantized - original:.3f}, x{quantized / original:.3f}; {limits}; {len(self.windows)} windows)")


def verify_checkpoint(path: Path, reference=None, tokens: torch.Tensor | None = None, seed: int = 0,
                      gate: PplGate | None = None, reference_digest: str | None = None) -> tuple[list[Check], Table]:
    """reference: the original float model (optional) and its content digest; tokens: (batch, seq)
    ids for the logit check; gate: a perplexity threshold against the reference."""
    try:
        model, _, qconfig = load_checkpoint(path)
        checks = [Check("load + hashes", True, str(path))]
    except DGQError as exc:
        checks = [Check("load + hashes", False, str(exc))]
        model = None
    if model is not None:
        checks += [c for c in (_ranges(model), _integer_vs_float(model, seed), _same_source(qconfig, reference_digest)) if c]
        if reference is not None:
            if tokens is None:
                vocab = reference.config.get_text_config().vocab_size  # multimodal configs nest it
                tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(seed))
            checks += _logits_vs_reference(model, reference.float(), tokens)
            if gate is not None:
                checks.append(gate.check(model, reference.float()))
    table = Table(title=f"dgq verify {path}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail)
    return checks, table


def raise_on_failure(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        raise VerificationError(f"verification failed: {failed[0].name}: {failed[0].detail}")
