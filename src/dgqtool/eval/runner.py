"""`dgq eval`: load an original model or a packed checkpoint and score it on perplexity tasks."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..errors import DGQError
from ..progress import Reporter
from .data import PPL_TASKS, ppl_windows
from .ppl import perplexity


def is_checkpoint(spec: str) -> bool:
    config = Path(spec) / "config.json"
    return config.is_file() and '"quant_method": "dgq"' in config.read_text()


def load_for_eval(spec: str, device: str, dtype: str):
    """A packed DGQ checkpoint runs through its DGQ modules; anything else loads as a float model."""
    if is_checkpoint(spec):
        from ..checkpoint import load_checkpoint

        model, tokenizer, _ = load_checkpoint(spec, device)
        return model, tokenizer, "dgq checkpoint"
    from ..models.load import load_model

    model, tokenizer, _ = load_model(spec, dtype)
    return model.to(device), tokenizer, f"float ({dtype})"


def evaluate(spec: str, tasks: list[str], *, seqlen: int, limit: int | None, batch_size: int, data_dir: str | None,
             device: str, dtype: str, reporter: Reporter) -> dict:
    unknown = [t for t in tasks if t not in PPL_TASKS]
    if unknown:
        raise DGQError(f"unknown task {unknown[0]}; perplexity tasks: {', '.join(PPL_TASKS)}")
    model, tokenizer, kind = load_for_eval(spec, device, dtype)
    results = {"model": spec, "kind": kind, "protocol": "GPTQ (non-overlapping windows, exp of mean window NLL)", "tasks": {}}
    for task in tasks:
        windows = ppl_windows(task, tokenizer, seqlen, data_dir, limit)
        with reporter.task(f"{task} ({len(windows)} x {seqlen} tokens)", len(windows)) as step:
            score = perplexity(model, windows, batch_size, device, on_batch=lambda n: [step.advance() for _ in range(n)])
        results["tasks"][task] = {"ppl": score.ppl, "windows": score.windows, "seqlen": score.seqlen}
    return results


def results_table(results: dict) -> Table:
    table = Table(title=f"{results['model']} [{results['kind']}]")
    for column in ("task", "ppl", "windows", "seqlen"):
        table.add_column(column, justify="right")
    for task, r in results["tasks"].items():
        table.add_row(task, f"{r['ppl']:.3f}", str(r["windows"]), str(r["seqlen"]))
    return table


