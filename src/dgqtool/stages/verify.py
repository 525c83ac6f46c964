"""verify's orchestration: find the reference model and tokens (--model or the work directory),
build the perplexity gate, run dgqtool.verify's checks and fail on any failed row."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import read_manifest, read_tensors
from ..errors import DGQError
from ..models.load import load_model, model_digest
from ..progress import Reporter


def verify(checkpoint: Path, work: Path | None, model_spec: str | None, reporter: Reporter,
           gate: dict | None = None) -> list:
    """gate: {"task", "limit", "seqlen", "data_dir", "max_increase", "max_ratio"} for a perplexity threshold."""
    from ..verify import PplGate, raise_on_failure, verify_checkpoint

    tokens = None
    if work is not None:
        calib = read_manifest(work / "calibrate", "calibrate")
        model_spec = model_spec or calib["options"]["model"]
        stats = read_tensors(work / "calibrate" / "stats.safetensors", calib["outputs"]["stats.safetensors"])
        tokens = stats["tokens"][:2, :256]
    if gate and not model_spec:
        raise DGQError("a perplexity gate needs the original model: pass --model or --work")
    reference = tokenizer = digest = None
    if model_spec:
        reference, tokenizer, _ = load_model(model_spec, "float32")
        digest = model_digest(model_spec)
    else:
        reporter.info("[yellow]logits vs original: skipped (no reference model: pass --model or -w)[/]")
    ppl_gate = None
    if gate:
        from ..eval.windows import ppl_windows

        windows = ppl_windows(gate["task"], tokenizer, gate["seqlen"], gate.get("data_dir"), gate["limit"])
        ppl_gate = PplGate(windows, gate.get("max_increase"), gate.get("max_ratio"), f"{gate['task']} ppl")
    checks, table = verify_checkpoint(checkpoint, reference, tokens, gate=ppl_gate, reference_digest=digest)
    reporter.table(table)
    raise_on_failure(checks)
    return checks
