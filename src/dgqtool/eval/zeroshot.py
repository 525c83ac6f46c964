"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model (float or W4A8).

The task definitions (prompt, choices, metrics) are lm-eval's own YAML files. With a local data
directory (layout in docs/results.md, Zero-shot accuracy) each task's dataset is pointed at a JSON-lines copy of
the local files, rewritten into the columns of the hub version the YAML expects; no network is
touched. Without one, lm-eval loads the hub datasets as usual.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Callable

from ..corpora import data_dir as resolve_data_dir
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
# MMLU comes as one file per subject and scores as the item-weighted mean of 57 lm-eval tasks
MMLU_DIR = "mmlu/test"
TASK_NAMES = (*TASKS, "mmlu")


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DGQError(f"{path} is not JSON lines: {exc}") from None


def _tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _pointed_at(yaml_file: Path, rows: list[dict], converted: Path) -> dict:
    """lm-eval's config from yaml_file, its dataset replaced by rows written to `converted`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    converted.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = load_yaml(yaml_file)
    # the local file is the split lm-eval scores (ARC's and MMLU's test, the others' validation), served as "test"
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": str(converted)}},
                  test_split="test", validation_split=None, training_split=None, fewshot_split=None)
    config.pop("tag", None)
    return config


def _mmlu_configs(local: Path, scratch: Path) -> list[dict]:
    """One config per subject file of the original release (data/test/<subject>_test.csv: question,
    four choices, answer letter; no header) found under local/mmlu/test."""
    files = sorted((local / MMLU_DIR).glob("*_test.csv"))
    if not files:
        raise DGQError(f"mmlu data not found: expected {local / MMLU_DIR}/<subject>_test.csv")
    configs = []
    for path in files:
        subject = path.name.removesuffix("_test.csv")
        yaml_file = _tasks_dir() / "mmlu" / "default" / f"mmlu_{subject}.yaml"
        if not yaml_file.is_file():
            raise DGQError(f"{path}: '{subject}' is not an MMLU subject")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                        for r in csv.reader(f)]
        except (IndexError, ValueError, UnicodeDecodeError) as exc:
            raise DGQError(f"{path}: unexpected row format ({exc})") from None
        configs.append(_pointed_at(yaml_file, rows, scratch / f"mmlu_{subject}.jsonl"))
    return configs


def task_configs(task: str, local: Path | None, scratch: Path) -> list[dict | str]:
    """lm-eval's config(s) for `task`, pointed at converted copies of the local files when given."""
    if local is None:
        return [task]
    if task == "mmlu":
        return _mmlu_configs(local, scratch)
    yaml_file, rows_file, labels_file, convert = TASKS[task]
    rows_path = local / rows_file
    if not rows_path.is_file():
        raise DGQError(f"{task} data not found: expected {rows_path}")
    labels = (local / labels_file).read_text().split() if labels_file and (local / labels_file).is_file() else []
    try:
        rows = convert(_read_jsonl(rows_path), labels)
    except (KeyError, TypeError, ValueError) as exc:
        raise DGQError(f"{rows_path}: unexpected row format ({exc})") from None
    return [_pointed_at(_tasks_dir() / yaml_file, rows, scratch / f"{task}.jsonl")]


def _mmlu_score(out: dict) -> dict:
    """MMLU accuracy over all subjects weighted by their item counts, as lm-eval's group does."""
    counts = {t: int(n["effective"]) for t, n in out["n-samples"].items() if t.startswith("mmlu_")}
    total = sum(counts.values())
    return {"acc": sum(out["results"][t]["acc,none"] * n for t, n in counts.items()) / total, "samples": total}


def zero_shot(model, tokenizer, tasks: list[str], *, limit: int | None, batch_size: int, data_dir: str | None) -> dict:
    """{task: {"acc": ..., "acc_norm": ... (when lm-eval reports it), their "..._stderr", "samples": n}}."""
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise DGQError(f"unknown zero-shot task {unknown[0]}; tasks: {', '.join(TASK_NAMES)}")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise DGQError("zero-shot tasks need lm-evaluation-harness: pip install lm-eval") from None
    local = resolve_data_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="dgq-zeroshot-") as scratch:
        configs = [c for t in tasks for c in task_configs(t, local, Path(scratch))]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=configs, limit=limit, num_fewshot=0, log_samples=False)
    results = {}
    for task in tasks:
        if task == "mmlu":
            results[task] = _mmlu_score(out)
            continue
        metrics = out["results"][task]
        results[task] = {name: metrics[f"{name},none"] for name in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
                         if f"{name},none" in metrics}
        results[task]["samples"] = int(out["n-samples"][task]["effective"])
    return results
