"""The commands that produce a checkpoint: the stages, `quantize`, `verify` and `export`."""

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import DGQError
from .app import (DEFAULT_OUTPUT, CheckpointArg, Config, ExportFormat, Force, ModelArg, Work, app, check_positive,
                  checkpoint_or_default, command, default_work, emit, recipe_options, reporter, stage_context)


# --------------------------------------------------------------------------------- commands
@app.command()
@command
@recipe_options("calibrate")
def calibrate(model: ModelArg, work: Work = None, config: Config = None, force: Force = False, *, recipe_values: dict):
    """Record per-channel activation maxima layer by layer (calibration tokens kept for search)."""
    from ..stages.calibrate import calibrate as run

    run(stage_context(work or default_work(DEFAULT_OUTPUT), config, force, recipe_values, calibrates=True), model)


@app.command()
@command
@recipe_options("smooth")
def smooth(work: Work = None, config: Config = None, force: Force = False, *, recipe_values: dict):
    """Compute smoothing vectors from the calibration maxima: percentile clipping (Eq 7) or SmoothQuant."""
    from ..stages.smooth import smooth as run

    run(stage_context(work or default_work(DEFAULT_OUTPUT), config, force, recipe_values))


@app.command()
@command
@recipe_options("search")
def search(work: Work = None, config: Config = None, force: Force = False, *, recipe_values: dict):
    """Two-phase grid search of the DGQ scales on the smoothed model, one decoder layer at a time."""
    from ..stages.search import search as run

    run(stage_context(work or default_work(DEFAULT_OUTPUT), config, force, recipe_values))


Output = Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write (new, empty, or an earlier dgq output).")]


@app.command()
@command
def pack(work: Work = None, output: Output = DEFAULT_OUTPUT,
         force: Annotated[bool, typer.Option("--force", help="Replace an earlier dgq checkpoint at --output.")] = False):
    """Write the packed W4A8 checkpoint (config.json + model.safetensors + tokenizer)."""
    from ..artifacts import claim_output_dir
    from ..format import MANIFEST
    from ..stages.pack import pack as run, packed_here
    from ..stages.quantize import protected_paths

    work = work or default_work(output)
    claim_output_dir(output, MANIFEST, replace=force or packed_here(work, output), protected=protected_paths(None, work))
    run(stage_context(work, None, False, {}), output)


@app.command()
@command
def verify(
    checkpoint: CheckpointArg = None,
    work: Annotated[Optional[Path], typer.Option("--work", "-w", help="Work dir: its model and calibration tokens are the reference.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Original model to compare logits with.")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option("--max-ppl-increase", help="Fail if ppl rises more than this over the original.")] = None,
    max_ppl_ratio: Annotated[Optional[float], typer.Option("--max-ppl-ratio", help="Fail if ppl / original ppl exceeds this.")] = None,
    ppl_task: Annotated[str, typer.Option("--ppl-task", help="Perplexity task of the gate.")] = "wikitext2",
    ppl_limit: Annotated[int, typer.Option("--ppl-limit", help="Windows the gate scores.")] = 4,
    ppl_seqlen: Annotated[int, typer.Option("--ppl-seqlen", help="Window length of the gate.")] = 2048,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Local data directory (else $DGQ_DATA_DIR).")] = None,
):
    """Check ranges, hashes, integer vs float path, logits (and a perplexity gate) against the original; exit 3 on failure."""
    from ..stages.verify import verify as run

    checkpoint = checkpoint_or_default(checkpoint)
    check_positive(ppl_limit=ppl_limit, ppl_seqlen=ppl_seqlen)
    for name, value in (("max-ppl-increase", max_ppl_increase), ("max-ppl-ratio", max_ppl_ratio)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise DGQError(f"--{name} must be a positive number; got {value}")
    gate = None
    if max_ppl_increase is not None or max_ppl_ratio is not None:
        gate = {"task": ppl_task, "limit": ppl_limit, "seqlen": ppl_seqlen, "data_dir": data_dir,
                "max_increase": max_ppl_increase, "max_ratio": max_ppl_ratio}
    checks = run(checkpoint, work, model, reporter(), gate)
    emit({"checkpoint": str(checkpoint), "verify": [{"check": c.name, "passed": c.passed, "detail": c.detail} for c in checks]})


@app.command()
@command
def export(
    checkpoint: CheckpointArg = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory to write.  [default: CHECKPOINT-FORMAT]", show_default=False)] = None,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="compressed-tensors (vLLM, llm-compressor) or a dgq copy.")] = "compressed-tensors",
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier dgq export at --output.")] = False,
):
    """Write the checkpoint for serving engines: compressed-tensors pack-quantized, or a dgq copy."""
    from ..artifacts import claim_output_dir
    from ..export import export_checkpoint
    from ..format import MANIFEST
    from ..stages.quantize import export_target, protected_paths

    checkpoint = checkpoint_or_default(checkpoint)
    output = output or export_target(checkpoint, fmt)
    claim_output_dir(output, MANIFEST, replace=force, protected={**protected_paths(None, None), "the checkpoint": checkpoint})
    summary = export_checkpoint(checkpoint, output, fmt, force)
    detail = f", max rel. error of the folded scale s1*S2 {summary['max_scale_rel_error']:.2e}" if "max_scale_rel_error" in summary else ""
    reporter().info(f"export: wrote {output} ({fmt}{detail})")
    emit(summary)


@app.command()
@command
@recipe_options("calibrate", "smooth", "search")
def quantize(
    model: ModelArg,
    output: Output = DEFAULT_OUTPUT,
    work: Annotated[Optional[Path], typer.Option("--work", "-w", help="Work directory of the stage artifacts.  [default: OUTPUT.work]", show_default=False)] = None,
    w4a8: Annotated[bool, typer.Option("--w4a8", help="Shorthand for --scheme w4a8 (4-bit weights, 8-bit activations).")] = False,
    config: Config = None, force: Force = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run `dgq verify` on the result.")] = True,
    export: Annotated[Optional[ExportFormat], typer.Option("--export", help="Also export to OUTPUT-FORMAT.")] = None,
    *, recipe_values: dict,
):
    """One shot: calibrate -> smooth -> search -> pack (-> verify); reruns resume from finished stages."""
    from ..stages.quantize import preflight, quantize as run

    if w4a8:
        recipe_values["scheme"] = recipe_values["scheme"] or "w4a8"
    work = work or default_work(output)
    preflight(model, output, work, force, export)  # before the work directory exists
    ctx = stage_context(work, config, force, recipe_values, calibrates=True)
    emit(run(ctx, model, output, run_verify=verify, export=export))


