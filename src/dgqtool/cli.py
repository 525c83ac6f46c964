"""The `dgq` command line: parse options, call one function per command, print."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import DGQError
from .progress import Reporter
from .recipe import Recipe, load_config

app = typer.Typer(
    help="DGQ (Dual Grained Quantization) W4A8 toolchain: calibrate -> smooth -> search -> pack -> verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Output:
    """Global output mode: --json (machine-readable summary on stdout) and --no-progress."""

    json = False
    progress = True


@app.callback()
def _global_options(
    json_summary: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (logs stay on stderr).")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Plain log lines instead of progress bars (automatic without a TTY).")] = False,
):
    _Output.json, _Output.progress = json_summary, not (no_progress or json_summary)


def _reporter() -> Reporter:
    return Reporter(bars=None if _Output.progress else False)


def _emit(summary: dict) -> None:
    if _Output.json:
        typer.echo(json.dumps({"status": "ok", "exit_code": 0, **summary}, default=str))


# ---------------------------------------------------------------------------------- options
Work = Annotated[Path, typer.Option("--work", "-w", help="Work directory holding the stage artifacts.")]
Force = Annotated[bool, typer.Option("--force", help="Redo stages even if their artifacts are up to date.")]
Config = Annotated[Optional[str], typer.Option("--config", help="YAML recipe (configs/*.yaml); flags override it.")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda[:N].")]
CalibData = Annotated[Optional[str], typer.Option("--calib-data", help="Calibration text: local .txt/.json/.jsonl, 'ptb', 'wikitext2', or a datasets name.")]
DataDir = Annotated[Optional[str], typer.Option("--data-dir", help="Local data directory (else $DGQ_DATA_DIR).")]
NSamples = Annotated[Optional[int], typer.Option("--nsamples", help="Calibration segments [GPU 128, CPU 8].")]
SeqLen = Annotated[Optional[int], typer.Option("--seqlen", help="Tokens per calibration segment [GPU 2048, CPU 512].")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed of the calibration sampling [0].")]
DType = Annotated[Optional[str], typer.Option("--dtype", help="float32 | float16 | bfloat16 [CPU float32, GPU float16].")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Calibration segments per forward [4].")]
Trust = Annotated[Optional[bool], typer.Option("--trust-remote-code", help="Allow model code from the hub.")]
Smooth = Annotated[Optional[str], typer.Option("--smooth", help="percentile | smoothquant | none [percentile].")]
Percentile = Annotated[Optional[float], typer.Option("--percentile", help="Eq. 7 clipping percentile, in % [0.5].")]
Alpha = Annotated[Optional[float], typer.Option("--alpha", help="SmoothQuant migration strength [0.5].")]
Growth = Annotated[Optional[float], typer.Option("--max-column-growth", help="Cap smoothing so no weight column exceeds G x the largest column max before it (default: off).")]
Method = Annotated[Optional[str], typer.Option("--method", help="dgq | rtn-dg | groupwise | channelwise | rtn [dgq].")]
Group = Annotated[Optional[int], typer.Option("--group", help="Weight group size [128].")]
Act = Annotated[Optional[str], typer.Option("--act", help="Activation quantization: dynamic (per token) | static [dynamic].")]
Grid1 = Annotated[Optional[int], typer.Option("--grid1", help="Phase-1 (group) clipping grid points [20].")]
Grid2 = Annotated[Optional[int], typer.Option("--grid2", help="Phase-2 (channel) clipping grid points [GPU 80, CPU 20].")]
Refine = Annotated[Optional[bool], typer.Option("--refine/--no-refine", help="DGQ phase 3 (ours): per-group floor/ceil of S2 and zp +-1 (default: off).")]
Gptq = Annotated[Optional[bool], typer.Option("--gptq/--no-gptq", help="Assign codes on the searched grid by GPTQ error feedback (default: off).")]
Objective = Annotated[Optional[str], typer.Option("--objective", help="Search error on xhat (paper, int8 activations) or x (authors' code) [xhat].")]


def _handle_errors(fn):
    """One clear line and a distinct exit code instead of a traceback (DGQ_DEBUG=1 shows it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DGQError as exc:
            if os.environ.get("DGQ_DEBUG"):
                raise
            typer.echo(f"error: {exc}", err=True)
            _emit_error(str(exc), exc.exit_code)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; finished stages are kept and a rerun resumes", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug, not bad input: still no traceback wall by default
            if os.environ.get("DGQ_DEBUG"):
                raise
            typer.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with DGQ_DEBUG=1 for the traceback)", err=True)
            _emit_error(f"internal error: {type(exc).__name__}: {exc}", 1)
            raise typer.Exit(1) from None

    return wrapper


def _emit_error(message: str, code: int) -> None:
    if _Output.json:
        typer.echo(json.dumps({"status": "error", "exit_code": code, "error": message}))


def _context(work: Path, config: str | None, force: bool, calibrates: bool = False, **overrides):
    from .pipeline import Context, pick_device

    from .artifacts import lock_work_dir

    lock_work_dir(work)
    recipe = load_config(config).with_overrides(**overrides)
    device = pick_device(recipe.device)
    recipe, notes = recipe.resolved(device)
    reporter = _reporter()
    for note in notes if calibrates else ():
        reporter.info(f"[yellow]{note}[/]")
    return Context(work=work, recipe=recipe, device=device, reporter=reporter, force=force)


@app.command()
@_handle_errors
def calibrate(
    model: Annotated[str, typer.Argument(help="Local model dir, .gguf file, alias (smollm2-135m) or hub id.")],
    work: Work = Path("dgq-work"), config: Config = None, force: Force = False, device: Device = None,
    calib_data: CalibData = None, data_dir: DataDir = None, nsamples: NSamples = None, seqlen: SeqLen = None,
    seed: Seed = None, dtype: DType = None, batch_size: BatchSize = None, trust_remote_code: Trust = None,
):
    """Record per-channel activation maxima layer by layer (calibration tokens kept for search)."""
    from .pipeline import calibrate as run

    ctx = _context(work, config, force, calibrates=True, device=device, calib_data=calib_data, data_dir=data_dir, nsamples=nsamples,
                   seqlen=seqlen, seed=seed, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code)
    run(ctx, model)


@app.command()
@_handle_errors
def smooth(
    work: Work = Path("dgq-work"), config: Config = None, force: Force = False,
    smooth: Smooth = None, percentile: Percentile = None, alpha: Alpha = None, max_column_growth: Growth = None,
):
    """Compute smoothing vectors (Eq. 7 percentile clipping or SmoothQuant) from the calibration maxima."""
    from .pipeline import smooth as run

    run(_context(work, config, force, smooth=smooth, percentile=percentile, alpha=alpha,
                 max_column_growth=max_column_growth))


@app.command()
@_handle_errors
def search(
    work: Work = Path("dgq-work"), config: Config = None, force: Force = False, device: Device = None,
    method: Method = None, group: Group = None, act: Act = None, grid1: Grid1 = None, grid2: Grid2 = None,
    objective: Objective = None, refine: Refine = None, gptq: Gptq = None, batch_size: BatchSize = None,
    trust_remote_code: Trust = None,
):
    """Two-phase grid search of the DGQ scales on the smoothed model, one decoder layer at a time."""
    from .pipeline import search as run

    run(_context(work, config, force, device=device, method=method, group=group, act=act, grid1=grid1, grid2=grid2,
                 objective=objective, refine=refine, gptq=gptq, batch_size=batch_size,
                 trust_remote_code=trust_remote_code))


@app.command()
@_handle_errors
def pack(
    work: Work = Path("dgq-work"),
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")] = Path("dgq-out"),
    force: Force = False,
):
    """Write the packed W4A8 checkpoint (config.json + model.safetensors + tokenizer)."""
    from .pipeline import pack as run

    run(_context(work, None, force), output)


@app.command()
@_handle_errors
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="Packed checkpoint directory.")],
    work: Annotated[Optional[Path], typer.Option("--work", "-w", help="Work dir: its model and calibration tokens are the reference.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Original model to compare logits with.")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option("--max-ppl-increase", help="Fail if ppl rises more than this over the original.")] = None,
    max_ppl_ratio: Annotated[Optional[float], typer.Option("--max-ppl-ratio", help="Fail if ppl / original ppl exceeds this.")] = None,
    ppl_task: Annotated[str, typer.Option("--ppl-task", help="Perplexity task of the gate.")] = "wikitext2",
    ppl_limit: Annotated[int, typer.Option("--ppl-limit", help="Windows the gate scores.")] = 4,
    ppl_seqlen: Annotated[int, typer.Option("--ppl-seqlen", help="Window length of the gate.")] = 2048,
    data_dir: DataDir = None,
):
    """Check ranges, hashes, integer vs float path, logits (and a perplexity gate) against the original; exit 3 on failure."""
    from .pipeline import verify as run

    gate = None
    if max_ppl_increase is not None or max_ppl_ratio is not None:
        gate = {"task": ppl_task, "limit": ppl_limit, "seqlen": ppl_seqlen, "data_dir": data_dir,
                "max_increase": max_ppl_increase, "max_ratio": max_ppl_ratio}
    checks = run(checkpoint, work, model, _reporter(), gate)
    _emit({"checkpoint": str(checkpoint), "verify": [{"check": c.name, "passed": c.passed, "detail": c.detail} for c in checks]})


@app.command()
@_handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Packed dgq checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")],
    fmt: Annotated[str, typer.Option("--format", help="compressed-tensors (vLLM, llm-compressor) | dgq.")] = "compressed-tensors",
    force: Force = False,
):
    """Write the checkpoint for serving engines: compressed-tensors pack-quantized, or a dgq copy."""
    from .export import export_checkpoint

    summary = export_checkpoint(checkpoint, output, fmt, force)
    detail = f", max rel. error of the folded scale s1*S2 {summary['max_scale_rel_error']:.2e}" if "max_scale_rel_error" in summary else ""
    _reporter().info(f"export: wrote {output} ({fmt}{detail})")
    _emit(summary)


@app.command()
@_handle_errors
def quantize(
    model: Annotated[str, typer.Argument(help="Local model dir, .gguf file, alias (smollm2-135m) or hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")] = Path("dgq-out"),
    work: Annotated[Optional[Path], typer.Option("--work", "-w", help="Work directory [OUTPUT.work].")] = None,
    w4a8: Annotated[bool, typer.Option("--w4a8", help="4-bit weights, 8-bit activations (the only scheme).")] = True,
    config: Config = None, force: Force = False, device: Device = None,
    calib_data: CalibData = None, data_dir: DataDir = None, nsamples: NSamples = None, seqlen: SeqLen = None,
    seed: Seed = None, dtype: DType = None, batch_size: BatchSize = None, trust_remote_code: Trust = None,
    smooth: Smooth = None, percentile: Percentile = None, alpha: Alpha = None, max_column_growth: Growth = None,
    method: Method = None, group: Group = None, act: Act = None, grid1: Grid1 = None, grid2: Grid2 = None,
    objective: Objective = None, refine: Refine = None, gptq: Gptq = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run `dgq verify` on the result.")] = True,
    export: Annotated[Optional[str], typer.Option("--export", help="Also export to OUTPUT-FORMAT: compressed-tensors | dgq.")] = None,
):
    """One shot: calibrate -> smooth -> search -> pack (-> verify); reruns resume from finished stages."""
    from . import pipeline

    ctx = _context(
        work or output.with_name(output.name + ".work"), config, force, calibrates=True, device=device, calib_data=calib_data,
        data_dir=data_dir, nsamples=nsamples, seqlen=seqlen, seed=seed, dtype=dtype, batch_size=batch_size,
        trust_remote_code=trust_remote_code, smooth=smooth, percentile=percentile, alpha=alpha,
        max_column_growth=max_column_growth, method=method,
        group=group, act=act, grid1=grid1, grid2=grid2, objective=objective, refine=refine, gptq=gptq,
    )
    _emit(pipeline.quantize(ctx, model, output, run_verify=verify, export=export))


@app.command("eval")
@_handle_errors
def eval_(
    model: Annotated[str, typer.Argument(help="Original model (dir, .gguf, alias, hub id) or a packed dgq checkpoint.")],
    task: Annotated[list[str], typer.Option("--task", help="wikitext2 | ptb | c4 | piqa | arc_easy | arc_challenge | boolq | winogrande | hellaswag | mmlu (repeatable).")] = ["wikitext2"],
    seqlen: Annotated[int, typer.Option("--seqlen", help="Window length [2048].")] = 2048,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N windows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward.")] = 1,
    data_dir: DataDir = None, device: Device = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Float model dtype [CPU float32, GPU float16].")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Write the results as JSON.")] = None,
    compare: Annotated[list[str], typer.Option("--compare", help="Also evaluate this model/checkpoint (repeatable).")] = [],
    report: Annotated[Optional[Path], typer.Option("--report", help="With --compare: write compare.md and compare.png here.")] = None,
):
    """Perplexity under the GPTQ protocol (WikiText-2, PTB, C4) and zero-shot accuracy (lm-eval), offline with --data-dir."""
    from .artifacts import atomic_path, write_json
    from .eval.report import comparison_markdown, comparison_plot
    from .eval.runner import evaluate, results_table
    from .pipeline import pick_device

    dev = pick_device(device or "auto")
    reporter = _reporter()
    runs = []
    for spec in [model, *compare]:
        runs.append(evaluate(spec, task, seqlen=seqlen, limit=limit, batch_size=batch_size, data_dir=data_dir, device=dev,
                             dtype=dtype or ("float32" if dev == "cpu" else "float16"), reporter=reporter))
        reporter.table(results_table(runs[-1]))
    results = runs[0] if not compare else {"runs": runs}
    if compare:
        table = comparison_markdown(runs)
        reporter.info(table)
        if report is not None:
            with atomic_path(report / "compare.md") as tmp:
                tmp.write_text(table)
            if not comparison_plot(runs, report / "compare.png"):
                reporter.info("[yellow]matplotlib is not installed: no compare.png[/]")
    if output is not None:
        write_json(output, results)
    _emit(results)


@app.command()
@_handle_errors
def run(
    checkpoint: Annotated[Path, typer.Argument(help="Packed dgq checkpoint directory.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "The capital of France is",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
    device: Device = None,
):
    """Generate from a packed checkpoint (integer DGQ path), streaming text; prints tokens/s and peak memory."""
    from .pipeline import pick_device
    from .run import run_checkpoint

    result = run_checkpoint(checkpoint, prompt, device=pick_device(device or "auto"), max_new_tokens=max_new_tokens,
                            temperature=temperature, chat=chat)
    _reporter().info(f"{result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s), "
                    f"peak memory {result.peak_memory_mb:.0f} MiB")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
