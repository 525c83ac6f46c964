"""The packed format's one home: encode/decode round trips per weight format, and a checkpoint
directory checked on load (config fields, manifest coverage, hashes, tokenizer files)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from dgqtool.checkpoint import load_checkpoint
from dgqtool.cli import app
from dgqtool.errors import DGQError
from dgqtool.format import (MANIFEST, WEIGHT_FORMATS, format_of, linear_tensors, linear_weight, read_checkpoint,
                            split_linears)
from dgqtool.quant.dual_grained import GroupWeight, random_dual_grained
from tiny_packed import write_packed


@pytest.fixture(scope="module")
def packed(tiny_llama, tmp_path_factory):
    return write_packed(tiny_llama, tmp_path_factory.mktemp("format") / "ckpt")


def test_encode_decode_round_trip_is_exact_for_both_formats():
    dgq = random_dual_grained(24, 64, 32, torch.Generator().manual_seed(0))
    group = GroupWeight(dgq.codes, dgq.zero, torch.rand(24, 2) + 0.5)
    for weight in (dgq, group):
        tensors = linear_tensors("layer.q", weight, torch.float32)
        fmt = WEIGHT_FORMATS[format_of(weight)]
        assert set(tensors) == {f"layer.q.{n}" for n in fmt.names()}
        assert tensors["layer.q.qweight"].shape == (24, 32) and tensors["layer.q.qweight"].dtype == torch.uint8
        back = linear_weight("layer.q", tensors)
        assert type(back) is type(weight) and torch.equal(back.codes, weight.codes)
        assert torch.equal(back.dequantize(), weight.dequantize())  # float32 scales: exact
    half = linear_weight("p", linear_tensors("p", dgq))  # checkpoint dtype: s1 rounded to fp16 only
    assert torch.equal(half.s1, dgq.s1.half().float()) and torch.equal(half.int8_weight(), dgq.int8_weight())
    with pytest.raises(DGQError, match="lack p.scales_s1"):
        linear_weight("p", {k: v for k, v in linear_tensors("p", dgq).items() if not k.endswith("s1")})


def test_split_linears_separates_packed_tensors(packed):
    _, state = read_checkpoint(packed)
    weights, rest = split_linears(state)
    assert len(weights) == 14 and all(format_of(w) == "dgq" for w in weights.values())
    assert not any(k.endswith((".qweight", ".scales_s2")) for k in rest) and "model.norm.weight" in rest


def _edit_config(ckpt, edit, rehash: bool):
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    if rehash:  # as if someone regenerated the manifest too: the field checks must still catch it
        from dgqtool.artifacts import sha256_file

        manifest = json.loads((ckpt / MANIFEST).read_text())
        manifest["files"]["config.json"] = sha256_file(ckpt / "config.json")
        (ckpt / MANIFEST).write_text(json.dumps(manifest))


CONFIG_EDITS = {
    "bits": (lambda c: c["quantization_config"].update(bits=3), "bits must be 4, got 3"),
    "activation_bits": (lambda c: c["quantization_config"].update(activation_bits=16), "activation_bits must be 8"),
    "group_size zero": (lambda c: c["quantization_config"].update(group_size=0), "group_size must be a positive integer"),
    "group_size text": (lambda c: c["quantization_config"].update(group_size="32"), "group_size must be a positive integer"),
    "group_size not dividing": (lambda c: c["quantization_config"].update(group_size=48), "does not divide in_features 64"),
    "no model_type": (lambda c: c.pop("model_type"), "no model_type"),
    "activation": (lambda c: c["quantization_config"].update(activation="fp8"), "activation must be one of"),
    "mixed without its list": (lambda c: c["quantization_config"].update(activation="mixed"),
                               "activation 'mixed' needs per_token_linears"),
    "list without mixed": (lambda c: c["quantization_config"].update(per_token_linears=["model.layers.0.mlp.down_proj"]),
                           "per_token_linears is only for activation 'mixed'"),
    "mixed naming no linear": (lambda c: c["quantization_config"].update(activation="mixed",
                                                                          per_token_linears=["model.layers.0.mlp.nope"]),
                               "per_token_linears names model.layers.0.mlp.nope"),
    "harmless edit": (lambda c: c.update(architectures=["Other"]), "config.json does not match the hash"),
}


@pytest.mark.parametrize("case", CONFIG_EDITS)
def test_edited_config_fails_load_and_verify_with_one_line(packed, tmp_path, case):
    edit, message = CONFIG_EDITS[case]
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    _edit_config(bad, edit, rehash=case != "harmless edit")
    with pytest.raises(DGQError, match=message):
        load_checkpoint(bad)
    result = CliRunner().invoke(app, ["verify", str(bad)])  # a failed "load + hashes" check: exit 3
    assert result.exit_code == 3 and message.split(",")[0] in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("case,message", [
    ("extra file", "stray.py is not covered by dgq_manifest.json"),
    ("missing tokenizer", "tokenizer.json is missing"),
    ("edited tokenizer", "tokenizer.json does not match the hash"),
    ("unlisted tokenizer", "no tokenizer files"),
])
def test_every_file_is_covered_by_the_manifest(packed, tmp_path, case, message):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    if case == "extra file":
        (bad / "stray.py").write_text("import os\n")
    elif case == "missing tokenizer":
        (bad / "tokenizer.json").unlink()
    elif case == "edited tokenizer":
        (bad / "tokenizer.json").write_text((bad / "tokenizer.json").read_text().replace("house", "horse"))
    else:
        manifest = json.loads((bad / MANIFEST).read_text())
        (bad / "tokenizer.json").unlink()
        del manifest["files"]["tokenizer.json"]
        (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DGQError, match=message):
        load_checkpoint(bad)


def test_manifest_lists_every_file_written(packed):
    files = json.loads((packed / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in packed.iterdir()} - {MANIFEST}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)


def test_remote_code_is_never_run(packed, tmp_path, monkeypatch):
    """An auto_map pointing at code in the checkpoint is not followed (no prompt, no import)."""
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    (bad / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    _edit_config(bad, lambda c: c.update(auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}),
                 rehash=True)
    manifest = json.loads((bad / MANIFEST).read_text())
    from dgqtool.artifacts import sha256_file

    manifest["files"]["evil.py"] = sha256_file(bad / "evil.py")
    (bad / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers prompted"))
    model, _, _ = load_checkpoint(bad)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_channelwise_checkpoint_records_one_group_per_row(tiny_opt, corpus_file, tmp_path):
    out = tmp_path / "cw"
    result = CliRunner().invoke(app, ["quantize", str(tiny_opt), "-o", str(out), "--calib-data", str(corpus_file),
                                      "--nsamples", "2", "--seqlen", "32", "--method", "channelwise", "--group", "32", "--recipe", "paper", "--no-verify"])
    assert result.exit_code == 0, result.output
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["group_size"] == -1 and q["format"] == "w4-group"
    model, _, _ = load_checkpoint(out)
    fc1, fc2 = model.model.decoder.layers[0].fc1, model.model.decoder.layers[0].fc2
    assert (fc1.group, fc2.group) == (64, 128) and fc2.scales.shape == (64, 1)
