"""The `dgq` app: one-line errors, output modes (--json, --no-progress), the command wrapper, and the
CLI options generated from the recipe's fields (type, choices, default and help in one place)."""

import functools
import inspect
import json
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

from .. import __version__
from ..errors import DGQError
from ..progress import Reporter
from ..recipe import default_text, flag, load_config, options_for, value_type


class _OneLineErrors(TyperGroup):
    """Usage errors (unknown option, a value outside its choices) as one `error:` line, exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            emit_error(exc.format_message(), 2)
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


def reporter() -> Reporter:
    return Reporter(bars=None if _Output.progress else False)


def emit(summary: dict) -> None:
    if _Output.json:
        typer.echo(json.dumps({"status": "ok", "exit_code": 0, **summary}, default=str))


def emit_error(message: str, code: int) -> None:
    if _Output.json:
        typer.echo(json.dumps({"status": "error", "exit_code": code, "error": message}))


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so temporary files are removed as on Ctrl-C."""


def _fail(message: str, code: int) -> None:
    from ..artifacts import remove_unused_work_dirs

    remove_unused_work_dirs()
    typer.echo(message, err=True)
    emit_error(message.removeprefix("error: "), code)
    raise typer.Exit(code) from None


def command(fn):
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


def stage_context(work: Path, config: str | None, force: bool, values: dict[str, Any], calibrates: bool = False):
    from ..artifacts import lock_work_dir
    from ..stages.graph import Context, pick_device

    recipe = load_config(config, values.get("recipe")).with_overrides(**values)
    recipe.validate()
    device = pick_device(recipe.device)
    recipe, notes = recipe.resolved(device)
    log = reporter()
    lock_work_dir(work)
    for note in notes if calibrates else ():
        log.info(note)
    return Context(work=work, recipe=recipe, device=device, reporter=log, force=force)


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise DGQError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")


def checkpoint_or_default(checkpoint: Path | None) -> Path:
    """No checkpoint argument: the one `dgq quantize` writes by default, said on screen."""
    if checkpoint is not None:
        return checkpoint
    if not DEFAULT_OUTPUT.is_dir():
        raise DGQError(f"no checkpoint given and ./{DEFAULT_OUTPUT} (what `dgq quantize` writes by default) does not exist; "
                       "pass the checkpoint directory")
    reporter().info(f"using ./{DEFAULT_OUTPUT}, the checkpoint `dgq quantize` writes by default")
    return DEFAULT_OUTPUT


def _terminate(signum, frame):
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()

