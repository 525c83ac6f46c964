"""`dgq run`: the integer path generates exactly what the dequantized float model generates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from dgqtool.checkpoint import load_checkpoint
from dgqtool.cli import app
from dgqtool.nn.dgq_linear import DGQLinear
from dgqtool.quant.quantizer import fake_quantize_activations
from dgqtool.run import generate

runner = CliRunner()


class FloatReference(torch.nn.Module):
    """fake-quantized activations x dequantized weights, in float: what DGQ's integers stand for."""

    def __init__(self, module: DGQLinear):
        super().__init__()
        self.weight = module.quantized_weight().dequantize()
        self.bias, self.input_scale = module.bias, module.input_scale

    def forward(self, x):
        weight = self.weight.to(x.dtype)  # fp16 when the checkpoint was quantized on a GPU
        return torch.nn.functional.linear(fake_quantize_activations(x, self.input_scale), weight, self.bias)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    result = runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(out), "--calib-data", str(corpus_file),
                                 "--nsamples", "4", "--seqlen", "64", "--group", "32", "--recipe", "paper", "--no-verify"])
    assert result.exit_code == 0, result.output
    return out


def test_greedy_tokens_equal_the_dequantized_float_model(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    reference, _, _ = load_checkpoint(checkpoint)
    swapped = 0
    for name, module in list(reference.named_modules()):
        if isinstance(module, DGQLinear):
            reference.set_submodule(name, FloatReference(module))
            swapped += 1
    assert swapped == 14
    ours = generate(model, tokenizer, "the red house of the", max_new_tokens=12)
    theirs = generate(reference, tokenizer, "the red house of the", max_new_tokens=12)
    assert ours.new_tokens == 12
    assert ours.text == theirs.text


def test_run_command_streams_and_reports_speed(checkpoint):
    result = runner.invoke(app, ["run", str(checkpoint), "--prompt", "the old river", "-n", "5"])
    assert result.exit_code == 0, result.output
    assert "first token after" in result.output and "decode" in result.output and "tokens/s" in result.output
    assert "peak memory" in result.output


def test_first_token_and_decode_are_timed_apart_after_a_warm_up(checkpoint, monkeypatch):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(k["max_new_tokens"]) or real(*a, **k))
    result = generate(model, tokenizer, "the red house of the", max_new_tokens=8)
    assert calls == [2, 8]  # the untimed warm-up, then the timed run
    assert 2 < result.new_tokens <= 8
    assert 0 < result.first_token_seconds and 0 < result.decode_seconds
    assert result.decode_tokens_per_second == pytest.approx((result.new_tokens - 2) / result.decode_seconds)
    short = generate(model, tokenizer, "the red house of the", max_new_tokens=2)
    assert short.decode_tokens_per_second is None and "too few tokens" in short.summary()


def test_the_streamer_stops_at_the_end_of_sequence_token():
    """The CUDA graph decoder keeps stepping past end-of-sequence: neither the text nor the clock
    may go on with what follows it."""
    from dgqtool.run import _TokenClock

    class Sink:
        def __init__(self):
            self.seen = []

        def put(self, value):
            self.seen.append(value.tolist())

        def end(self):
            self.seen.append("end")

    sink = Sink()
    clock = _TokenClock(sink, stop=frozenset({2, 3}))
    for value in ([[7, 8, 9]], [5], [3], [6], [2]):  # the prompt, then tokens: 3 is one of two end ids
        clock.put(torch.tensor(value))
    clock.end()
    assert sink.seen == [[[7, 8, 9]], [5], [3], "end"] and len(clock.times) == 2


def test_end_tokens_join_the_tokenizer_and_the_generation_config():
    from types import SimpleNamespace

    from dgqtool.run import end_tokens

    tokenizer = SimpleNamespace(eos_token_id=2)
    assert end_tokens(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 9, 11])), tokenizer) == {2, 9, 11}
    assert end_tokens(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tokenizer) == {2}
    assert end_tokens(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == frozenset()


ONLINE_DAMAGE = {  # rotation.online (v: its format_version, else 2) -> the error: a bad order, a linear the
    # model lacks, factors the tensors lack, a layout of the other version
    "online_order": ({"linears": ["mlp.down_proj"], "paley_order": 1, "sylvester_order": 3}, "must be a power of two"),
    "online_linear": ({"linears": ["mlp.gate"], "paley_order": 1, "sylvester_order": 64}, "names mlp.gate, which is no"),
    "online_tensors": ({"linears": ["mlp.down_proj"], "paley_order": 1, "sylvester_order": 64},
                       "tensor model.layers.0.mlp.down_proj.online_signs is missing"),
    "online_paley": ({"linears": ["mlp.down_proj"], "paley_order": 3, "sylvester_order": 64}, "paley_order 3 has no Paley"),
    "online_version": ({"linears": ["mlp.down_proj"], "paley_order": 1, "sylvester_order": 64, "v": 1},
                       "rotation.online needs format_version 2 or 3"),
    "online_v3_layout": ({"linears": ["mlp.down_proj"], "paley_order": 1, "sylvester_order": 64, "v": 3},
                         "at format_version 3"),
    "online_v2_layout": ({"linears": {"mlp.down_proj": {"paley_order": 1, "sylvester_order": 64}}}, "at format_version 2"),
    "online_v3_order": ({"linears": {"mlp.down_proj": {"paley_order": 1, "sylvester_order": 48}}, "v": 3},
                        "mlp.down_proj's sylvester_order must be a power of two"),
    "rotation_type": ("hadamard", "rotation must be an object"),
}


@pytest.mark.parametrize("damage", ["missing_dir", "missing_tensor", "format_version", *ONLINE_DAMAGE])
def test_run_rejects_bad_checkpoints(checkpoint, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from dgqtool.artifacts import sha256_file

    bad = tmp_path / "bad"
    if damage != "missing_dir":
        shutil.copytree(checkpoint, bad)
    if damage == "missing_tensor":
        tensors = load_file(str(bad / "model.safetensors"))
        del tensors["model.layers.1.mlp.down_proj.scales_s2"]
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    elif damage == "format_version":
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"]["format_version"] = 99
        (bad / "config.json").write_text(json.dumps(config))
    elif damage in ONLINE_DAMAGE:
        config = json.loads((bad / "config.json").read_text())
        online = ONLINE_DAMAGE[damage][0]
        q = config["quantization_config"]
        q["rotation"] = online if damage == "rotation_type" else {"kind": "none", "seed": 0, "online": online}
        q["format_version"] = online.pop("v", 2) if isinstance(online, dict) else 2
        (bad / "config.json").write_text(json.dumps(config))
    if damage in ("missing_tensor", "online_linear", "online_tensors"):  # re-hashed: past the manifest check
        manifest = json.loads((bad / "dgq_manifest.json").read_text())
        manifest["files"].update({name: sha256_file(bad / name) for name in ("model.safetensors", "config.json")})
        (bad / "dgq_manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2, result.output
    expected = {"missing_dir": "not found", "missing_tensor": "scales_s2", "format_version": "format version 99",
                **{k: message for k, (_, message) in ONLINE_DAMAGE.items()}}[damage]
    assert expected in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_norms_on_the_gpu_stay_within_rounding_of_the_unfused_model(checkpoint):
    """On the kernel path the norms computed inside the fused linears (their own 1 / rms, a few ulp
    from torch's) and the MLP activation inside down_proj move fp16 logits by rounding only."""
    from dgqtool.checkpoint import fuse_for_inference
    from dgqtool.nn.fused import GatedMLPInLinears, NormInLinears

    model, _, _ = load_checkpoint(checkpoint, "cuda")
    model.half()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        unfused = model(input_ids=ids).logits.float()
        fused = fuse_for_inference(model)
        got = fused(input_ids=ids).logits.float()
    assert sum(isinstance(m, NormInLinears) for m in fused.modules()) == 4
    assert sum(isinstance(m, GatedMLPInLinears) for m in fused.modules()) == 2
    assert (got - unfused).norm() <= 5e-2 * unfused.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_matches_generate_on_the_kernel_path(checkpoint):
    """Greedy tokens from the captured-graph decoder (fused kernels, static cache) equal generate()."""
    from dgqtool.run import graph_decode

    model, tokenizer, _ = load_checkpoint(checkpoint, "cuda")
    model.half()
    ids = tokenizer("the red house of the old river", return_tensors="pt").input_ids.cuda()
    graph_tokens = graph_decode(model, ids, 12)[0]
    eager = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           min_new_tokens=12, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert torch.equal(graph_tokens, eager)


@pytest.fixture(scope="module")
def static_opt_checkpoint(tiny_opt, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_opt") / "ckpt"
    result = runner.invoke(app, ["quantize", str(tiny_opt), "-o", str(out), "--calib-data", str(corpus_file),
                                 "--nsamples", "4", "--seqlen", "64", "--group", "32", "--act", "static", "--recipe", "paper", "--no-verify"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("which,fused_groups,norms,mlps", [("checkpoint", 4, 4, 2), ("static_opt_checkpoint", 2, 0, 0)])
def test_fused_projections_give_bit_identical_logits(request, which, fused_groups, norms, mlps):
    """q/k/v and gate/up as one GEMM each (LLaMA; OPT has q/k/v only, with biases and static scales),
    LLaMA's RMSNorms computed inside them and its MLP activation inside down_proj (OPT's LayerNorms
    and ReLU MLP stay)."""
    from dgqtool.checkpoint import fuse_for_inference
    from dgqtool.nn.fused import GatedMLPInLinears, NormInLinears, ProjectionSlice

    path = request.getfixturevalue(which)
    model, _, _ = load_checkpoint(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    linears_before = sum(isinstance(m, DGQLinear) for m in model.modules())
    fused = fuse_for_inference(model)
    slices = [m for m in fused.modules() if isinstance(m, ProjectionSlice)]
    assert len({id(s.shared) for s in slices}) == fused_groups
    assert sum(isinstance(m, NormInLinears) for m in fused.modules()) == norms
    assert sum(isinstance(m, GatedMLPInLinears) for m in fused.modules()) == mlps
    assert sum(isinstance(m, DGQLinear) for m in fused.modules()) == linears_before - len(slices) + fused_groups
    assert torch.equal(fused(input_ids=ids).logits, expected)
    assert all(s.shared._output is None for s in slices)  # nothing held between calls
