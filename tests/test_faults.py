"""Fault injection and hostile input: SIGKILL at chosen points then resume (byte-identical output),
a table of corrupted files each with its expected error, concurrent runs, a failing disk, odd
calibration text, and a fuzz of every loader with random bytes and random safetensors headers."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dgqtool.artifacts import read_json, read_manifest, read_tensors, sha256_file
from dgqtool.checkpoint import load_checkpoint
from dgqtool.cli import app
from dgqtool.errors import DGQError

runner = CliRunner()
ARGS = ["--nsamples", "4", "--seqlen", "64", "--group", "32", "--recipe", "paper", "--no-verify"]  # the default recipe is incidental here

# Runs `dgq` in a child that SIGKILLs itself just before the rename that would publish the
# target artifact: the temporary file is complete, the final name not yet written.
KILLER = """
import os, signal, sys
target, count = sys.argv[1], int(sys.argv[2])
real_replace, seen = os.replace, [0]
def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == target:
        seen[0] += 1
        if seen[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
from dgqtool.cli import main
sys.argv = ["dgq"] + sys.argv[3:]
main()
"""


def _dgq(*args: str, kill_before: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    if kill_before is None:
        cmd = [sys.executable, "-m", "dgqtool.cli", *args]
    else:
        cmd = [sys.executable, "-c", KILLER, kill_before[0], str(kill_before[1]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_run(tiny_llama, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ckpt"
    done = _dgq("quantize", str(tiny_llama), "-o", str(out), "--calib-data", str(corpus_file), *ARGS)
    assert done.returncode == 0, done.stderr
    return out


KILL_POINTS = [
    ("stats.safetensors", 1),  # calibrate, its main artifact
    ("manifest.json", 1),  # calibrate finished its artifacts, not its manifest
    ("layer_001.safetensors", 1),  # search, second decoder layer
    ("manifest.json", 3),  # search done, manifest not published
    ("model.safetensors", 1),  # pack, checkpoint weights
]


@pytest.mark.parametrize("point", KILL_POINTS, ids=[f"{t}#{n}" for t, n in KILL_POINTS])
def test_sigkill_then_rerun_gives_a_byte_identical_checkpoint(point, reference_run, tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "ckpt"
    cmd = ("quantize", str(tiny_llama), "-o", str(out), "--calib-data", str(corpus_file), *ARGS)
    killed = _dgq(*cmd, kill_before=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # the checkpoint directory appears whole or not at all
    for path in (tmp_path / "ckpt.work").rglob("*.safetensors"):
        load_file(path)  # every published artifact is complete
    resumed = _dgq(*cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert sha256_file(out / "model.safetensors") == sha256_file(reference_run / "model.safetensors")


# ------------------------------------------------------------------------------ corrupted files


def _rewrite(ckpt: Path, edit) -> None:
    """Change the checkpoint's tensors and re-sign the manifest: only semantic checks can catch it."""
    state = load_file(ckpt / "model.safetensors")
    edit(state)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    manifest = read_json(ckpt / "dgq_manifest.json")
    manifest["files"]["model.safetensors"] = sha256_file(ckpt / "model.safetensors")
    (ckpt / "dgq_manifest.json").write_text(json.dumps(manifest))


Q = "model.layers.0.self_attn.q_proj"


def _flip_byte(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _with_codes(state, fill):
    state[f"{Q}.qweight"] = torch.full_like(state[f"{Q}.qweight"], fill)


CORRUPTIONS = {
    "flipped byte": (_flip_byte, "does not match the hash"),
    "truncated file": (_truncate, "does not match the hash"),
    "manifest hash mismatch": (lambda c: (c / "dgq_manifest.json").write_text(
        (c / "dgq_manifest.json").read_text().replace('"model.safetensors": "', '"model.safetensors": "0')), "does not match the hash"),
    "manifest not JSON": (lambda c: (c / "dgq_manifest.json").write_bytes(b"\x00\xff{"), "not valid JSON"),
    "zero point > 15": (lambda c: _rewrite(c, lambda s: s[f"{Q}.qzeros"].fill_(16)), "outside [0, 15]"),
    "|S2 (code - zp)| > 127": (lambda c: _rewrite(c, lambda s: (s[f"{Q}.scales_s2"].fill_(127), s[f"{Q}.qzeros"].fill_(0),
                                                                 _with_codes(s, 0xFF))), "exceeds 127"),
    "S2 = 0": (lambda c: _rewrite(c, lambda s: s[f"{Q}.scales_s2"].fill_(0)), "S2 below 1"),
    "NaN channel scale": (lambda c: _rewrite(c, lambda s: s[f"{Q}.scales_s1"].fill_(float("nan"))), "non-finite"),
    "wrong dtype": (lambda c: _rewrite(c, lambda s: s.__setitem__(f"{Q}.qweight", s[f"{Q}.qweight"].float())), "dtype"),
    "wrong shape": (lambda c: _rewrite(c, lambda s: s.__setitem__(f"{Q}.qzeros", s[f"{Q}.qzeros"][:, :1].contiguous())), "do not fit"),
    "missing tensor": (lambda c: _rewrite(c, lambda s: s.pop(f"{Q}.scales_s1")), "missing"),
    "unknown format version": (lambda c: (c / "config.json").write_text(
        (c / "config.json").read_text().replace('"format_version": 1', '"format_version": 99')), "format version"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_named_in_one_error(case, reference_run, tmp_path):
    corrupt, message = CORRUPTIONS[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference_run, ckpt)
    corrupt(ckpt)
    with pytest.raises(DGQError, match=message.replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        load_checkpoint(ckpt)
    for command in (["verify", str(ckpt)], ["eval", str(ckpt), "--limit", "1"], ["run", str(ckpt), "-n", "2"]):
        result = runner.invoke(app, command)
        assert result.exit_code in (2, 3) and "Traceback" not in result.output, (command, result.output)


def test_corrupted_stage_artifact_and_escaping_manifest_path(reference_run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(reference_run.with_name("ckpt.work"), work)
    stats = work / "calibrate" / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-10])
    result = runner.invoke(app, ["smooth", "-w", str(work)])
    assert result.exit_code == 2 and "does not match its manifest" in result.output
    manifest = json.loads((work / "smooth" / "manifest.json").read_text())
    manifest["outputs"] = {"../../../etc/passwd": "0" * 64}
    (work / "smooth" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DGQError, match="outside"):
        read_manifest(work / "smooth", "smooth")


# ------------------------------------------------------------------------ concurrency and disks


def test_second_run_on_a_locked_work_dir_refuses_and_a_killed_holder_frees_it(tiny_llama, corpus_file, tmp_path):
    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from dgqtool.artifacts import lock_work_dir; lock_work_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(work)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    args = ["calibrate", str(tiny_llama), "-w", str(work), "--calib-data", str(corpus_file), "--nsamples", "2", "--seqlen", "32"]
    done = _dgq(*args)
    assert done.returncode == 2 and "in use by another dgq run (pid" in done.stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert _dgq(*args).returncode == 0  # nothing stale left behind


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_keeps_the_previous_checkpoint(code, reference_run, tiny_llama, corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    shutil.copytree(reference_run, out)
    shutil.copytree(reference_run.with_name("ckpt.work"), tmp_path / "ckpt.work")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_replace(src, dst, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", failing_replace)
    result = runner.invoke(app, ["pack", "-w", str(tmp_path / "ckpt.work"), "-o", str(out), "--force"])
    assert result.exit_code == 2 and os.strerror(code) in result.output, result.output
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary files left behind


# ------------------------------------------------------------------------------ calibration text


CALIB_TEXTS = {
    "empty": (b"", "holds no text"),
    "whitespace": (b"  \n\n ", "holds no text"),
    "too short": (b"the red house", "fewer than one window"),
    "binary": (bytes(range(256)) * 4, "looks binary"),
    "latin-1": ("caf\xe9 au lait ".encode("latin-1") * 50, "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CALIB_TEXTS))
def test_bad_calibration_text_gives_a_clear_error(case, tiny_llama, tmp_path):
    data, message = CALIB_TEXTS[case]
    (tmp_path / "calib.txt").write_bytes(data)
    result = runner.invoke(app, ["calibrate", str(tiny_llama), "-w", str(tmp_path / "w"), "--calib-data",
                                 str(tmp_path / "calib.txt"), "--nsamples", "2", "--seqlen", "64"])
    assert result.exit_code == 2 and message in result.output, result.output


def test_utf16_calibration_text_with_a_bom_is_read(tiny_llama, corpus_file, tmp_path):
    (tmp_path / "calib.txt").write_bytes(corpus_file.read_text().encode("utf-16"))
    result = runner.invoke(app, ["calibrate", str(tiny_llama), "-w", str(tmp_path / "w"), "--calib-data",
                                 str(tmp_path / "calib.txt"), "--nsamples", "2", "--seqlen", "64"])
    assert result.exit_code == 0, result.output


def test_only_safetensors_and_json_are_ever_deserialized():
    source = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "src").rglob("*.py"))
    for forbidden in ("torch.load(", "import pickle", "trust_remote_code=True"):
        assert forbidden not in source


# ----------------------------------------------------------------------------------------- fuzz


def _random_header(rng: random.Random) -> bytes:
    tensors = {}
    for i in range(rng.randint(0, 4)):
        shape = [rng.choice([0, 1, 3, 2**31, 2**62, -1]) for _ in range(rng.randint(0, 3))]
        start = rng.choice([0, 8, 2**40, -5])
        tensors[f"t{i}"] = {"dtype": rng.choice(["F32", "U8", "I8", "F16", "XX", 7]), "shape": shape,
                            "data_offsets": [start, start + rng.choice([0, 4, 12, 2**50])]}
    if rng.random() < 0.2:
        tensors["__metadata__"] = rng.choice([{"format": "pt"}, [1, 2], "x"])
    body = json.dumps(tensors).encode()
    length = len(body) if rng.random() < 0.8 else rng.choice([0, 2**63, len(body) + 100])
    return struct.pack("<Q", length % 2**64) + body + os.urandom(rng.randint(0, 64))


def test_fuzz_loaders_raise_only_clean_errors(reference_run, tmp_path):
    rng = random.Random(0)
    cases = 0
    for i in range(150):
        path = tmp_path / f"f{i}.safetensors"
        path.write_bytes(os.urandom(rng.randint(0, 300)) if i % 2 else _random_header(rng))
        for load in (read_tensors, read_json):
            try:
                load(path)
            except DGQError:
                pass
            cases += 1
        ckpt = tmp_path / f"ckpt{i}"
        shutil.copytree(reference_run, ckpt)
        target = ckpt / rng.choice(["model.safetensors", "config.json", "dgq_manifest.json"])
        shutil.copy(path, target)
        if target.name == "model.safetensors" and rng.random() < 0.5:
            manifest = read_json(ckpt / "dgq_manifest.json")
            manifest["files"]["model.safetensors"] = sha256_file(target)  # past the hash check
            (ckpt / "dgq_manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DGQError):
            load_checkpoint(ckpt)
        shutil.rmtree(ckpt)
        cases += 1
    assert cases == 450
