"""A built wheel carries the kernel sources, generator and tuned table, and runs from a fresh venv
outside the checkout (its dependencies borrowed from the running environment, so it stays offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "kernels").iterdir() if p.suffix in {".cu", ".cuh", ".cpp", ".json", ".py"})
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "out", "work")


def _run(*args, **kwargs):
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the tree (as pip install git+... would) and install it into a new venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=SKIP)
    _run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "shared-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, transformers, ...
    wheel = next((tmp / "dist").glob("dgqtool-*.whl"))
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed", "-q", wheel)
    return wheel


def test_wheel_carries_the_kernel_sources(installed):
    names = set(zipfile.ZipFile(installed).namelist())
    assert {f"dgqtool/kernel_sources/{name}" for name in KERNEL_FILES} <= names
    assert "dgqtool/kernel_sources/dgq_w4a8.cu" in names and "dgqtool/format.py" in names


def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    venv = installed.parents[1] / "venv"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    assert "quantize" in _run(venv / "bin" / "dgq", "--help", cwd=tmp_path, env=env)
    code = ("import json, dgqtool; from dgqtool.kernels import build, runtime; "
            "print(json.dumps([dgqtool.__file__, str(build.source_dir()), len(runtime._tuned_table()[0])]))")
    package, sources, tuned = json.loads(_run(venv / "bin" / "python", "-c", code, cwd=tmp_path, env=env))
    assert Path(package).is_relative_to(venv) and Path(sources).is_relative_to(venv)
    assert sorted(p.name for p in Path(sources).iterdir() if p.suffix != ".pyc" and p.is_file()) == KERNEL_FILES
    assert tuned == len(json.loads((REPO / "kernels" / "tuned_sm90.json").read_text()).get("choice", {}))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc and nvidia-cutlass")
def test_installed_package_builds_the_sm90a_kernels_and_the_torch_extension(installed, tmp_path):
    """From the installed package's own sources: the generator emits the sm_90a units and the library
    links (into a fresh cache whose object store is the checkout's: an object's key is its source,
    headers, flags and nvcc, not its path, so only units the checkout's build lacks compile here),
    and the C++ torch extension builds against the running torch."""
    pytest.importorskip("cutlass_library")
    from dgqtool.kernels import build

    venv = installed.parents[1] / "venv"
    (tmp_path / "cache").mkdir()
    objects = build.cache_root() / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "objects").symlink_to(objects)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin:/usr/local/cuda/bin", "HOME": str(tmp_path),
           "DGQ_KERNEL_CACHE": str(tmp_path / "cache")}
    code = ("from dgqtool.kernels import build; "
            "print(build.build('sm_90a', log=lambda _m: None)); print(build.build_torch_ops(log=lambda _m: None))")
    library, extension = map(Path, _run(venv / "bin" / "python", "-c", code, cwd=tmp_path, env=env).split())
    assert library.is_file() and library.is_relative_to(tmp_path) and extension.is_file()
    symbols = subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True).stdout
    assert "dgq_wgmma_w128x128_s6_c1_bf16" in symbols and "dgq_gemv_f16" in symbols
