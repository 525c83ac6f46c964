"""Hostile and careless input, as a new user or an attacker would give it: dgq never deletes what it
did not write, never runs code or unpickles from a model directory unless asked, never reuses stale
work, and answers every foreseeable mistake with one `error:` line and exit 2 before work starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dgqtool.cli import app

runner = CliRunner()
# The paper recipe: these tests are about the CLI, not the default recipe (tests/test_rotate.py runs that).
SMALL = ["--nsamples", "4", "--seqlen", "64", "--group", "32", "--recipe", "paper"]


def dgq(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment: str, code: int = 2) -> str:
    """Exit `code`, exactly one `error:` line naming the problem, no traceback or internal error."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert fragment in errors[0], result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my own notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(os.urandom(64))
    return path


@pytest.fixture(scope="module")
def packed(tiny_llama, corpus_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "ckpt"
    result = dgq("quantize", tiny_llama, "-o", out, "--calib-data", corpus_file, *SMALL)
    assert result.exit_code == 0, result.output
    return out


def quantize(model: Path, out: Path, corpus: Path, *extra):
    return dgq("quantize", model, "-o", out, "--calib-data", corpus, *SMALL, "--no-verify", *extra)


# ------------------------------------------------------------------------------------ data loss
def test_output_into_a_users_directory_is_refused_and_it_stays_intact(tiny_llama, corpus_file, tmp_path):
    target = user_dir(tmp_path / "userdir")
    before = snapshot(target)
    assert_one_line_error(quantize(tiny_llama, target, corpus_file), "non-empty directory that dgq did not write")
    assert snapshot(target) == before
    assert not (tmp_path / "userdir.work").exists()  # refused before any work: nothing created


def test_output_onto_a_copy_of_the_model_or_the_model_itself_is_refused(tiny_llama, corpus_file, tmp_path):
    copy = tmp_path / "copy-of-the-model"
    shutil.copytree(tiny_llama, copy)
    before = snapshot(copy)
    assert_one_line_error(quantize(copy, copy, corpus_file), "is the model directory")
    assert_one_line_error(quantize(tiny_llama, copy, corpus_file), "dgq did not write")
    assert snapshot(copy) == before


def test_pack_into_the_current_directory_or_the_work_directory_is_refused(packed, tmp_path, monkeypatch):
    work = packed.with_name(packed.name + ".work")
    here = user_dir(tmp_path / "here")
    before, work_before = snapshot(here), snapshot(work)
    monkeypatch.chdir(here)
    assert_one_line_error(dgq("pack", "-w", work, "-o", "."), "is the current directory")
    assert_one_line_error(dgq("pack", "-w", work, "-o", ".."), "a parent of it")
    monkeypatch.undo()
    assert_one_line_error(dgq("pack", "-w", work, "-o", work), "is the work directory")
    assert snapshot(here) == before and snapshot(work) == work_before


def test_work_directory_inside_the_output_is_refused(tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(quantize(tiny_llama, out, corpus_file, "-w", out / "work"), "or a parent of it")
    assert not out.exists()


def test_export_target_holding_user_files_is_refused_before_work(tiny_llama, corpus_file, tmp_path):
    target = user_dir(tmp_path / "out-compressed-tensors")
    before = snapshot(target)
    result = quantize(tiny_llama, tmp_path / "out", corpus_file, "--export", "compressed-tensors")
    assert_one_line_error(result, "dgq did not write")
    assert snapshot(target) == before and not (tmp_path / "out").exists()


def test_output_that_is_a_file_or_another_runs_checkpoint(packed, tiny_llama, corpus_file, tmp_path):
    file = tmp_path / "out.txt"
    file.write_text("keep me")
    assert_one_line_error(quantize(tiny_llama, file, corpus_file), "is an existing file")
    assert file.read_text() == "keep me"
    other = tmp_path / "other"
    shutil.copytree(packed, other)  # a dgq checkpoint, but not the output of this work directory
    before = snapshot(other)
    assert_one_line_error(quantize(tiny_llama, other, corpus_file, "-w", tmp_path / "fresh.work"), "pass --force")
    assert snapshot(other) == before


def test_unwritable_output_fails_before_calibration(tiny_llama, corpus_file, tmp_path):
    work = tmp_path / "work"
    assert_one_line_error(quantize(tiny_llama, Path("/proc/dgq-out"), corpus_file, "-w", work), "cannot write in /proc")
    assert not (work / "calibrate").exists()


def test_a_failed_run_leaves_no_work_directory_behind(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_one_line_error(quantize(tiny_llama, tmp_path / "o", short), "fewer than one window")
    assert not (tmp_path / "o.work").exists() and not (tmp_path / "o").exists()


def test_checkpoint_files_are_shared_like_any_output(packed):
    old = os.umask(0o022)
    os.umask(old)
    assert stat.S_IMODE(packed.stat().st_mode) == 0o777 & ~old
    for path in packed.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old, path.name


# -------------------------------------------------------------------------- untrusted code, pickle
def _remote_code_model(tiny_llama: Path, path: Path) -> Path:
    shutil.copytree(tiny_llama, path)
    marker = path.parent / "code-ran"
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n"
                                  "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    (path / "config.json").write_text(json.dumps(config))
    return marker


def test_model_code_never_runs_unless_trusted_even_if_yaml_says_no_as_a_string(tiny_llama, corpus_file, tmp_path):
    marker = _remote_code_model(tiny_llama, tmp_path / "remote")
    recipe = tmp_path / "r.yaml"
    recipe.write_text('trust_remote_code: "no"\n')
    assert_one_line_error(quantize(tmp_path / "remote", tmp_path / "o", corpus_file, "--config", recipe),
                          "--trust-remote-code must be true or false")
    result = quantize(tmp_path / "remote", tmp_path / "o", corpus_file)
    assert_one_line_error(result, "cannot load model")
    assert not marker.exists() and "[y/N]" not in result.output


def test_pickle_weights_are_refused_unless_allowed(tiny_llama, corpus_file, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not even a pickle")
    assert_one_line_error(quantize(model, tmp_path / "o", corpus_file), "only pickle weights (pytorch_model.bin)")
    result = quantize(model, tmp_path / "o", corpus_file, "--allow-pickle")
    assert result.exit_code == 2 and "internal error" not in result.output and "weights_only" not in result.output


# ---------------------------------------------------------------------------------- stale work
def test_inputs_changed_in_place_are_not_reused(tiny_llama, corpus_file, tmp_path):
    model, text, out = tmp_path / "model", tmp_path / "calib.txt", tmp_path / "out"
    shutil.copytree(tiny_llama, model)
    text.write_text(corpus_file.read_text())
    assert quantize(model, out, text).exit_code == 0
    rerun = quantize(model, out, text)
    assert "calibrate: up to date" in rerun.output and "pack: " in rerun.output
    text.write_text(corpus_file.read_text().replace("red", "blue"))  # same path, new content
    assert "calibrate: up to date" not in quantize(model, out, text).output
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] += 1
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert "calibrate: up to date" not in quantize(model, out, text).output


def test_verify_against_another_model_fails(packed, tiny_opt):
    result = dgq("verify", packed, "--model", tiny_opt)
    assert_one_line_error(result, "verification failed", code=3)
    assert "FAIL" in result.output and "quantized from" in result.output


def test_verify_says_when_the_reference_check_is_skipped(packed):
    result = dgq("verify", packed)
    assert result.exit_code == 0 and "skipped (no reference model" in result.output


def test_verify_passes_against_its_own_model_with_a_real_threshold(packed):
    result = dgq("verify", packed, "-w", packed.with_name(packed.name + ".work"))
    assert result.exit_code == 0, result.output
    assert "limit 0.5" in result.output and "reference is the quantized model" in result.output


def test_context_overflow_is_refused(tiny_llama, corpus_file, tmp_path):
    assert_one_line_error(dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--calib-data", corpus_file,
                              "--nsamples", "2", "--seqlen", "300"), "exceeds the model's context of 256")
    assert_one_line_error(dgq("eval", tiny_llama, "--seqlen", "300", "--task", "wikitext2"), "exceeds the model's context")


# ------------------------------------------------------------------- clear errors, not internal
YAML_CASES = {
    "group: true\n": "--group must be an int",
    'group: "abc"\n': "--group must be an int",
    "nsamples: 4.5\n": "--nsamples must be an int",
    "device: null\n": "--device needs a value",
    "percentile: .nan\n": "--percentile must be finite",
    "smooth: none\nmax_column_growth: 2\n": "--smooth is none",
    "act: static\nmax_column_growth: 2\n": "dynamic activations",
}


@pytest.mark.parametrize("text", list(YAML_CASES), ids=list(range(len(YAML_CASES))))
def test_bad_recipe_values(text, tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert_one_line_error(dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--config", recipe), YAML_CASES[text])


def test_binary_recipe_file(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xff\xfe\x00\x81" * 50)
    assert_one_line_error(dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--config", recipe), "not a UTF-8 text file")


@pytest.mark.parametrize("args,fragment", [
    (["--max-column-growth", "2", "--smooth", "none"], "--smooth is none"),
    (["--group", "48"], "does not divide"),
    (["--export", "onnx"], "'onnx' is not one of"),
    (["--nsamples", "0"], "--nsamples must be"),
], ids=["growth-without-smoothing", "group-vs-model", "export-format", "nsamples"])
def test_certain_failures_are_found_before_calibration(args, fragment, tiny_llama, corpus_file, tmp_path):
    assert_one_line_error(quantize(tiny_llama, tmp_path / "o", corpus_file, *args), fragment)
    assert not (tmp_path / "o.work" / "calibrate").exists()


def test_a_text_file_named_gguf(tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_text("hello")
    assert_one_line_error(dgq("quantize", fake, "-o", tmp_path / "o"), "not a GGUF file")


@pytest.mark.parametrize("args,fragment", [
    (["eval", "--limit", "0"], "--limit must be a positive integer"),
    (["eval", "--limit", "-3"], "--limit must be a positive integer"),
    (["eval", "--seqlen", "0"], "--seqlen must be a positive integer"),
    (["eval", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["verify", "--ppl-limit", "0"], "--ppl-limit must be a positive integer"),
    (["run", "-n", "0"], "--max-new-tokens must be a positive integer"),
    (["run", "-p", ""], "--prompt is empty"),
    (["run", "--temperature", "-1"], "--temperature must be"),
    (["run", "--temperature", "nan"], "--temperature must be"),
    (["run", "-n", "1000000"], "does not fit the model's context"),
    (["run", "--chat"], "has no chat template"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_bad_command_values(args, fragment, packed):
    assert_one_line_error(dgq(args[0], packed, *args[1:]), fragment)


def test_no_checkpoint_argument_uses_the_default_output_or_says_it_is_missing(packed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(dgq("verify"), "./dgq-out (what `dgq quantize` writes by default) does not exist")
    shutil.copytree(packed, tmp_path / "dgq-out")
    result = dgq("verify")
    assert result.exit_code == 0 and "using ./dgq-out" in result.output


def test_sigterm_removes_temporary_files(tiny_llama, corpus_file, tmp_path):
    """SIGTERM just before the second search layer is published: exit 143 and no temporary file left."""
    killer = ("import os, signal, sys\nreal = os.replace\n"
              "def replace(src, dst, *a, **k):\n"
              "    if os.path.basename(str(dst)) == 'layer_001.safetensors':\n        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(src, dst, *a, **k)\n"
              "os.replace = replace\nfrom dgqtool.cli import main\nsys.argv = ['dgq'] + sys.argv[1:]\nmain()\n")
    args = ["quantize", str(tiny_llama), "-o", str(tmp_path / "o"), "--calib-data", str(corpus_file), *SMALL, "--no-verify"]
    done = subprocess.run([sys.executable, "-c", killer, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert "terminated" in done.stderr
    assert not list(tmp_path.rglob("*.tmp")) and (tmp_path / "o.work" / "search" / "layer_000.safetensors").is_file()
