"""Text corpora by name or path, from a local data directory or from `datasets`.

Local layout (DGQ_DATA_DIR or --data-dir), as in the shared assets:
    wikitext2/wiki.train.raw, wikitext2/wiki.test.raw, ptb/ptb.train.txt, ptb/ptb.valid.txt,
    ptb/ptb.test.txt, c4/c4-validation.json(l).
No network access is attempted when a data directory holds the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import DGQError

# name -> split -> (relative local paths tried in order, how the split is joined, hub dataset args)
CORPORA: dict[str, dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]]] = {
    "wikitext2": {
        "train": (("wikitext2/wiki.train.raw",), "\n\n", ("wikitext", "wikitext-2-raw-v1")),
        "test": (("wikitext2/wiki.test.raw",), "\n\n", ("wikitext", "wikitext-2-raw-v1")),
    },
    "ptb": {
        # The Mikolov distribution's train split is not in the shared assets; its valid split is the
        # calibration fallback, never the test split that `dgq eval` scores.
        "train": (("ptb/ptb.train.txt", "ptb/ptb.valid.txt"), " ", ("ptb_text_only", "penn_treebank")),
        "test": (("ptb/ptb.test.txt",), " ", ("ptb_text_only", "penn_treebank")),
    },
}

MAX_TEXT_BYTES = 2 << 30


def data_dir(explicit: str | None = None) -> Path | None:
    value = explicit or os.environ.get("DGQ_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DGQError(f"data directory not found: {path}")
    return path


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def read_text_file(path: Path) -> str:
    """A .txt/.raw file as is; .json/.jsonl rows' "text" fields joined with blank lines."""
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise DGQError(f"{path} is larger than {MAX_TEXT_BYTES >> 30} GiB; pass a smaller calibration file")
    raw = path.read_bytes()  # bytes, so newlines stay exactly as in the file
    # UTF-8 is expected; a byte-order mark is honoured (UTF-8-BOM, UTF-16 as Windows tools write it)
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\x00" in raw[:65536]:
        raise DGQError(f"{path} looks binary, not text")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise DGQError(f"{path} is not UTF-8 text (nor UTF-16 with a byte-order mark)") from None
    if path.suffix in (".json", ".jsonl"):
        text = "\n\n".join(_json_texts(path, text))
    if not text.strip():
        raise DGQError(f"{path} holds no text")
    return text


def _json_texts(path: Path, text: str) -> list[str]:
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as exc:
        raise DGQError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(rows, dict):
        rows = rows.get("data", rows.get("rows", [rows]))
    texts = [row["text"] for row in rows if isinstance(row, dict) and isinstance(row.get("text"), str)]
    if not texts:
        raise DGQError(f"{path}: no rows with a \"text\" field")
    return texts


def load_corpus(spec: str, split: str, local_dir: str | None = None) -> str:
    """A named corpus split (local first, then `datasets`), a local file, or a `datasets` path/name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return read_text_file(path)
    if spec in CORPORA:
        if split not in CORPORA[spec]:
            raise DGQError(f"corpus '{spec}' has no split '{split}'")
        candidates, joiner, hub = CORPORA[spec][split]
        root = data_dir(local_dir)
        if root is not None:
            for rel in candidates:
                if (root / rel).is_file():
                    return _join_lines(read_text_file(root / rel), joiner)
            raise DGQError(f"'{spec}' {split} data not found: expected {root / candidates[0]}")
        return _from_hub(hub, split, joiner)
    if path.suffix or spec.startswith((".", "/", "~")):
        raise DGQError(f"calibration/eval data file not found: {spec}")
    return _from_hub((spec,), split, "\n\n")


def _join_lines(text: str, joiner: str) -> str:
    """Rebuild the rows of the `datasets` version from a raw file and join them like GPTQ does.

    WikiText rows are the raw lines with their newline, blank lines becoming empty rows (joined with
    "\n\n" this reproduces the hub string byte for byte); PTB rows are sentences, joined with " ".
    """
    if joiner == " ":
        return joiner.join(text.splitlines())
    return joiner.join(line if line.strip() else "" for line in text.splitlines(keepends=True))


def _from_hub(args: tuple[str, ...], split: str, joiner: str) -> str:
    try:
        import datasets

        rows = datasets.load_dataset(*args, split=split)
    except Exception as exc:  # datasets raises many types for offline / missing data
        raise DGQError(
            f"cannot load dataset {'/'.join(args)} ({type(exc).__name__}); offline machines need a local "
            "file (--calib-data FILE) or a data directory (--data-dir / DGQ_DATA_DIR)"
        ) from None
    column = "sentence" if "sentence" in rows.column_names else "text"
    return joiner.join(rows[column])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence (1-D long tensor), tokenized once as in the eval protocol."""
    return torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
