"""The `dgq` command line: options generated from the recipe, one function per command, print."""

import functools
import inspect
import json
import math
import os
import signal
import sys
from dataclasses import Field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from typer.core import TyperGroup

try:  # recent typer vendors its own click
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

from . import __version__
from .errors import DGQError
from .progress import Reporter
from .recipe import Recipe, default_text, flag, load_config, options_for, value_type

class _OneLineErrors(TyperGroup):
    """Usage errors (unknown option, a value outside its choices) as one `error:` line, exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            _emit_error(exc.format_message(), 2)
            code = 2
        except typer.Abort:
            typer.echo("interrupted", err=True)
            code = 130
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="DGQ (Dual Grained Quantization) W4A8 toolchain: calibrate -> smooth -> search -> pack -> verify.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: "[default: percentile]" must not be read as markup
)
cache_app = typer.Typer(help="dgq's cache of converted GGUF models and file digests.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")

DEFAULT_OUTPUT = Path("dgq-out")


def default_work(output: Path) -> Path:
    """Stage artifacts live beside the checkpoint they lead to: OUTPUT.work."""
    return output.with_name(output.name + ".work")


class _Output:
    """Output mode: --json (machine-readable summary on stdout) and --no-progress."""

    json = False
    progress = True


def _set_output(json_summary: bool, no_progress: bool) -> None:
    _Output.json = _Output.json or json_summary
    _Output.progress = _Output.progress and not (no_progress or json_summary)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dgq {__version__}")
        raise typer.Exit()


JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (logs stay on stderr).")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Plain log lines instead of progress bars (automatic without a terminal).")]


@app.callback()
def _global_options(
    json_summary: JsonFlag = False,
    no_progress: NoProgress = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    _Output.json, _Output.progress = False, True  # each invocation starts afresh (tests run many in one process)
    _set_output(json_summary, no_progress)


def _reporter() -> Reporter:
    return Reporter(bars=None if _Output.progress else False)


def _emit(summary: dict) -> None:
    if _Output.json:
        typer.echo(json.dumps({"status": "ok", "exit_code": 0, **summary}, default=str))


def _emit_error(message: str, code: int) -> None:
    if _Output.json:
        typer.echo(json.dumps({"status": "error", "exit_code": code, "error": message}))


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so temporary files are removed as on Ctrl-C."""


def _fail(message: str, code: int) -> None:
    from .artifacts import remove_unused_work_dirs

    remove_unused_work_dirs()
    typer.echo(message, err=True)
    _emit_error(message.removeprefix("error: "), code)
    raise typer.Exit(code) from None


def _command(fn):
    """Every command: --json / --no-progress after the subcommand too, and one clear line with a
    distinct exit code instead of a traceback (DGQ_DEBUG=1 shows it)."""

    @functools.wraps(fn)
    def wrapper(*args, json_summary: bool = False, no_progress: bool = False, **kwargs):
        _set_output(json_summary, no_progress)
        try:
            return fn(*args, **kwargs)
        except DGQError as exc:
            if os.environ.get("DGQ_DEBUG"):
                raise
            _fail(f"error: {exc}", exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; finished stages are kept and a rerun resumes", 130)
        except Terminated:
            _fail("terminated; finished stages are kept and a rerun resumes", 143)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug, not bad input: still no traceback wall by default
            if os.environ.get("DGQ_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with DGQ_DEBUG=1 for the traceback)", 1)

    params = list(inspect.signature(fn).parameters.values())
    params += [inspect.Parameter("json_summary", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonFlag),
               inspect.Parameter("no_progress", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=NoProgress)]
    wrapper.__signature__ = inspect.Signature(params)
    return wrapper


# ---------------------------------------------------------------------------------- options
def _recipe_parameter(f: Field) -> inspect.Parameter:
    """A CLI option generated from a recipe field: type, choices, default and help in one place."""
    kind, _ = value_type(f)
    names = [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"] if kind is bool else [flag(f.name)]
    default = default_text(f)
    option = typer.Option(*names, help=f.metadata["help"] + (f"  [default: {default}]" if default is not None else ""),
                          show_default=False)
    if f.metadata["choices"] and kind is str:  # checked values and shell completion
        kind = Literal[tuple(f.metadata["choices"])]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option])


def recipe_options(*commands: str):
    """Append the recipe's options of `commands` to a command; it receives them as `recipe_values`."""
    chosen = {f.name: f for command in commands for f in options_for(command)}

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in chosen}
            return fn(*args, recipe_values=values, **kwargs)

        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "recipe_values"]
        wrapper.__signature__ = inspect.Signature(params + [_recipe_parameter(f) for f in chosen.values()])
        return wrapper

    return decorate


ExportFormat = Literal["compressed-tensors", "dgq"]
Work = Annotated[Optional[Path], typer.Option("--work", "-w", help="Work directory holding the stage artifacts.  [default: dgq-out.work]", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Redo stages even if their artifacts are up to date.")]
Config = Annotated[Optional[str], typer.Option("--config", help="YAML recipe (configs/*.yaml); flags override it.")]
ModelArg = Annotated[str, typer.Argument(help="Local model dir, .gguf file, alias (smollm2-135m) or hub id.")]
CheckpointArg = Annotated[Optional[Path], typer.Argument(help="Packed dgq checkpoint directory.  [default: dgq-out]", show_default=False)]


def _context(work: Path, config: str | None, force: bool, values: dict[str, Any], calibrates: bool = False):
    from .artifacts import lock_work_dir
    from .stages.graph import Context, pick_device

    recipe = load_config(config).with_overrides(**values)
    recipe.validate()
    device = pick_device(recipe.device)
    recipe, notes = recipe.resolved(device)
    reporter = _reporter()
    lock_work_dir(work)
    for note in notes if calibrates else ():
        reporter.info(note)
    return Context(work=work, recipe=recipe, device=device, reporter=reporter, force=force)


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise DGQError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")


def _checkpoint_or_default(checkpoint: Path | None) -> Path:
    """No checkpoint argument: the one `dgq quantize` writes by default, said on screen."""
    if checkpoint is not None:
        return checkpoint
    if not DEFAULT_OUTPUT.is_dir():
        raise DGQError(f"no checkpoint given and ./{DEFAULT_OUTPUT} (what `dgq quantize` writes by default) does not exist; "
                       "pass the checkpoint directory")
    _reporter().info(f"using ./{DEFAULT_OUTPUT}, the checkpoint `dgq quantize` writes by default")
    return DEFAULT_OUTPUT


# --------------------------------------------------------------------------------- commands
@app.command()
@_command
@recipe_options("calibrate")
def calibrate(model: ModelArg, work: Work = None, config: Config = None, force: Force = False, *, recipe_values: dict):
    """Record per-channel activation maxima layer by layer (calibration tokens kept for search)."""
    from .stages.calibrate import calibrate as run

    run(_context(work or default_work(DEFAULT_OUTPUT), config, force, recipe_values, calibrates=True), model)


@app.command()
@_command
@recipe_options("smooth")
def smooth(work: Work = None, config: Config = None, force: Force = False, *, recipe_values: dict):
    """Compute smoothing vectors (Eq. 7 percentile clipping or SmoothQuant) from the calibration maxima."""
    from .stages.smooth import smooth as run

    run(_context(work or default_work(DEFAULT_OUTPUT), config, force, recipe_values))


@app.command()
@_command
@recipe_options("search")
def search(work: Work = None, config: Config = None, force: Force = False, *, recipe_values: dict):
    """Two-phase grid search of the DGQ scales on the smoothed model, one decoder layer at a time."""
    from .stages.search import search as run

    run(_context(work or default_work(DEFAULT_OUTPUT), config, force, recipe_values))


Output = Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write (new, empty, or an earlier dgq output).")]


@app.command()
@_command
def pack(work: Work = None, output: Output = DEFAULT_OUTPUT,
         force: Annotated[bool, typer.Option("--force", help="Replace an earlier dgq checkpoint at --output.")] = False):
    """Write the packed W4A8 checkpoint (config.json + model.safetensors + tokenizer)."""
    from .artifacts import claim_output_dir
    from .pack import CHECKPOINT_MANIFEST
    from .stages.pack import pack as run, packed_here
    from .stages.quantize import protected_paths

    work = work or default_work(output)
    claim_output_dir(output, CHECKPOINT_MANIFEST, replace=force or packed_here(work, output), protected=protected_paths(None, work))
    run(_context(work, None, False, {}), output)


@app.command()
@_command
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
    from .stages.verify import verify as run

    checkpoint = _checkpoint_or_default(checkpoint)
    _positive(ppl_limit=ppl_limit, ppl_seqlen=ppl_seqlen)
    for name, value in (("max-ppl-increase", max_ppl_increase), ("max-ppl-ratio", max_ppl_ratio)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise DGQError(f"--{name} must be a positive number; got {value}")
    gate = None
    if max_ppl_increase is not None or max_ppl_ratio is not None:
        gate = {"task": ppl_task, "limit": ppl_limit, "seqlen": ppl_seqlen, "data_dir": data_dir,
                "max_increase": max_ppl_increase, "max_ratio": max_ppl_ratio}
    checks = run(checkpoint, work, model, _reporter(), gate)
    _emit({"checkpoint": str(checkpoint), "verify": [{"check": c.name, "passed": c.passed, "detail": c.detail} for c in checks]})


@app.command()
@_command
def export(
    checkpoint: CheckpointArg = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory to write.  [default: CHECKPOINT-FORMAT]", show_default=False)] = None,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="compressed-tensors (vLLM, llm-compressor) or a dgq copy.")] = "compressed-tensors",
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier dgq export at --output.")] = False,
):
    """Write the checkpoint for serving engines: compressed-tensors pack-quantized, or a dgq copy."""
    from .artifacts import claim_output_dir
    from .export import export_checkpoint
    from .pack import CHECKPOINT_MANIFEST
    from .stages.quantize import export_target, protected_paths

    checkpoint = _checkpoint_or_default(checkpoint)
    output = output or export_target(checkpoint, fmt)
    claim_output_dir(output, CHECKPOINT_MANIFEST, replace=force, protected={**protected_paths(None, None), "the checkpoint": checkpoint})
    summary = export_checkpoint(checkpoint, output, fmt, force)
    detail = f", max rel. error of the folded scale s1*S2 {summary['max_scale_rel_error']:.2e}" if "max_scale_rel_error" in summary else ""
    _reporter().info(f"export: wrote {output} ({fmt}{detail})")
    _emit(summary)


@app.command()
@_command
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
    from .stages.quantize import preflight, quantize as run

    if w4a8:
        recipe_values["scheme"] = recipe_values["scheme"] or "w4a8"
    work = work or default_work(output)
    preflight(model, output, work, force, export)  # before the work directory exists
    ctx = _context(work, config, force, recipe_values, calibrates=True)
    _emit(run(ctx, model, output, run_verify=verify, export=export))


Tasks = Annotated[list[str], typer.Option("--task", help="wikitext2 | ptb | c4 | piqa | arc_easy | arc_challenge | boolq | winogrande | hellaswag | mmlu (repeatable).")]


@app.command("eval")
@_command
def eval_(
    model: Annotated[Optional[str], typer.Argument(help="Original model (dir, .gguf, alias, hub id) or a packed dgq checkpoint.  [default: dgq-out]", show_default=False)] = None,
    task: Tasks = ["wikitext2"],
    seqlen: Annotated[int, typer.Option("--seqlen", help="Perplexity window length.")] = 2048,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N windows (perplexity) or items (zero-shot tasks).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows (or requests) per forward.")] = 1,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Local data directory (else $DGQ_DATA_DIR).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda[:N].  [default: auto]", show_default=False)] = None,
    dtype: Annotated[Optional[Literal["float32", "float16", "bfloat16"]],
                     typer.Option("--dtype", help="Float model dtype.  [default: GPU float16, CPU float32]", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Write the results as JSON.")] = None,
    compare: Annotated[list[str], typer.Option("--compare", help="Also evaluate this model/checkpoint (repeatable).")] = [],
    report: Annotated[Optional[Path], typer.Option("--report", help="With --compare: write compare.md and compare.png here.")] = None,
):
    """Perplexity under the GPTQ protocol (WikiText-2, PTB, C4) and zero-shot accuracy (lm-eval), offline with --data-dir."""
    from rich.console import Console

    from .artifacts import atomic_path, write_json
    from .eval.report import comparison_markdown, comparison_plot
    from .eval.runner import check_tasks, evaluate, results_table
    from .stages.graph import pick_device

    spec = model or str(_checkpoint_or_default(None))
    _positive(seqlen=seqlen, limit=limit, batch_size=batch_size)
    check_tasks(task)
    dev = pick_device(device or "auto")
    reporter = _reporter()
    results_out = Reporter(Console(stderr=_Output.json), bars=False)  # results are the command's output: stdout
    runs = []
    for one in [spec, *compare]:
        runs.append(evaluate(one, task, seqlen=seqlen, limit=limit, batch_size=batch_size, data_dir=data_dir, device=dev,
                             dtype=dtype or ("float32" if dev == "cpu" else "float16"), reporter=reporter))
        results_out.table(results_table(runs[-1]))
    results = runs[0] if not compare else {"runs": runs}
    if compare:
        table = comparison_markdown(runs)
        results_out.info(table)
        if report is not None:
            with atomic_path(report / "compare.md") as tmp:
                tmp.write_text(table)
            if not comparison_plot(runs, report / "compare.png"):
                reporter.info("matplotlib is not installed: no compare.png")
    if output is not None:
        write_json(output, results)
    _emit(results)


@app.command()
@_command
def run(
    checkpoint: CheckpointArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "The capital of France is",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")] = 0.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda[:N].  [default: auto]", show_default=False)] = None,
):
    """Generate from a packed checkpoint (integer DGQ path), streaming text; prints tokens/s and peak memory."""
    from .run import run_checkpoint
    from .stages.graph import pick_device

    checkpoint = _checkpoint_or_default(checkpoint)
    _positive(max_new_tokens=max_new_tokens)
    if not prompt:
        raise DGQError("--prompt is empty; give the text to continue")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DGQError(f"--temperature must be a finite number >= 0; got {temperature}")
    _check_generation_fits(checkpoint, max_new_tokens, chat)
    result = run_checkpoint(checkpoint, prompt, device=pick_device(device or "auto"), max_new_tokens=max_new_tokens,
                            temperature=temperature, chat=chat)
    _reporter().info(f"{result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s), "
                     f"peak memory {result.peak_memory_mb:.0f} MiB")


def _check_generation_fits(checkpoint: Path, max_new_tokens: int, chat: bool) -> None:
    """Requests the model cannot honour fail before it loads: past its context, or a chat without a template."""
    from .artifacts import read_json
    from .pack import read_checkpoint_config

    config = read_checkpoint_config(checkpoint)
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and max_new_tokens >= context:
        raise DGQError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens")
    if chat:
        tokenizer_config = checkpoint / "tokenizer_config.json"
        has_template = (checkpoint / "chat_template.jinja").is_file() or (
            tokenizer_config.is_file() and "chat_template" in read_json(tokenizer_config))
        if not has_template:
            raise DGQError(f"--chat: the tokenizer of {checkpoint} has no chat template; drop --chat")


@cache_app.command("info")
@_command
def cache_info():
    """Where the cache is and how large each part is."""
    from .fingerprints import cache_root

    root = cache_root()
    for part in ("gguf", "kernels", "digests.json"):
        path = root / part
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else (path.stat().st_size if path.is_file() else 0)
        typer.echo(f"{path}  {size / 2**20:.1f} MiB")


@cache_app.command("clear")
@_command
def cache_clear(kernels: Annotated[bool, typer.Option("--kernels", help="Also remove the built kernel libraries.")] = False):
    """Remove the converted GGUF models and file digests (they are rebuilt on demand)."""
    import shutil

    from .fingerprints import cache_root

    root = cache_root()
    for part in ("gguf", "digests.json") + (("kernels",) if kernels else ()):
        path = root / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
    _reporter().info(f"cleared {root}" + ("" if kernels else " (kernel libraries kept; --kernels removes them)"))


def _terminate(signum, frame):
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    sys.exit(main())
