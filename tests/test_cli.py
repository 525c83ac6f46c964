"""The `dgq` CLI end to end on tiny LLaMA and OPT models, stage by stage, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dgqtool.checkpoint import load_checkpoint
from dgqtool.cli import app
from dgqtool.nn.dgq_linear import DGQLinear, GroupW4A8Linear
from dgqtool.format import linear_weight

runner = CliRunner()
# The paper recipe: these tests are about the CLI, not the default recipe (tests/test_rotate.py runs that).
SMALL = ["--nsamples", "4", "--seqlen", "64", "--group", "32", "--recipe", "paper"]


def dgq(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def quantize(model: Path, out: Path, calib: Path, *extra: str):
    return dgq("quantize", model, "-o", out, "--calib-data", calib, *SMALL, *extra)


@pytest.fixture(scope="module")
def llama_ckpt(tiny_llama, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "llama-dgq"
    result = quantize(tiny_llama, out, corpus_file)
    assert result.exit_code == 0, result.output
    return out


def test_quantize_writes_a_deployable_checkpoint(llama_ckpt):
    config = json.loads((llama_ckpt / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "dgq" and q["format"] == "dgq" and q["bits"] == 4 and q["group_size"] == 32
    assert q["activation"] == "dynamic" and q["format_version"] == 1
    assert (llama_ckpt / "tokenizer.json").is_file()
    tensors = load_file(str(llama_ckpt / "model.safetensors"))
    qweight = tensors["model.layers.0.self_attn.q_proj.qweight"]
    assert qweight.dtype == torch.uint8 and qweight.shape == (64, 32)  # two codes per byte
    assert tensors["model.layers.0.self_attn.q_proj.scales_s2"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.scales_s1"].dtype == torch.float16
    assert tensors["model.layers.0.self_attn.q_proj.weight"].numel() == 0  # format.with_guard's empty guard only
    assert "model.embed_tokens.weight" in tensors  # embeddings stay unquantized


def test_pack_then_load_is_bit_exact(llama_ckpt):
    model, _, _ = load_checkpoint(llama_ckpt)
    search_dir = llama_ckpt.with_name(llama_ckpt.name + ".work") / "search"
    for index in range(2):
        searched = load_file(str(search_dir / f"layer_{index:03d}.safetensors"))
        layer = model.model.layers[index]
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            module = layer.get_submodule(name)
            assert isinstance(module, DGQLinear)
            expected = linear_weight(name, searched)
            got = module.quantized_weight()
            assert torch.equal(got.codes, expected.codes)
            assert torch.equal(got.zero, expected.zero)
            assert torch.equal(got.s2, expected.s2)
            assert torch.equal(got.s1, expected.s1.half().float())


def test_loaded_checkpoint_generates_and_keeps_lm_head_float(llama_ckpt):
    model, tokenizer, _ = load_checkpoint(llama_ckpt)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = tokenizer("the red house", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_rerun_resumes_and_force_redoes(llama_ckpt, tiny_llama, corpus_file):
    before = (llama_ckpt / "model.safetensors").stat().st_mtime_ns
    result = quantize(tiny_llama, llama_ckpt, corpus_file, "--no-verify")
    assert result.exit_code == 0, result.output
    for stage in ("calibrate", "smooth", "search", "pack"):
        assert f"{stage}: " in result.output and "skipped" in result.output
    assert (llama_ckpt / "model.safetensors").stat().st_mtime_ns == before


def test_changed_option_reruns_only_downstream_stages(llama_ckpt, tiny_llama, corpus_file, tmp_path):
    out = tmp_path / "static"
    work = llama_ckpt.with_name(llama_ckpt.name + ".work")
    result = quantize(tiny_llama, out, corpus_file, "-w", work, "--act", "static", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "calibrate: up to date" in result.output and "smooth: up to date" in result.output
    assert "search: up to date" not in result.output
    model, _, q = load_checkpoint(out)
    assert q["activation"] == "static"
    assert model.model.layers[0].self_attn.q_proj.input_scale.item() > 0


def test_calibration_records_channel_maxima_and_the_mean_token_maximum(tiny_llama):
    """Over two batches of different sizes: max |x| per channel and the mean over all tokens of each
    token's max |x|, as computed directly on the concatenated inputs."""
    from transformers import AutoModelForCausalLM

    from dgqtool.models.adapters import adapter_for_model, decoder_layers
    from dgqtool.stages.calibrate import _ChannelMaxima

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapter = adapter_for_model(model)
    stats: dict = {}
    capture = _ChannelMaxima(adapter, stats)
    layer = decoder_layers(model, adapter)[0]
    handles = capture.attach(0, layer)
    group = adapter.inputs[0]
    linear = layer.get_submodule(group.linears[0])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, linear.in_features, generator=gen), torch.randn(1, 3, linear.in_features, generator=gen) * 7]
    with torch.no_grad():
        for x in batches:
            linear(x)
    for h in handles:
        h.remove()
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in batches]).abs()
    key = f"0.{group.linears[0]}"
    assert torch.equal(stats[key], rows.amax(0))
    total, count = capture.token_sums[key]
    assert count == 13 and (total / count).item() == pytest.approx(rows.amax(1).double().mean().item(), rel=1e-12)


def test_static_keeps_massive_token_inputs_per_token(llama_ckpt, tiny_llama, corpus_file, tmp_path):
    """--dynamic-above R: the inputs whose largest calibration token passes R x the mean token's
    abs-max keep per-token scales, the others get a static one; the checkpoint says 'mixed' and
    lists the per-token linears, loads and verifies; the compressed-tensors export names them in a
    per-token config group next to the static one, and loads back with the same split."""
    from dgqtool.models.adapters import adapter_for_model

    work = llama_ckpt.with_name(llama_ckpt.name + ".work")
    stats = load_file(work / "calibrate" / "stats.safetensors")
    ratios = {k.removesuffix(".token_absmax_mean"): (stats[k.replace("token_absmax_mean", "act_absmax")].max() / stats[k]).item()
              for k in stats if k.endswith(".token_absmax_mean")}
    ordered = sorted(ratios.values())
    threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # half the inputs on each side
    assert ordered[0] >= 1 and ordered[0] < threshold < ordered[-1]
    out = tmp_path / "mixed"
    result = quantize(tiny_llama, out, corpus_file, "-w", work, "--act", "static", "--dynamic-above", f"{threshold:.6f}")
    assert result.exit_code == 0, result.output
    model, _, q = load_checkpoint(out)
    groups = {g.linears[0]: g.linears for g in adapter_for_model(model).inputs}
    expected = {f"model.layers.{key.split('.', 1)[0]}.{name}" for key, r in ratios.items() if r > threshold
                for name in groups[key.split(".", 1)[1]]}
    assert q["activation"] == "mixed" and set(q["per_token_linears"]) == expected
    dgq_modules = {n: m for n, m in model.named_modules() if isinstance(m, DGQLinear)}
    assert {n for n, m in dgq_modules.items() if m.input_scale is None} == expected
    assert all(m.input_scale.item() > 0 for n, m in dgq_modules.items() if n not in expected)
    exported = dgq("export", out, "-o", tmp_path / "ct", "--format", "compressed-tensors")
    assert exported.exit_code == 0, exported.output
    from compressed_tensors.quantization import QuantizationConfig

    block = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"])
    static_group, token_group = block.config_groups["group_0"], block.config_groups["group_1"]
    assert not static_group.input_activations.dynamic and token_group.input_activations.dynamic
    assert set(token_group.targets) == expected and set(static_group.targets) == set(dgq_modules) - expected
    back, _, _ = load_checkpoint(tmp_path / "ct")
    assert {n for n, m in back.named_modules() if hasattr(m, "input_scale") and m.input_scale is None} == expected
    assert all(torch.equal(back.get_submodule(n).input_scale, m.input_scale) for n, m in dgq_modules.items() if n not in expected)
    # a foreign writer's targets: "re:" patterns for the per-token group, "Linear" for the rest
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    groups["group_0"]["targets"], groups["group_1"]["targets"] = ["Linear"], [f"re:{n.replace('.', '[.]')}" for n in expected]
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    (tmp_path / "ct" / "dgq_manifest.json").unlink()  # a foreign checkpoint has none
    foreign, _, _ = load_checkpoint(tmp_path / "ct")
    assert {n for n, m in foreign.named_modules() if hasattr(m, "input_scale") and m.input_scale is None} == expected


@pytest.mark.parametrize("method,module_type", [("rtn-dg", DGQLinear), ("groupwise", GroupW4A8Linear), ("rtn", GroupW4A8Linear)])
def test_baseline_methods_pack_and_verify(method, module_type, tiny_llama, corpus_file, tmp_path):
    out = tmp_path / method
    result = quantize(tiny_llama, out, corpus_file, "--method", method, "--grid1", "4", "--grid2", "4")
    assert result.exit_code == 0, result.output
    model, _, q = load_checkpoint(out)
    assert q["method"] == method
    assert isinstance(model.model.layers[1].mlp.up_proj, module_type)


def test_gptq_lowers_the_searched_errors(tiny_llama, corpus_file, tmp_path):
    total = {}
    for name, flag in (("plain", "--no-gptq"), ("gptq", "--gptq")):
        result = quantize(tiny_llama, tmp_path / name, corpus_file, flag, "--no-verify")
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / f"{name}.work" / "search" / "manifest.json").read_text())
        total[name] = sum(row["searched"] for row in manifest["errors"])
    assert total["gptq"] < 0.9 * total["plain"]


def test_stage_by_stage_on_opt(tiny_opt, corpus_file, tmp_path):
    work, out = tmp_path / "work", tmp_path / "opt-dgq"
    steps = [
        ("calibrate", tiny_opt, "-w", work, "--calib-data", corpus_file, "--nsamples", "4", "--seqlen", "64"),
        ("smooth", "-w", work, "--smooth", "smoothquant", "--alpha", "0.5"),
        ("search", "-w", work, "--group", "32", "--grid2", "20"),
        ("pack", "-w", work, "-o", out),
        ("verify", out, "-w", work),
    ]
    for step in steps:
        result = dgq(*step)
        assert result.exit_code == 0, (step[0], result.output)
    assert "integer path = float path" in result.output and "FAIL" not in result.output
    for stage in ("calibrate", "smooth", "search", "pack"):
        manifest = json.loads((work / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["tool_version"] and "fingerprint" in manifest
    model, _, _ = load_checkpoint(out)
    assert isinstance(model.model.decoder.layers[0].fc2, DGQLinear)


def test_per_layer_error_table_is_printed(tiny_llama, corpus_file, tmp_path):
    result = quantize(tiny_llama, tmp_path / "o", corpus_file, "--no-verify")
    assert "relative output error per layer" in result.output
    manifest = json.loads((tmp_path / "o.work" / "search" / "manifest.json").read_text())
    errors = manifest["errors"]
    assert len(errors) == 14  # 2 layers x 7 linears
    assert all(row["searched"] < row["rtn_dg"] for row in errors)


# ------------------------------------------------------------------------------ bad input


def assert_clean_error(result, *fragments: str, code: int = 2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_missing_model_path(tmp_path, corpus_file):
    assert_clean_error(quantize(tmp_path / "nope", tmp_path / "o", corpus_file), "not found")


def test_unsupported_architecture(tmp_path, corpus_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import CORPUS, make_tokenizer

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=200)).save_pretrained(path)
    make_tokenizer(CORPUS).save_pretrained(path)
    assert_clean_error(quantize(path, tmp_path / "o", corpus_file), "unsupported architecture 'gpt2'", "llama", "opt")


def test_group_that_does_not_divide(tiny_llama, corpus_file, tmp_path):
    result = dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--calib-data", corpus_file, "--nsamples", "2",
                 "--seqlen", "32", "--group", "48")
    assert_clean_error(result, "group size 48 does not divide", "--group 64")
    assert not (tmp_path / "o").exists()


def test_nan_activations_are_rejected(tiny_llama, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    model.save_pretrained(broken)
    for f in tiny_llama.glob("tokenizer*"):
        (broken / f.name).write_bytes(f.read_bytes())
    assert_clean_error(quantize(broken, tmp_path / "o", corpus_file), "non-finite calibration activations")


def test_stages_out_of_order(tmp_path):
    assert_clean_error(dgq("search", "-w", tmp_path / "w"), "has not run", "dgq smooth")
    assert_clean_error(dgq("pack", "-w", tmp_path / "w", "-o", tmp_path / "o"), "has not run")


def test_truncated_artifact_is_detected(tiny_llama, corpus_file, tmp_path):
    work = tmp_path / "w"
    assert dgq("calibrate", tiny_llama, "-w", work, "--calib-data", corpus_file, "--nsamples", "2", "--seqlen", "32").exit_code == 0
    stats = work / "calibrate" / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:100])
    assert_clean_error(dgq("smooth", "-w", work), "does not match its manifest")


def test_bad_options_and_calibration_text(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_clean_error(dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--calib-data", short), "fewer than one window")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    assert_clean_error(dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--calib-data", binary), "binary")
    assert_clean_error(dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--method", "gptq"), "'gptq' is not one of")
    assert_clean_error(dgq("quantize", tiny_llama, "-o", tmp_path / "o", "--calib-data", tmp_path / "missing.txt"), "not found")


def test_verify_fails_on_a_tampered_checkpoint(llama_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.scales_s2"][0, 0] = 127  # overflows int8 for most codes
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_error(dgq("verify", bad), "does not match the hash", code=3)
    manifest = json.loads((bad / "dgq_manifest.json").read_text())
    from dgqtool.artifacts import sha256_file

    manifest["files"]["model.safetensors"] = sha256_file(bad / "model.safetensors")
    (bad / "dgq_manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(dgq("verify", bad), "exceeds 127", code=3)


def test_verify_rejects_a_non_checkpoint(tiny_llama):
    assert_clean_error(dgq("verify", tiny_llama), "not a dgq checkpoint", code=3)


def test_shipped_configs_load():
    from dgqtool.recipe import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    recipes = {path.stem: load_config(str(path)) for path in configs}
    assert recipes["smollm2-g64-gptq"].gptq and recipes["smollm2-g64-gptq"].group == 64
    assert not recipes["smollm2-g64"].gptq
    assert recipes["smollm2-g64-capped"].max_column_growth == 1.0


def test_dynamic_above_needs_static_activations(tiny_llama, corpus_file, tmp_path):
    """--dynamic-above without --act static: one error line, exit 2, before any stage runs; the
    default recipe (which sets --act-order) still runs with --no-gptq (nothing to order)."""
    result = quantize(tiny_llama, tmp_path / "out", corpus_file, "-w", tmp_path / "w", "--dynamic-above", "4")
    assert result.exit_code == 2 and "add --act static" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "w" / "calibrate").exists()
    from dgqtool import recipe as r

    plain = r.preset(r.DEFAULT_PRESET).with_overrides(gptq=False)
    assert plain.act_order and not plain.gptq
    plain.validate()


def test_named_recipes_are_the_base_that_configs_and_flags_override(monkeypatch, tmp_path):
    """--recipe NAME (or a config's `recipe:`) sets its fields, the file's other keys and the flags
    override them; every shipped config names `recipe: paper`, so flipping DEFAULT_PRESET changes
    only runs that name no recipe. The default is the best row of the all-windows table:
    --rotate hadamard (auto) --gptq --max-column-growth 1."""
    from dgqtool import recipe as r
    from dgqtool.errors import DGQError

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    default = r.load_config(None)
    assert (default.recipe, default.rotate, default.gptq, default.max_column_growth) == ("rotate-capped-gptq", "auto", True, 1.0)
    assert r.load_config(None, "paper") == r.Recipe() and r.Recipe().recipe == "paper" and not r.Recipe().gptq
    rotated = r.load_config(None, "rotate-gptq")
    assert (rotated.recipe, rotated.rotate, rotated.gptq, rotated.max_column_growth) == ("rotate-gptq", "auto", True, None)
    capped = r.load_config(str(configs[0].with_name("smollm2-g64.yaml")), "rotate-capped-gptq")  # the file says paper
    assert (capped.rotate, capped.gptq, capped.max_column_growth, capped.group) == ("auto", True, 1.0, 64)
    (tmp_path / "mine.yaml").write_text("recipe: rotate-gptq\ngroup: 64\ngptq: false\n")
    mine = r.load_config(str(tmp_path / "mine.yaml"))
    assert (mine.rotate, mine.gptq, mine.group) == ("auto", False, 64)
    assert r.load_config(str(tmp_path / "mine.yaml"), "paper").rotate == "none"
    with pytest.raises(DGQError, match="--recipe must be one of paper, rotate-gptq, rotate-capped-gptq, rotate-online-capped-gptq; got 'best'"):
        r.load_config(None, "best")
    before = {path.stem: r.load_config(str(path)) for path in configs}
    with pytest.raises(DGQError, match="recipe rotate-capped-gptq sets it; --recipe rotate-gptq or paper has none"):
        default.with_overrides(act="static").validate()
    monkeypatch.setattr(r, "DEFAULT_PRESET", "rotate-gptq")
    assert r.load_config(None) == rotated
    assert {path.stem: r.load_config(str(path)) for path in configs} == before
    assert all(recipe.recipe == "paper" for recipe in before.values())


def test_capped_smoothing_keeps_every_column_within_the_cap(tiny_llama, corpus_file, tmp_path):
    work = tmp_path / "w"
    assert dgq("calibrate", tiny_llama, "-w", work, "--calib-data", corpus_file, *SMALL[:4], "--recipe", "paper").exit_code == 0
    stats = load_file(work / "calibrate" / "stats.safetensors")

    def smoothing(*flags: str) -> dict[str, torch.Tensor]:
        result = dgq("smooth", "-w", work, "--percentile", "10", "--recipe", "paper", *flags)  # 0.5 % of 64 channels is only the top one
        assert result.exit_code == 0, result.output
        return {n: k for n, k in load_file(work / "smooth" / "scales.safetensors").items() if n.endswith(".smooth")}

    free, capped = smoothing(), smoothing("--max-column-growth", "1")
    assert any(bool((capped[n] < free[n]).any()) for n in free)  # the tiny model's 30x outliers reach the cap
    for name, k in capped.items():
        w = stats[name.replace(".smooth", ".weight_absmax")]
        assert bool((k <= free[name]).all())
        assert bool(((w * k <= w.max() * (1 + 1e-6)) | (k == 1)).all())
    assert dgq("smooth", "-w", work, "--max-column-growth", "0").exit_code != 0
