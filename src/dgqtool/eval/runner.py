"""`dgq eval`: load an original model or a packed checkpoint and score it on perplexity tasks."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..errors import DGQError
from ..progress import Reporter
from ..models.load import check_context_length
from .windows import PPL_TASKS, ppl_windows
from .ppl import perplexity


def checkpoint_kind(spec: str) -> str | None:
    """'dgq' or 'compressed-tensors' for a quantized checkpoint directory, None otherwise."""
    config = Path(spec) / "config.json"
    if not config.is_file():
        return None
    text = config.read_text()
    return next((kind for kind in ("dgq", "compressed-tensors") if f'"quant_method": "{kind}"' in text), None)


def load_for_eval(spec: str, device: str, dtype: str):
    """Quantized checkpoints run through their W4A8 modules; anything else loads as a float model."""
    kind = checkpoint_kind(spec)
    if kind is not None:
        from ..checkpoint import fuse_for_inference, load_checkpoint, load_compressed_tensors

        loader = load_checkpoint if kind == "dgq" else load_compressed_tensors
        model, tokenizer, _ = loader(spec, device)
        return fuse_for_inference(model), tokenizer, f"{kind} checkpoint"
    from ..models.load import load_model

    model, tokenizer, _ = load_model(spec, dtype)
    return model.to(device), tokenizer, f"float ({dtype})"


def check_tasks(tasks: list[str]) -> None:
    from .zeroshot import TASK_NAMES as ZERO_SHOT_TASKS

    unknown = [t for t in tasks if t not in PPL_TASKS and t not in ZERO_SHOT_TASKS]
    if unknown:
        raise DGQError(f"unknown task {unknown[0]}; perplexity tasks: {', '.join(PPL_TASKS)}; "
                       f"zero-shot tasks: {', '.join(ZERO_SHOT_TASKS)}")


def score_model(model, tokenizer, tasks: list[str], *, seqlen: int, limit: int | None, batch_size: int,
                data_dir: str | None, device: str, reporter: Reporter | None = None) -> dict:
    """Scores of an in-memory model: perplexity tasks first, then the zero-shot ones through lm-eval."""
    check_tasks(tasks)
    if any(t in PPL_TASKS for t in tasks):
        check_context_length(model, seqlen)
    scores = {}
    for task in (t for t in tasks if t in PPL_TASKS):
        windows = ppl_windows(task, tokenizer, seqlen, data_dir, limit)
        if reporter is None:
            score = perplexity(model, windows, batch_size, device)
        else:
            with reporter.task(f"{task} ({len(windows)} x {seqlen} tokens)", len(windows)) as step:
                score = perplexity(model, windows, batch_size, device,
                                   on_batch=lambda n: [step.advance() for _ in range(n)])
        scores[task] = {"ppl": score.ppl, "windows": score.windows, "seqlen": score.seqlen}
    zero_shot_tasks = [t for t in tasks if t not in PPL_TASKS]
    if zero_shot_tasks:
        from .zeroshot import zero_shot

        if reporter is not None:
            reporter.info(f"zero-shot through lm-eval: {', '.join(zero_shot_tasks)}")
        scores.update(zero_shot(model, tokenizer, zero_shot_tasks, limit=limit, batch_size=batch_size,
                                data_dir=data_dir))
    return scores


def evaluate(spec: str, tasks: list[str], *, seqlen: int, limit: int | None, batch_size: int, data_dir: str | None,
             device: str, dtype: str, reporter: Reporter) -> dict:
    check_tasks(tasks)  # before the model loads
    model, tokenizer, kind = load_for_eval(spec, device, dtype)
    scores = score_model(model, tokenizer, tasks, seqlen=seqlen, limit=limit, batch_size=batch_size,
                         data_dir=data_dir, device=device, reporter=reporter)
    return {"model": spec, "kind": kind, "protocol": "GPTQ (non-overlapping windows, exp of mean window NLL)",
            "tasks": scores}


def headline(score: dict) -> tuple[str, float]:
    """The number a task is judged by: perplexity, or zero-shot accuracy (acc_norm where reported)."""
    if "ppl" in score:
        return "ppl", score["ppl"]
    return ("acc_norm", score["acc_norm"]) if "acc_norm" in score else ("acc", score["acc"])


def results_table(results: dict) -> Table:
    table = Table(title=f"{results['model']} [{results['kind']}]")
    for column in ("task", "metric", "value", "items"):
        table.add_column(column, justify="right")
    for task, r in results["tasks"].items():
        if "ppl" in r:
            table.add_row(task, "ppl", f"{r['ppl']:.3f}", f"{r['windows']} x {r['seqlen']} tokens")
        else:
            for metric in ("acc", "acc_norm"):
                if metric in r:
                    table.add_row(task, metric, f"{r[metric]:.4f}", str(r["samples"]))
    return table
