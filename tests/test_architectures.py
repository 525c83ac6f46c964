"""Every family of the adapter table on a tiny model built from its transformers config (2 layers,
small widths, 4 experts for MoE): capture = the model's own forward, smoothing exact in fp32, and
`dgq quantize` -> `verify` -> `eval` -> `export` end to end with the right compressed-tensors ignore list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import CORPUS, make_tokenizer
from dgqtool.calib.capture import run_layers
from dgqtool.cli import app
from dgqtool.errors import DGQError
from dgqtool.models.adapters import ADAPTERS, adapter_for, adapter_for_model, can_fold, decoder_layers, supported_architectures
from dgqtool.models.load import load_model
from dgqtool.models.moe import ExpertLinears
from dgqtool.stages.smooth import apply_smoothing
from smoothing_scales import random_smoothing_scales

runner = CliRunner()
# The paper recipe: these tests are about the CLI, not the default recipe (tests/test_rotate.py runs that).
SMALL = ["--nsamples", "4", "--seqlen", "64", "--group", "32", "--recipe", "paper"]
ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (config class, config kwargs, smoothing pairs that fold per layer, modules left in float)
ARCHS = {
    # Llama-3.x: GQA (v -> o skipped), llama3 rope scaling, untied embeddings
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=ROPE_LLAMA3, tie_word_embeddings=False), 3),
    # Qwen2.5: q/k/v biases, no GQA so v -> o (with v's bias) folds too
    "qwen2.5": ("Qwen2Config", dict(num_key_value_heads=4, tie_word_embeddings=True), 4),
    # Qwen3: q_norm / k_norm, head_dim 32 != hidden / heads
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=4, head_dim=32, tie_word_embeddings=True), 4),
    # Phi-3: fused qkv_proj and gate_up_proj; v and up are their last row blocks
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, tie_word_embeddings=False), 4),
    # Gemma 2: (1 + w) norms, sqrt(hidden) embedding scale, soft-capping, sliding window of 8 < seqlen
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=4, head_dim=16, sliding_window=8, final_logit_softcapping=30.0,
                                    attn_logit_softcapping=50.0, query_pre_attn_scalar=16), 4),
    # Gemma 3: also q_norm / k_norm and separate local / global rotary tables
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                        layer_types=["sliding_attention", "full_attention"]), 3),
    # Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration): the language model quantized
    "gemma3-mm": ("Gemma3Config", dict(text_config=dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                        query_pre_attn_scalar=16,
                                                        layer_types=["sliding_attention", "full_attention"]),
                                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=28, patch_size=14),
                                       mm_tokens_per_image=4, image_token_index=199), 3),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=64), 2 + 4),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=4, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64, norm_topk_prob=True), 3 + 4),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=64), 3 + 4),
}
IGNORE = {"gemma3-mm": ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"],
          "mixtral": ["lm_head", "re:.*mlp.gate$"], "qwen3_moe": ["lm_head", "re:.*mlp.gate$"],
          "qwen2_moe": ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]}
MOE = ("mixtral", "qwen3_moe", "qwen2_moe")


def _outliers(model, offset: float):
    """A few activation channels 30x larger than the rest, through the norms that feed linears
    (norms computing x_hat * (offset + w) get w = 30 - offset there)."""
    gen = torch.Generator().manual_seed(1)
    adapter = adapter_for(model.config.model_type)
    producers = {g.producer for g in adapter.inputs if g.producer and "{e}" not in g.producer}
    with torch.no_grad():
        for layer in decoder_layers(model, adapter):
            for name in producers:
                module = layer.get_submodule(name)
                if module.weight.dim() == 1:
                    idx = torch.randperm(module.weight.numel(), generator=gen)[:2]
                    module.weight[idx] = (module.weight[idx] + offset) * 30.0 - offset


def build(arch: str, path: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    tokenizer = make_tokenizer(CORPUS)
    cls, kwargs, _ = ARCHS[arch]
    if "text_config" in kwargs:  # a multimodal config: the text model's sizes go into text_config
        kwargs = kwargs | {"text_config": COMMON | {"vocab_size": len(tokenizer)} | kwargs["text_config"]}
        config = getattr(transformers, cls)(**kwargs)
    else:
        config = getattr(transformers, cls)(vocab_size=len(tokenizer), **(COMMON | kwargs))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms initialised to their identity would hide a wrong fold
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and "vision" not in name:
                p.add_(0.1 * torch.randn_like(p))
    _outliers(model, adapter_for(config.model_type).norm_offset)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param.replace(".", "_")))


def _tokens(model, n=2, length=24):
    vocab = model.config.get_text_config().vocab_size - 8  # clear of a multimodal model's image tokens
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_every_family_is_in_the_table():
    for name, (cls, _, _) in ARCHS.items():
        import transformers

        assert getattr(transformers, cls).model_type in ADAPTERS, name


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(DGQError) as err:
        adapter_for("gpt_neox")
    for model_type in ("llama", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe"):
        assert model_type in str(err.value)


def test_supported_list_renders_every_entry():
    text = supported_architectures()
    for model_type in ADAPTERS:
        assert f"`{model_type}`" in text
    assert "Gemma 2" in text and "Mixtral" in text and "re:.*mlp.gate$" in text


def test_capture_reproduces_the_full_forward(arch):
    """Layer by layer on recorded inputs == the model's forward: per-layer masks and rotary tables
    (sliding vs global layers) and MoE all-expert capture must not change any hidden state."""
    name, path = arch
    model, _, _ = load_model(str(path))
    adapter = adapter_for_model(model)
    tokens = _tokens(model, 3)
    with torch.no_grad():
        expected = model(input_ids=tokens, output_hidden_states=True).hidden_states

    seen: dict[int, list] = {}

    class Visitor:
        def attach(self, index, layer):
            return [layer.register_forward_pre_hook(lambda m, a: seen.setdefault(index, []).append(a[0].clone()))]

        def finish(self, index, layer):
            return False

    routed = run_layers(model, adapter, tokens, Visitor(), "cpu", batch_size=2)
    for index in (0, 1):
        torch.testing.assert_close(torch.cat(seen[index]), expected[index], rtol=1e-5, atol=1e-5)
    if name in MOE:
        assert sorted(routed) == [0, 1] and all(len(c) == 4 for c in routed.values())
        assert all(sum(c) == tokens.numel() * 2 for c in routed.values())  # top-2 of every token
    else:
        assert routed == {}


def test_smoothing_is_exact_in_fp32(arch):
    name, path = arch
    model, _, _ = load_model(str(path))
    adapter = adapter_for_model(model)
    tokens = _tokens(model)
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    scales = random_smoothing_scales(model, adapter)
    assert len(scales) == 2 * ARCHS[name][2]  # the pairs the table says fold, in both layers
    apply_smoothing(model, adapter, scales)
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    assert float((after - before).norm() / before.norm()) < 1e-4


def _dgq(*args):
    result = runner.invoke(app, ["--json", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_quantize_verify_eval_export(arch, corpus_file, tmp_path):
    from dgqtool.checkpoint import fuse_for_inference, load_checkpoint, load_compressed_tensors
    from dgqtool.nn.dgq_linear import DGQLinear, _W4A8Linear

    name, path = arch
    out = tmp_path / "ckpt"
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    (data / "wiki.test.raw").write_text(corpus_file.read_text())
    _dgq("quantize", path, "-o", out, "--calib-data", corpus_file, *SMALL, "--no-verify")
    verify = _dgq("verify", out, "--work", f"{out}.work", "--max-ppl-increase", "50", "--ppl-limit", "2",
                  "--ppl-seqlen", "64", "--data-dir", tmp_path / "data")
    assert verify["status"] == "ok"
    ev = _dgq("eval", out, "--task", "wikitext2", "--limit", "2", "--seqlen", "64", "--data-dir", tmp_path / "data")
    assert ev["tasks"]["wikitext2"]["windows"] == 2
    export = _dgq("export", out, "--format", "compressed-tensors", "-o", tmp_path / "ct")
    assert export["status"] == "ok"

    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == IGNORE.get(name, ["lm_head"])
    model, tokenizer, q = load_checkpoint(out)
    adapter = adapter_for_model(model)
    quantized = {n for n, m in model.named_modules() if isinstance(m, _W4A8Linear)}
    layers_prefix = adapter.layers
    expected = {f"{layers_prefix}.{i}.{n}" for i in range(2) for n in adapter.linear_names()}
    assert quantized == expected
    assert all(isinstance(model.get_submodule(n), DGQLinear) for n in expected)
    assert isinstance(model.lm_head, torch.nn.Linear)
    if name in MOE:
        assert len([n for n in expected if ".experts." in n]) == 2 * 4 * 3  # every expert's three linears
        for layer in decoder_layers(model, adapter):
            assert isinstance(layer.mlp.experts, ExpertLinears)
            assert not isinstance(layer.mlp.gate, _W4A8Linear)  # router in float
        manifest = json.loads((Path(f"{out}.work") / "calibrate" / "manifest.json").read_text())
        assert sorted(manifest["expert_tokens"]) == ["0", "1"]
        assert all(sum(c) == 4 * 64 * 2 for c in manifest["expert_tokens"].values())
    # unquantized tensors come back as they were; the quantized model stays close to the float one
    reference, _, _ = load_model(str(path))
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    ids = _tokens(model, 2, 64)
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 0.5
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.5
    # the exported checkpoint loads back with the same codes
    exported, _, _ = load_compressed_tensors(tmp_path / "ct")
    some = sorted(expected)[-1]
    assert torch.equal(model.get_submodule(some).qweight, exported.get_submodule(some).qweight)
    # fusing the shared-input groups (per expert for MoE) leaves the outputs bit-identical
    ids = _tokens(model, 1, 16)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        fused = fuse_for_inference(model)(input_ids=ids).logits
    assert torch.isfinite(plain).all() and torch.equal(plain, fused)


def test_moe_capture_gives_every_expert_every_token(tmp_path):
    """With top-1 routing and a router that sends everything to expert 0, experts 1-3 get no routed
    token, yet each expert's gate_proj sees every token during capture."""
    path = build("mixtral", tmp_path / "m")
    model, _, _ = load_model(str(path))
    model.config.num_experts_per_tok = 1
    adapter = adapter_for_model(model)
    with torch.no_grad():
        for layer in decoder_layers(model, adapter):
            layer.mlp.gate.top_k = 1
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[0] = 1e-3  # a tiny bias towards expert 0 for every token
            layer.mlp.gate.weight[0, ::2] *= -1
    tokens = _tokens(model, 2, 16)
    seen = {}

    class Visitor:
        def attach(self, index, layer):
            return [layer.get_submodule(f"mlp.experts.{e}.down_proj").register_forward_pre_hook(
                lambda m, a, e=e: seen.__setitem__((index, e), seen.get((index, e), 0) + a[0].shape[0]))
                for e in range(4)]

        def finish(self, index, layer):
            return False

    routed = run_layers(model, adapter, tokens, Visitor(), "cpu", batch_size=2)
    assert all(sum(c) == tokens.numel() for c in routed.values())
    assert any(0 in c for c in routed.values())  # some expert got no routed token
    assert all(count == tokens.numel() for count in seen.values()) and len(seen) == 8


@pytest.mark.parametrize("method,gptq", [("dgq", False), ("dgq", True), ("groupwise", False), ("rtn-dg", False)])
def test_stacked_search_equals_one_search_per_linear(method, gptq, monkeypatch):
    """The search runs a group's linears (all experts' gate/up) as stacked rows: bit-identical
    parameters and the same per-linear errors as one call per linear, also when the stack splits."""
    from dgqtool.quant import search
    from dgqtool.quant.quantizer import fake_quantize_activations

    gen = torch.Generator().manual_seed(0)
    h = 128
    x = torch.randn(256, h, generator=gen) * (1 + 10 * (torch.rand(h, generator=gen) > 0.97))
    moments = search.accumulate_moments(x, lambda t: fake_quantize_activations(t, None), None)
    weights = [torch.randn(rows, h, generator=gen) for rows in (32, 64, 32, 96)]
    options = dict(method=method, group=32, grid1=8, grid2=16, gptq=gptq)
    monkeypatch.setattr(search, "STACK_ELEMENTS", 160 * h)  # splits into [32, 64, 32], [96]
    stacked = search.quantize_weights(weights, moments, **options)
    for w, got in zip(weights, stacked):
        want = search.quantize_weight(w, moments, **options)
        for field in ("codes", "zero", "s2", "s1", "scale"):
            if hasattr(want.weight, field):
                assert torch.equal(getattr(got.weight, field), getattr(want.weight, field)), field
        assert got.error == pytest.approx(want.error, rel=1e-6) and got.error_rtn == pytest.approx(want.error_rtn, rel=1e-6)


def test_docs_list_is_generated_from_the_table():
    text = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    generated = text.split("<!-- generated: supported_architectures() -->\n")[1].split("<!-- end generated -->")[0]
    assert generated.strip() == supported_architectures().strip(), "regenerate docs/architectures.md"


@pytest.mark.parametrize("cls,kwargs", [("Phi3Config", {}), ("Gemma2Config", dict(head_dim=16)),
                                        ("Qwen2Config", {})])
def test_grouped_query_attention_skips_v_to_o(cls, kwargs):
    """Under GQA, v (or fused qkv's last third) is narrower than o's input: that pair is skipped,
    the others still fold exactly."""
    import transformers

    config = getattr(transformers, cls)(vocab_size=64, **(COMMON | kwargs | dict(num_key_value_heads=2)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = adapter_for_model(model)
    layer = decoder_layers(model, adapter)[0]
    folds = [can_fold(layer, group) for group in adapter.inputs]
    assert folds == [True, False, True, True]


def test_moe_layers_without_experts_are_refused():
    import transformers

    config = transformers.Qwen3MoeConfig(vocab_size=64, **(COMMON | dict(num_experts=4, num_experts_per_tok=2,
                                                                            moe_intermediate_size=32, mlp_only_layers=[0])))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(DGQError, match="layers without experts"):
        adapter_for_model(model)
