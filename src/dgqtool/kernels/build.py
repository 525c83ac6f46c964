"""Build the kernel library: emit the CUTLASS GEMM variants, compile every translation unit with
nvcc (in parallel), link one shared library. Needs nvcc and the `nvidia-cutlass` package, not a GPU,
so it also runs as a compile check on CPU-only CI (`python -m dgqtool.kernels.build --arch sm_90a`).

The result is cached under ~/.cache/dgqtool/kernels/<arch>-<hash>/ (or $DGQ_KERNEL_CACHE), the hash
covering the sources, the arch, nvcc's and CUTLASS's versions; a build goes to a temporary directory
and is renamed into place, so concurrent or interrupted builds never leave a half-written library.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DGQError

LIBRARY_NAME = "libdgq_kernels.so"
HAND_WRITTEN = "dgq_w4a8.cu"
TORCH_OPS = "dgq_torch_ops.cpp"  # dgq::linear's CUDA kernel in C++, built against the running torch


def source_dir() -> Path:
    """The package's kernel_sources (the repository's kernels/ folder: a symlink in a checkout,
    package data in a wheel), or $DGQ_KERNELS_SRC."""
    env = os.environ.get("DGQ_KERNELS_SRC")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "kernel_sources"
    if not (path / HAND_WRITTEN).is_file():
        raise DGQError(f"kernel sources not found in {path}; set DGQ_KERNELS_SRC to the kernels/ directory")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("DGQ_KERNEL_CACHE", Path.home() / ".cache" / "dgqtool" / "kernels"))


def _cutlass_source() -> Path:
    try:
        import cutlass_library
    except ImportError as exc:
        raise DGQError("the sm90 GEMMs need the CUTLASS emitter: pip install nvidia-cutlass --no-deps") from exc
    return Path(cutlass_library.__file__).parent / "source"


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        raise DGQError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    return str(nvcc)


def uses_cutlass(arch: str) -> bool:
    """sm_80 and newer get emitted CUTLASS GEMMs (2.x multistage on Ampere/Ada, 3.x TMA on Hopper)."""
    digits = "".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit())
    return digits.isdigit() and int(digits) >= 80


def _fingerprint(arch: str, src: Path, nvcc: str) -> str:
    digest = hashlib.sha256(arch.encode())
    for path in sorted(src.iterdir()):
        if path.suffix in {".cu", ".cuh", ".py"}:
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    if uses_cutlass(arch):
        digest.update(importlib.metadata.version("nvidia-cutlass").encode())
    return digest.hexdigest()[:16]


def _unit_key(unit: Path, dirs: list[Path], flags: list[str], version: str) -> str:
    """Hash of a translation unit, the local headers it includes (transitively), flags and nvcc."""
    digest = hashlib.sha256(version.encode() + " ".join(f for f in flags if not f.startswith("-I")).encode())
    seen, todo = set(), [unit]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        text = path.read_bytes()
        digest.update(path.name.encode() + text)
        for name in re.findall(rb'#include "([^"]+)"', text):
            for folder in dirs:
                if (folder / name.decode()).is_file():
                    todo.append(folder / name.decode())
                    break
    if any("cutlass" in f for f in flags):
        digest.update(importlib.metadata.version("nvidia-cutlass").encode())
    return digest.hexdigest()[:16]


def library_path(arch: str) -> Path:
    nvcc = _nvcc()
    return cache_root() / f"{arch}-{_fingerprint(arch, source_dir(), nvcc)}" / LIBRARY_NAME


def _generate(src: Path, out: Path, arch: str) -> list[dict]:
    spec = importlib.util.spec_from_file_location("dgq_kernel_generate", src / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.generate(out, arch)


def build(arch: str, jobs: int | None = None, log=print) -> Path:
    """Return the cached library for `arch`, building it first when absent."""
    nvcc, src = _nvcc(), source_dir()
    target = cache_root() / f"{arch}-{_fingerprint(arch, src, nvcc)}"
    if (target / LIBRARY_NAME).is_file():
        return target / LIBRARY_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=target.parent))
    try:
        units = [src / HAND_WRITTEN]
        includes = [f"-I{src}"]
        if uses_cutlass(arch):
            _generate(src, work, arch)
            units += sorted(work.glob("gemm_*.cu")) + sorted(work.glob("wgmma_*.cu"))  # wgmma: sm90 only
            cutlass = _cutlass_source()
            includes += [f"-I{work}", f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools' / 'util' / 'include'}"]
        flags = ["-std=c++17", "-O3", f"-arch={arch}", "--expt-relaxed-constexpr", "-DNDEBUG",
                 f"-DDGQ_PDL={int(arch.startswith('sm_90'))}", "-Xcompiler", "-fPIC", *includes]

        objects_dir = cache_root() / "objects"
        objects_dir.mkdir(parents=True, exist_ok=True)
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout

        def compile_unit(unit: Path) -> Path:
            obj = work / (unit.stem + ".o")
            # an object is reused while its source, the headers it includes, the flags and nvcc match
            # (editing one kernel recompiles that unit, not the CUTLASS GEMMs)
            key = _unit_key(unit, [src, work], flags, version)
            cached = objects_dir / f"{unit.stem}-{key}.o"
            if cached.is_file():
                shutil.copyfile(cached, obj)
                return obj
            done = subprocess.run([nvcc, *flags, "-c", str(unit), "-o", str(obj)], capture_output=True, text=True)
            if done.returncode:
                raise DGQError(f"nvcc failed on {unit.name} for {arch}:\n{done.stderr[-4000:]}")
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(obj, partial)
            partial.replace(cached)
            log(f"compiled {unit.name} ({arch})")
            return obj

        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_unit, units))
        linked = subprocess.run([nvcc, "-shared", f"-arch={arch}", *map(str, objects), "-o", str(work / LIBRARY_NAME)],
                                capture_output=True, text=True)
        if linked.returncode:
            raise DGQError(f"linking the kernel library failed:\n{linked.stderr[-4000:]}")
        for obj in objects:
            obj.unlink()
        try:
            work.rename(target)
        except OSError:  # another build finished first; its library is identical
            pass
        return target / LIBRARY_NAME
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_torch_ops(log=print) -> Path:
    """The cached torch extension of kernels/dgq_torch_ops.cpp for the running torch, built with the
    host C++ compiler ($CXX or g++) when absent. It holds no CUDA code (the kernels stay in the
    library above), so it builds wherever torch's headers are, CPU-only machines included."""
    import torch

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise DGQError("no C++ compiler for the torch extension (set CXX)")
    source = source_dir() / TORCH_OPS
    root = Path(torch.__file__).resolve().parent
    flags = ["-O2", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{root / 'include'}", f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, errors="replace").stdout
    digest = hashlib.sha256(source.read_bytes() + torch.__version__.encode() + str(root).encode()
                            + version.encode() + " ".join(flags).encode())
    target = cache_root() / f"torch-ops-{digest.hexdigest()[:16]}" / "libdgq_torch_ops.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        done = subprocess.run([compiler, *flags, str(source), "-lc10", "-ltorch_cpu", "-o", str(partial)],
                              capture_output=True, text=True, errors="replace", timeout=900)
        if done.returncode:
            raise DGQError(f"building the torch extension failed:\n{done.stderr[-4000:]}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    log(f"compiled {TORCH_OPS}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="nvcc arch, e.g. sm_90a (Hopper) or sm_80 (Ampere)")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        print(build(args.arch, args.jobs))
    except DGQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
