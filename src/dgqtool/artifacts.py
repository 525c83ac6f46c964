"""Artifacts on disk: safetensors tensors and JSON manifests, written atomically, hashed, validated.

Every write goes to a temporary file in the same directory and is renamed into place, so a killed
run never leaves a half-written artifact under its final name. Only safetensors and JSON are ever
read: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
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


def process_umask() -> int:
    """The umask, read without setting it (os.umask can only be read by changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fresh_name(parent: Path, name: str) -> Path:
    return parent / f".{name}.{secrets.token_hex(4)}.tmp"


def make_temp_dir(beside: Path) -> Path:
    """A new directory next to `beside`; created with mode 0777 so the umask alone decides its
    permissions (mkdtemp's 0700 would make a shared checkpoint unreadable to others)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _fresh_name(beside.parent, beside.name)
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # O_EXCL with mode 0666: the umask decides permissions, as for any ordinary output
        tmp = _fresh_name(path.parent, path.name)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # writers that recreate the file (safetensors) get 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_held_locks: dict[Path, int] = {}
_created_work_dirs: list[tuple[Path, Path]] = []  # (work directory, topmost directory created for it)


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
        top = work
        while not top.parent.exists():
            top = top.parent
        if not work.exists():
            _created_work_dirs.append((work, top))
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
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


def remove_unused_work_dirs() -> None:
    """After a failed run: a work directory this process created and left holding only its lock
    file goes again, so a failure leaves nothing behind that it created."""
    for work, top in _created_work_dirs:
        try:
            if [p.name for p in work.iterdir()] != [".lock"]:
                continue
            (work / ".lock").unlink()
            work.rmdir()
            while work != top:  # parents created for it, now empty
                work = work.parent
                work.rmdir()
        except OSError:
            pass


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


# ----------------------------------------------------------------------------- output safety
# dgq deletes or replaces only directories it wrote itself: ones holding its manifest and nothing
# that the manifest does not list.


def written_by_dgq(directory: Path, manifest_name: str) -> bool:
    try:
        manifest = read_json(directory / manifest_name)
    except DGQError:
        return False
    listed = manifest.get("files")
    if "tool_version" not in manifest or not isinstance(listed, dict):
        return False
    return all(entry.is_file() and not entry.is_symlink() and (entry.name in listed or entry.name == manifest_name)
               for entry in directory.iterdir())


def claim_output_dir(out: Path, manifest_name: str, *, replace: bool, protected: dict[str, Path], option: str = "-o") -> None:
    """Refuse, before any work starts, an output directory dgq may not write or replace.

    replace: the caller may replace a dgq-written directory (--force, or it is this run's own).
    protected: paths the output must not be, nor contain ({"the model directory": path, ...})."""
    target = out.resolve()
    for label, path in protected.items():
        path = path.resolve()
        if target == path or target in path.parents:
            raise DGQError(f"{option} {out} is {label}" + ("" if target == path else f" or a parent of it ({path})")
                           + "; pass another output path")
    if target.exists() and not target.is_dir():
        raise DGQError(f"{option} {out} is an existing file; pass a directory path")
    if target.is_dir() and any(target.iterdir()):
        if not written_by_dgq(target, manifest_name):
            example = sorted(p.name for p in target.iterdir())[0]
            raise DGQError(f"{option} {out} is a non-empty directory that dgq did not write (holds '{example}'); "
                           "pass a new or empty directory")
        if not replace:
            raise DGQError(f"{option} {out} holds an earlier dgq output; pass --force to replace it, or another path")
    _check_writable(target, option)


def _check_writable(target: Path, option: str) -> None:
    """Try to create a file where the output will go, so a read-only place fails now, not after the search."""
    parent = target if target.is_dir() else target.parent
    while not parent.exists():
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".dgq-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DGQError(f"{option} {target}: cannot write in {parent} ({exc.strerror or exc})") from None
