"""Artifacts on disk: safetensors tensors and JSON manifests, written atomically, hashed, validated.

Every write goes to a temporary file in the same directory and is renamed into place, so a killed
run never leaves a half-written artifact under its final name. Only safetensors and JSON are ever
read: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import DGQError

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts are shared like any output
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_held_locks: dict[Path, int] = {}


def lock_work_dir(work: Path) -> None:
    """Hold an exclusive lock on `work` for the rest of this process, or fail with a clear message.

    flock is released by the kernel when the process ends, however it ends, so a killed run never
    leaves the directory locked; the file's content only names the holder for the message.
    """
    import fcntl

    work = work.resolve()
    if work in _held_locks:
        return
    try:
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as exc:
        raise DGQError(f"cannot use work directory {work}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DGQError(f"work directory {work} is in use by another dgq run ({holder}); wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    _held_locks[work] = fd


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically save contiguous CPU tensors; returns the file's sha256."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        with atomic_path(path) as tmp:
            save_file(clean, str(tmp), metadata=metadata)
    except OSError as exc:
        raise DGQError(f"cannot write {path}: {exc.strerror or exc}") from None
    return sha256_file(path)


def read_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DGQError(f"missing artifact {path}")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise DGQError(f"{path} does not match the hash in its manifest (modified or truncated)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DGQError(f"{path} is not a valid safetensors file: {exc}") from None


def write_json(path: Path, data: Any) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise DGQError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DGQError(f"missing {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DGQError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DGQError(f"{path} does not hold a JSON object")
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(data: Any) -> str:
    """A stable hash of JSON-able options and input hashes: what decides whether a stage reruns."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(stage_dir: Path, stage: str, options: dict, inputs: dict[str, str], outputs: dict[str, str], **extra) -> dict:
    manifest = {
        "stage": stage,
        "tool_version": __version__,
        "options": options,
        "inputs": inputs,
        "outputs": outputs,
        "fingerprint": fingerprint({"options": options, "inputs": inputs}),
        **extra,
    }
    write_json(stage_dir / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir: Path, stage: str) -> dict:
    """A finished stage's manifest; its output files must exist with the recorded hashes."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        raise DGQError(f"stage '{stage}' has not run in {stage_dir.parent} (no {path.name}); run `dgq {stage}` first")
    manifest = read_json(path)
    if manifest.get("stage") != stage or not isinstance(manifest.get("outputs"), dict):
        raise DGQError(f"{path} is not a '{stage}' manifest")
    for name, digest in manifest["outputs"].items():
        target = _inside(stage_dir, name)
        if not target.is_file() or sha256_file(target) != digest:
            raise DGQError(f"artifact {target} is missing or does not match its manifest; rerun with --force")
    return manifest


def is_finished(stage_dir: Path, stage: str, options: dict, inputs: dict[str, str]) -> bool:
    """True when the stage already ran with these options on these inputs and its outputs are intact."""
    try:
        manifest = read_manifest(stage_dir, stage)
    except DGQError:
        return False
    return manifest["fingerprint"] == fingerprint({"options": options, "inputs": inputs})


def _inside(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if root.resolve() not in target.parents:
        raise DGQError(f"manifest in {root} names a path outside it: {name}")
    return target
