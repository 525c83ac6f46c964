"""Content fingerprints of a stage's inputs (model files, calibration text), so a file changed in
place under the same path is never mistaken for the one a stage already used.

Hashing a multi-GB model on every rerun would cost tens of seconds, so a file's sha256 is cached
under its (size, mtime, inode) and recomputed whenever any of the three differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .artifacts import sha256_file, write_json
from .errors import DGQError


def cache_root() -> Path:
    """dgq's own cache (converted GGUF models, file digests): $DGQ_CACHE or ~/.cache/dgqtool."""
    return Path(os.environ.get("DGQ_CACHE", Path.home() / ".cache" / "dgqtool"))


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, reusing the cached value while size, mtime and inode are unchanged."""
    path = path.resolve()
    store = cache_root() / "digests.json"
    try:
        cached = json.loads(store.read_text())
    except (OSError, ValueError):
        cached = {}
    key = _stat_key(path)
    entry = cached.get(str(path))
    if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    cached[str(path)] = {"stat": key, "sha256": digest}
    try:
        write_json(store, cached)
    except DGQError:  # a read-only cache only costs rehashing next time
        pass
    return digest


def files_digest(paths: list[Path]) -> str:
    """One digest over several files' names and contents (a model directory)."""
    joined = hashlib.sha256()
    for path in sorted(paths):
        joined.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return joined.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
