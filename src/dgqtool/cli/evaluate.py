"""The commands that use a checkpoint: `eval` and `run`."""

import math
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ..errors import DGQError
from ..progress import Reporter
from .app import CheckpointArg, _Output, app, check_positive, checkpoint_or_default, command, emit, reporter


Tasks = Annotated[list[str], typer.Option("--task", help="wikitext2 | ptb | c4 | piqa | arc_easy | arc_challenge | boolq | winogrande | hellaswag | mmlu (repeatable).")]


@app.command("eval")
@command
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

    from ..artifacts import atomic_path, write_json
    from ..eval.report import comparison_markdown, comparison_plot
    from ..eval.runner import check_tasks, evaluate, results_table
    from ..stages.graph import pick_device

    spec = model or str(checkpoint_or_default(None))
    check_positive(seqlen=seqlen, limit=limit, batch_size=batch_size)
    check_tasks(task)
    dev = pick_device(device or "auto")
    log = reporter()
    results_out = Reporter(Console(stderr=_Output.json), bars=False)  # results are the command's output: stdout
    runs = []
    for one in [spec, *compare]:
        runs.append(evaluate(one, task, seqlen=seqlen, limit=limit, batch_size=batch_size, data_dir=data_dir, device=dev,
                             dtype=dtype or ("float32" if dev == "cpu" else "float16"), reporter=log))
        results_out.table(results_table(runs[-1]))
    results = runs[0] if not compare else {"runs": runs}
    if compare:
        table = comparison_markdown(runs)
        results_out.info(table)
        if report is not None:
            with atomic_path(report / "compare.md") as tmp:
                tmp.write_text(table)
            if not comparison_plot(runs, report / "compare.png"):
                log.info("matplotlib is not installed: no compare.png")
    if output is not None:
        write_json(output, results)
    emit(results)


@app.command()
@command
def run(
    checkpoint: CheckpointArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "The capital of France is",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")] = 0.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda[:N].  [default: auto]", show_default=False)] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="On CUDA, decode with the torch.compile'd model (CPU: always eager).")] = True,
):
    """Generate from a packed checkpoint (integer DGQ path), streaming text; prints time to first token, decode tokens/s and peak memory."""
    from ..run import run_checkpoint
    from ..stages.graph import pick_device

    checkpoint = checkpoint_or_default(checkpoint)
    check_positive(max_new_tokens=max_new_tokens)
    if not prompt:
        raise DGQError("--prompt is empty; give the text to continue")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DGQError(f"--temperature must be a finite number >= 0; got {temperature}")
    _check_generation_fits(checkpoint, max_new_tokens, chat)
    result = run_checkpoint(checkpoint, prompt, device=pick_device(device or "auto"), max_new_tokens=max_new_tokens,
                            temperature=temperature, chat=chat, compile=compile)
    reporter().info(result.summary())


def _check_generation_fits(checkpoint: Path, max_new_tokens: int, chat: bool) -> None:
    """Requests the model cannot honour fail before it loads: past its context, or a chat without a template."""
    from ..artifacts import read_json
    from ..checkpoint import checkpoint_config

    config = checkpoint_config(checkpoint)
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and max_new_tokens >= context:
        raise DGQError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens")
    if chat:
        tokenizer_config = checkpoint / "tokenizer_config.json"
        has_template = (checkpoint / "chat_template.jinja").is_file() or (
            tokenizer_config.is_file() and "chat_template" in read_json(tokenizer_config))
        if not has_template:
            raise DGQError(f"--chat: the tokenizer of {checkpoint} has no chat template; drop --chat")


