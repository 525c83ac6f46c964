"""Export (compressed-tensors round trip through the package's own decompressor), the --json run
summary, the exit code of each failure class, and the example CI pipeline script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dgqtool.checkpoint import load_checkpoint, load_compressed_tensors
from dgqtool.cli import app
from dgqtool.nn.dgq_linear import DGQLinear, GroupW4A8Linear

pytest.importorskip("compressed_tensors")
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quantized(tiny_llama, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ckpt"
    result = runner.invoke(app, ["--json", "quantize", str(tiny_llama), "-o", str(out), "--calib-data", str(corpus_file),
                                 "--nsamples", "4", "--seqlen", "64", "--group", "32", "--dtype", "float16", "--recipe", "paper",
                                 "--export", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_json_summary_schema(quantized):
    out, summary = quantized
    assert summary["status"] == "ok" and summary["exit_code"] == 0 and summary["output"] == str(out)
    assert set(summary["stages"]) == {"calibrate", "smooth", "search", "pack"}
    for stage in summary["stages"].values():
        assert stage["outputs"] and all(len(h) == 64 for h in stage["outputs"].values())
        assert stage["seconds"] >= 0
    assert summary["stages"]["calibrate"]["seconds"] > 0 and summary["stages"]["search"]["seconds"] > 0
    assert summary["verify"] and all(c["passed"] for c in summary["verify"])
    assert summary["recipe"]["group"] == 32 and summary["export"]["format"] == "compressed-tensors"


def test_compressed_tensors_decompressor_reconstructs_the_weights(quantized):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    out, summary = quantized
    export = Path(summary["export"]["output"])
    config = json.loads((export / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    import compressed_tensors

    assert config["version"] == compressed_tensors.__version__  # written by compressed-tensors' ModelCompressor
    group = config["config_groups"]["group_0"]
    assert group.pop("format") == "pack-quantized"
    expected = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": False}
    assert {k: group["weights"][k] for k in expected} == expected and not group["weights"].get("dynamic")
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    scheme = QuantizationScheme.model_validate(group)

    from safetensors.torch import load_file

    state = load_file(export / "model.safetensors")
    dgq, _, _ = load_checkpoint(out)
    checked = 0
    for name, module in dgq.named_modules():
        if not isinstance(module, DGQLinear):
            continue
        packed = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".weight")}
        assert packed["weight_packed"].dtype == torch.int32
        weight = PackedQuantizationCompressor.decompress(packed, scheme)["weight"].float()
        exact = module.quantized_weight().dequantize()  # s1 * S2 * (code - zp), DGQ's own weight
        rel = ((weight - exact).abs() / exact.abs().clamp(min=1e-12))[exact != 0].max()
        # folded scale rounded to fp16, then the decompressed weight itself rounded to fp16
        assert rel <= summary["export"]["max_scale_rel_error"] + 2**-11 + 1e-6
        assert summary["export"]["max_scale_rel_error"] < 2**-10  # fp16 rounding of s1 * S2
        checked += 1
    assert checked == 14


def test_export_loads_back_with_the_same_codes_and_close_outputs(quantized):
    out, summary = quantized
    dgq, tokenizer, _ = load_checkpoint(out)
    exported, _, _ = load_compressed_tensors(summary["export"]["output"])
    a = dgq.model.layers[1].mlp.down_proj
    b = exported.model.layers[1].mlp.down_proj
    assert isinstance(b, GroupW4A8Linear) and torch.equal(a.qweight, b.qweight) and torch.equal(a.qzeros, b.qzeros)
    ids = tokenizer("the red house of the old river is open", return_tensors="pt").input_ids
    with torch.no_grad():
        la, lb = dgq(ids).logits.float(), exported(ids).logits.float()
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    assert (la - lb).norm() / la.norm() < 1e-2


def test_dgq_format_export_is_a_verified_copy(quantized, tmp_path):
    out, _ = quantized
    result = runner.invoke(app, ["--json", "export", str(out), "--format", "dgq", "-o", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    load_checkpoint(tmp_path / "copy")  # hashes check out


@pytest.mark.parametrize("case", ["bad_input", "verification", "internal"])
def test_exit_codes_and_json_errors(case, quantized, tmp_path, monkeypatch, tiny_llama, corpus_file):
    out, _ = quantized
    if case == "bad_input":
        args, code = ["--json", "export", str(tmp_path / "nope"), "-o", str(tmp_path / "x")], 2
    elif case == "verification":  # a gate no quantized model can pass
        (tmp_path / "data" / "wikitext2").mkdir(parents=True)
        (tmp_path / "data" / "wikitext2" / "wiki.test.raw").write_text(corpus_file.read_text())
        args, code = ["--json", "verify", str(out), "--model", str(tiny_llama), "--max-ppl-ratio", "0.5",
                      "--ppl-limit", "2", "--ppl-seqlen", "64", "--data-dir", str(tmp_path / "data")], 3
    else:
        monkeypatch.setattr("dgqtool.export.export_checkpoint", lambda *a, **k: 1 / 0)
        args, code = ["--json", "export", str(out), "-o", str(tmp_path / "y")], 1
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["status"] == "error" and error["exit_code"] == code and error["error"]
    assert "Traceback" not in result.output


def test_example_pipeline_script_runs_end_to_end(tiny_llama, corpus_file, tmp_path):
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    (data / "wiki.test.raw").write_text(corpus_file.read_text())
    env = os.environ | {"MODEL": str(tiny_llama), "CALIB_DATA": str(corpus_file), "OUT": str(tmp_path / "run"),
                        "SKIP_INSTALL": "1", "GROUP": "32", "NSAMPLES": "4", "SEQLEN": "64", "EVAL_SEQLEN": "64",
                        "DGQ_DATA_DIR": str(tmp_path / "data"), "DGQ": str(Path(sys.executable).parent / "dgq")}
    done = subprocess.run(["bash", str(REPO / "scripts" / "ci_pipeline.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for step in ("quantize", "verify", "eval", "export"):
        assert json.loads((tmp_path / "run" / f"{step}.json").read_text())["status"] == "ok"
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["tasks"]["wikitext2"]["windows"] == 2


def test_export_config_round_trips_through_compressed_tensors_parsers(quantized):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    _, summary = quantized
    block = json.loads((Path(summary["export"]["output"]) / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(block)
    assert parsed.format == "pack-quantized" and parsed.config_groups["group_0"].format == "pack-quantized"
    assert parsed.config_groups["group_0"].weights.group_size == 32
    hf = CompressedTensorsConfig.from_dict(block)  # what transformers builds from config.json
    assert hf.quantization_config.config_groups["group_0"].weights.num_bits == 4


def test_run_and_load_checkpoint_accept_an_export_in_its_scale_dtype(quantized):
    _, summary = quantized
    export = summary["export"]["output"]
    assert summary["export"]["scale_dtype"] == "float16"  # the checkpoint's dtype (--dtype float16)
    model, _, q = load_checkpoint(export)
    down = model.model.layers[1].mlp.down_proj
    assert q["quant_method"] == "compressed-tensors" and isinstance(down, GroupW4A8Linear)
    assert down.scales.dtype == torch.float16
    result = runner.invoke(app, ["run", export, "--prompt", "the old river", "-n", "3"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


def test_a_single_config_group_applies_whatever_it_targets(quantized, tmp_path):
    """A foreign compressed-tensors checkpoint whose one group targets "re:" patterns loads as
    before: the only group is every linear's."""
    import shutil

    _, summary = quantized
    foreign = tmp_path / "foreign"
    shutil.copytree(summary["export"]["output"], foreign)
    (foreign / "dgq_manifest.json").unlink()
    config = json.loads((foreign / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["targets"] = ["re:.*proj"]
    (foreign / "config.json").write_text(json.dumps(config))
    model, _, _ = load_checkpoint(foreign)
    assert isinstance(model.model.layers[1].mlp.down_proj, GroupW4A8Linear)


def test_folding_error_is_reported_in_the_checkpoint_dtype():
    from dgqtool.export import compressed_state
    from dgqtool.format import linear_tensors
    from dgqtool.quant.dual_grained import random_dual_grained

    state = linear_tensors("model.layers.0.mlp.down_proj", random_dual_grained(64, 128, 32, torch.Generator().manual_seed(0)))
    errors = {dtype: compressed_state(state, {"group_size": 32}, dtype)[2] for dtype in (torch.bfloat16, torch.float16)}
    assert 2**-10 < errors[torch.bfloat16] <= 2**-8  # 8 significant bits: at most half an ulp, 3.9e-3
    assert 0 < errors[torch.float16] <= 2**-11  # 11 bits: 4.9e-4


def test_symmetric_quantize_exports_the_symmetric_scheme(tiny_llama, corpus_file, tmp_path):
    """--symmetric: every zero point 8 (the codes' midpoint, int4 zero in compressed-tensors), verify
    passes, the export says symmetric and loads back with the same codes."""
    out = tmp_path / "ckpt"
    result = runner.invoke(app, ["--json", "quantize", str(tiny_llama), "-o", str(out), "--calib-data", str(corpus_file),
                                 "--nsamples", "4", "--seqlen", "64", "--group", "32", "--symmetric", "--recipe", "paper",
                                 "--export", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["recipe"]["symmetric"] is True and all(c["passed"] for c in summary["verify"])
    dgq, _, _ = load_checkpoint(out)
    linears = [m for m in dgq.modules() if isinstance(m, DGQLinear)]
    assert len(linears) == 14 and all(bool((m.quantized_weight().zero == 8).all()) for m in linears)
    codes = torch.cat([m.quantized_weight().codes.flatten() for m in linears])
    assert int(codes.min()) == 0 and int(codes.max()) == 15  # both ends of [-8, 7] in use
    export = Path(summary["export"]["output"])
    block = json.loads((export / "config.json").read_text())["quantization_config"]
    assert block["config_groups"]["group_0"]["weights"]["symmetric"] is True
    exported, _, _ = load_compressed_tensors(export)
    a, b = dgq.model.layers[1].mlp.down_proj, exported.model.layers[1].mlp.down_proj
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.qzeros, b.qzeros)
