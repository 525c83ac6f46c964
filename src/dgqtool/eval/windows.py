"""Evaluation token streams: WikiText-2 and PTB test splits (local or `datasets`) and C4 windows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..corpora import data_dir, load_corpus, tokenize
from ..errors import DGQError

PPL_TASKS = ("wikitext2", "ptb", "c4")
C4_WINDOWS = 256
C4_LOCAL = ("c4/c4-validation.00000-of-00008.json", "c4/c4-validation.json", "c4/c4-validation.jsonl")


def ppl_windows(task: str, tokenizer, seqlen: int, local_dir: str | None, limit: int | None) -> torch.Tensor:
    """(n, seqlen) evaluation windows for a perplexity task."""
    from .ppl import windows_of

    if task == "c4":
        return c4_windows(_c4_documents(local_dir), tokenizer, seqlen, limit or C4_WINDOWS)
    return windows_of(tokenize(tokenizer, load_corpus(task, "test", local_dir)), seqlen, limit)


def c4_windows(documents: list[str], tokenizer, seqlen: int, count: int) -> torch.Tensor:
    """GPTQ's C4 protocol: Python `random` seeded 0 draws a document (redrawing those shorter than
    a window) and then a window start inside it."""
    rng = random.Random(0)
    if not any(len(d) >= seqlen for d in documents):  # characters >= tokens for any tokenizer
        raise DGQError(f"no C4 document is long enough for a {seqlen}-token window")
    out = []
    while len(out) < count:
        ids = tokenize(tokenizer, documents[rng.randint(0, len(documents) - 1)])
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[start : start + seqlen])
    return torch.stack(out)


def _c4_documents(local_dir: str | None) -> list[str]:
    root = data_dir(local_dir)
    if root is not None:
        for rel in C4_LOCAL:
            path = root / rel
            if path.is_file():
                return _json_lines(path)
        raise DGQError(f"C4 validation data not found: expected {root / C4_LOCAL[0]} (JSON lines with a 'text' field)")
    try:
        import datasets

        rows = datasets.load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
    except Exception as exc:
        raise DGQError(f"cannot load C4 ({type(exc).__name__}); offline machines need --data-dir with {C4_LOCAL[0]}") from None
    return list(rows["text"])


def _json_lines(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DGQError(f"{path}:{number}: not a JSON object with a 'text' field") from None
    return docs
