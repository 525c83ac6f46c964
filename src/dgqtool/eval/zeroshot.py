"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model (float or W4A8).

The task definitions (prompt, choices, metrics) are lm-eval's own YAML files. With a local data
directory (layout of ../shared/assets/data) each task's dataset is pointed at a JSON-lines copy of
the local files, rewritten into the columns of the hub version the YAML expects; no network is
touched. Without one, lm-eval loads the hub datasets as usual.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from ..data import data_dir as resolve_data_dir
from ..errors import DGQError

# task -> (lm-eval YAML relative to lm_eval/tasks, local file(s), converter to the hub columns)
Converter = Callable[[list[dict], list[str]], list[dict]]


def _piqa(rows: list[dict], labels: list[str]) -> list[dict]:
    return [{**r, "label": int(label)} for r, label in zip(rows, labels, strict=True)]


def _arc(rows: list[dict], _labels: list[str]) -> list[dict]:
    return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]


def _boolq(rows: list[dict], _labels: list[str]) -> list[dict]:
    # "label" or "answer", as a bool or the string "true" / "false" depending on the release
    def truth(value) -> int:
        return int(value.lower() == "true") if isinstance(value, str) else int(bool(value))

    return [{"question": r["question"], "passage": r["passage"], "label": truth(r.get("label", r.get("answer")))}
            for r in rows]


def _winogrande(rows: list[dict], labels: list[str]) -> list[dict]:
    return [{**r, "answer": r.get("answer") or label} for r, label in zip(rows, labels or [None] * len(rows), strict=True)]


def _hellaswag(rows: list[dict], _labels: list[str]) -> list[dict]:
    # the release's hellaswag_val.jsonl has the hub columns already; the hub stores label as a string
    return [{"activity_label": r["activity_label"], "ctx_a": r["ctx_a"], "ctx_b": r["ctx_b"], "endings": r["endings"],
             "label": str(r["label"])} for r in rows]


TASKS: dict[str, tuple[str, str, str | None, Converter]] = {
    "piqa": ("piqa/piqa.yaml", "piqa/valid.jsonl", "piqa/valid-labels.lst", _piqa),
    "arc_easy": ("arc/arc_easy.yaml", "arc/ARC-Easy-Test.jsonl", None, _arc),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc/ARC-Challenge-Test.jsonl", None, _arc),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/val.jsonl", None, _boolq),
    "winogrande": ("winogrande/default.yaml", "winogrande/dev.jsonl", "winogrande/dev-labels.lst", _winogrande),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/hellaswag_val.jsonl", None, _hellaswag),
}


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DGQError(f"{path} is not JSON lines: {exc}") from None


def task_config(task: str, local: Path | None, scratch: Path) -> dict | str:
    """lm-eval's config for `task`, pointed at a converted copy of the local files when given."""
    if local is None:
        return task
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_file, rows_file, labels_file, convert = TASKS[task]
    rows_path = local / rows_file
    if not rows_path.is_file():
        raise DGQError(f"{task} data not found: expected {rows_path}")
    labels = (local / labels_file).read_text().split() if labels_file and (local / labels_file).is_file() else []
    try:
        rows = convert(_read_jsonl(rows_path), labels)
    except (KeyError, TypeError, ValueError) as exc:
        raise DGQError(f"{rows_path}: unexpected row format ({exc})") from None
    converted = scratch / f"{task}.jsonl"
    converted.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / yaml_file)
    # the local file is the split lm-eval scores (ARC's test, the others' validation), served as "test"
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": str(converted)}},
                  test_split="test", validation_split=None, training_split=None, fewshot_split=None)
    config.pop("tag", None)
    return config


def zero_shot(model, tokenizer, tasks: list[str], *, limit: int | None, batch_size: int, data_dir: str | None) -> dict:
    """{task: {"acc": ..., "acc_norm": ... (when lm-eval reports it), "samples": n}}."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DGQError(f"unknown zero-shot task {unknown[0]}; tasks: {', '.join(TASKS)}")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise DGQError("zero-shot tasks need lm-evaluation-harness: pip install lm-eval") from None
    local = resolve_data_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="dgq-zeroshot-") as scratch:
        configs = [task_config(t, local, Path(scratch)) for t in tasks]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=configs, limit=limit, num_fewshot=0, log_samples=False)
    results = {}
    for task in tasks:
        metrics = out["results"][task]
        results[task] = {name: metrics[f"{name},none"] for name in ("acc", "acc_norm") if f"{name},none" in metrics}
        results[task]["samples"] = int(out["n-samples"][task]["effective"])
    return results
