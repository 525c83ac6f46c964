"""Rotations (quant/rotate.py) and their fold into models (models/rotation.py): exact checks."""

import json

import pytest
import torch

from dgqtool.errors import DGQError
from dgqtool.models.adapters import adapter_for
from dgqtool.models.rotation import rotate_model
from dgqtool.quant.quantizer import fake_quantize_activations
from dgqtool.quant.rotate import block_order, hadamard, random_hadamard, random_orthogonal
from dgqtool.quant.search import accumulate_moments, quantize_weight


@pytest.mark.parametrize("n", [2, 12, 20, 28, 36, 48, 60, 64, 576, 896, 1536])
def test_hadamard_orders(n):
    """Sylvester (64), Paley I (12, 20, 48, 60), Paley II (28, 36) and Kronecker products
    (576 = 36 * 16, 896 = 28 * 32, 1536 = 12 * 128): +-1 entries with H H^T = n I."""
    h = hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_without_a_hadamard_order_the_rotation_is_block_diagonal():
    # 92 = 4 * 23: no Paley order times a power of two; the largest constructible divisor is 4
    with pytest.raises(ValueError, match="order 92"):
        hadamard(92)
    assert block_order(92) == 4 and block_order(576) == 576
    q = random_hadamard(92, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(92, dtype=torch.float64), atol=1e-12)
    assert (q[:4, 4:] == 0).all() and (q[:4, :4].abs() == 0.5).all()


def test_rotations_are_orthogonal_and_seeded():
    for make in (random_hadamard, random_orthogonal):
        q = make(48, seed=0)
        assert torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
        assert torch.equal(q, make(48, seed=0)) and not torch.equal(q, make(48, seed=1))


def _tiny(kind: str):
    """Tiny models of the three RMSNorm families, with non-trivial norm weights and biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=96, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64)
    if kind == "llama":  # tied head, hidden 48 = Paley 12 x 4, head_dim 12
        model = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                                             tie_word_embeddings=True, **common))
    elif kind == "mistral":  # grouped-query attention: 4 query heads share 2 value heads
        model = MistralForCausalLM(MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=False, **common))
    else:  # q/k/v biases; hidden 40 = Paley 20 x 2, head_dim 10 has no Hadamard order (blocks of 2)
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True, **common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand_like(param) * 2 + 0.2)
                param[:2] *= 20  # outlier channels
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_model_computes_the_same_logits(family, kind):
    model = _tiny(family)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        embedding = model.model.embed_tokens.weight.clone()
        rotate_model(model, adapter_for(model.config.model_type), kind, seed=0)
        after = model(input_ids=ids).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    # the rotation really happened: embeddings moved, every norm weight is now 1, the head is its own tensor
    assert (model.model.embed_tokens.weight - embedding).abs().max() > 0.1
    assert all(bool((p == 1).all()) for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rotation_on_the_gpu_gives_the_cpu_weights():
    """The float64 GEMMs of the fold run on the GPU (a 7B model's take minutes on a CPU); the
    weights stay on the CPU and come out as the CPU fold's."""
    cpu, gpu = _tiny("qwen2"), _tiny("qwen2")
    rotate_model(cpu, adapter_for("qwen2"), "hadamard", seed=0)
    rotate_model(gpu, adapter_for("qwen2"), "hadamard", seed=0, device="cuda")
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert b.device.type == "cpu" and torch.allclose(a, b, rtol=0, atol=1e-6), name


def test_rotate_none_leaves_the_model_and_other_families_are_refused():
    model = _tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rotate_model(model, adapter_for("llama"), "none", seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(DGQError, match="one of none, hadamard, random"):
        rotate_model(model, adapter_for("llama"), "givens", seed=0)
    with pytest.raises(DGQError, match="RMSNorm"):
        rotate_model(model, adapter_for("opt"), "hadamard", seed=0)


def test_rotation_lowers_the_searched_error_on_outlier_channels():
    """Four activation channels 50x the rest: per-token int8 then loses every other channel, an
    error no weight code can undo. Rotating X -> X Q, W -> W Q spreads the outliers; what is left
    is the 4-bit weight error, which the search alone barely lowers and GPTQ's feedback cuts
    (the real model's pattern: rotation pays off with GPTQ)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen)
    x[:, :4] *= 50
    w = torch.randn(96, 128, generator=gen) * 0.05
    q = random_hadamard(128, seed=0).float()
    errors = {}
    for name, (xs, ws) in {"plain": (x, w), "rotated": (x @ q, w @ q)}.items():
        moments = accumulate_moments(xs, fake_quantize_activations, None)
        for gptq in (False, True):
            result = quantize_weight(ws, moments, group=32, grid1=10, grid2=20, gptq=gptq)
            errors[name, gptq] = result.error
    assert errors["rotated", False] < 0.9 * errors["plain", False], errors
    assert errors["rotated", True] < 0.2 * errors["plain", True], errors
    assert errors["plain", True] > 0.7 * errors["plain", False], errors  # the int8 floor binds GPTQ


def test_rotated_checkpoint_verifies_and_round_trips(tiny_llama, tiny_opt, corpus_file, tmp_path):
    """`--recipe rotate-gptq` (Hadamard + GPTQ) end to end on the tied tiny LLaMA: quantize + verify
    (integer = float path, logits against the unrotated original), the packed codes load back
    bit-exact, the checkpoint says it is rotated with nothing to apply at run time, and its
    compressed-tensors export loads back untied with the same codes and outputs."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from dgqtool.checkpoint import load_checkpoint, load_compressed_tensors
    from dgqtool.cli import app
    from dgqtool.format import linear_weight

    out = tmp_path / "rotated"
    common = ["--calib-data", str(corpus_file), "--nsamples", "4", "--seqlen", "64", "--group", "32", "--grid1", "4", "--grid2", "4"]
    # no --recipe: the default, rotate-capped-gptq, rotates (auto: LLaMA has an RMSNorm stream)
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(out), *common, "--export", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    stages = {name: json.loads((out.with_name("rotated.work") / name / "manifest.json").read_text())
              for name in ("calibrate", "smooth", "search")}
    assert (stages["calibrate"]["options"]["rotate"], stages["calibrate"]["rotation"]) == ("auto", "hadamard")
    assert stages["smooth"]["options"]["max_column_growth"] == 1.0 and stages["search"]["options"]["gptq"] is True
    assert "logits vs original" in result.output and "fail" not in result.output.lower()
    model, tokenizer, q = load_checkpoint(out)
    assert q["rotation"] == {"kind": "hadamard", "seed": 0, "online": "none"}
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert bool((model.model.norm.weight == 1).all())  # folded into lm_head
    searched = load_file(str(out.with_name("rotated.work") / "search" / "layer_001.safetensors"))
    for name in ("self_attn.v_proj", "mlp.down_proj"):
        expected, got = linear_weight(name, searched), model.model.layers[1].get_submodule(name).quantized_weight()
        assert torch.equal(got.codes, expected.codes) and torch.equal(got.s2, expected.s2)
    export = out.with_name("rotated-compressed-tensors")
    assert "lm_head.weight" in load_file(str(export / "model.safetensors"))  # stored untied
    exported, _, _ = load_compressed_tensors(export)
    assert exported.config.tie_word_embeddings is False and bool((exported.model.norm.weight == 1).all())
    assert exported.lm_head.weight.data_ptr() != exported.model.embed_tokens.weight.data_ptr()
    assert torch.equal(exported.lm_head.weight, model.lm_head.weight)
    assert torch.equal(exported.model.layers[1].mlp.down_proj.qweight, model.model.layers[1].mlp.down_proj.qweight)
    ids = tokenizer("the red house of the old river is open", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits.float(), exported(ids).logits.float()
    assert torch.equal(a.argmax(-1), b.argmax(-1)) and (a - b).norm() / a.norm() < 1e-2
    refused = CliRunner().invoke(app, ["quantize", str(tiny_opt), "-o", str(tmp_path / "opt"), *common, "--rotate", "hadamard"])
    assert refused.exit_code == 2 and "error: rotation needs an RMSNorm model family; opt" in refused.output
    unrotated = CliRunner().invoke(app, ["quantize", str(tiny_opt), "-o", str(tmp_path / "opt"), *common, "--no-verify"])
    assert unrotated.exit_code == 0 and "--rotate auto: opt has no RMSNorm residual stream to rotate" in unrotated.output
    assert load_checkpoint(tmp_path / "opt")[2]["rotation"]["kind"] == "none"


@pytest.mark.parametrize("n,paley,sylvester", [(1536, 12, 128), (576, 36, 16), (1024, 1, 1024), (344, 1, 8), (92, 1, 4)])
def test_factored_hadamard_applies_its_own_matrix(n, paley, sylvester):
    """The online rotation's factors: the largest block of a Paley order (<= 64) times a power of
    two, the largest power among equal blocks (344 = 43 x 8 has no larger order: blocks of 8);
    apply() (a small dense P and a fast Walsh-Hadamard transform, in float32) is x Q for the dense
    orthogonal Q that folds into the weight, random_hadamard's Q where the block is block_order(n)."""
    from dgqtool.quant.rotate import factored_hadamard

    f = factored_hadamard(n, seed=7)
    assert (f.paley.shape[0], f.sylvester_order) == (paley, sylvester)
    q = f.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert (q.abs() > 0).sum() == n * f.block  # block-diagonal, every entry of a block +-1/sqrt(block)
    if f.block == block_order(n):
        assert torch.equal(q, random_hadamard(n, seed=7))
    x = torch.randn(2, 3, n, dtype=torch.float64)
    assert torch.allclose(f.apply(x), x @ q, atol=1e-12)
    assert f.apply(x[:, :0]).shape == (2, 0, n)  # an empty batch (a CUDA op's M = 0) stays empty
    half = x.to(torch.bfloat16)
    exact = half.double() @ q
    got = f.apply(half)
    # computed in float32, rounded to bf16 once: within one bf16 rounding of the exact product
    assert got.dtype == torch.bfloat16 and ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    assert torch.equal(f.signs, factored_hadamard(n, seed=7).signs) and not torch.equal(f.signs, factored_hadamard(n, seed=8).signs)


def test_llama_down_width_gets_blocks_of_256_though_a_whole_order_exists():
    """11008 = 2 x 5504 with 5503 prime (Paley I): random_hadamard rotates it whole, but the online
    form keeps its dense factor small."""
    from dgqtool.quant.rotate import _paley_construction, factored_hadamard

    f = factored_hadamard(11008, seed=0)
    assert _paley_construction(5504) == 1 and (f.paley.shape[0], f.sylvester_order) == (1, 256)


def test_online_rotation_benchmark_checks_its_transform_on_cpu():
    """scripts/bench_online_rotation.py --check: the factored transform of both benchmarked shapes
    (SmolLM2's 1536 whole, Llama-2-7B's 11008 in blocks of 256) equals x Q."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_online_rotation.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "blocks of 1536 = 12 x 128" in done.stdout and "blocks of 256 = 1 x 256" in done.stdout


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_online_rotation_leaves_the_logits(family):
    """--online-rotation down: W Q folded into down_proj, x -> x Q on its input at run time (a
    forward pre-hook that runs before any other hook, even one registered earlier); the float
    model computes the same logits, with and without the residual rotation."""
    from dgqtool.models.rotation import online_rotation_of, rotate_online
    from dgqtool.quant.rotate import factored_hadamard

    model = _tiny(family)
    adapter = adapter_for(model.config.model_type)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.no_grad():
        down = model.model.layers[1].mlp.down_proj
        down.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # before the rotation's
        before = model(input_ids=ids).logits
        weight = down.weight.clone()
        rotate_online(model, adapter, "down", seed=5)
        folded = down.weight.double().clone()
        after = model(input_ids=ids).logits
        rotate_model(model, adapter, "hadamard", seed=0)
        both = model(input_ids=ids).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    assert ((both - before).norm() / before.norm()).item() < 1e-5
    rotation = online_rotation_of(down)
    assert torch.equal(rotation.signs, factored_hadamard(80, 7).signs) and rotation.block == 80  # 20 x 4
    assert torch.allclose(folded, weight.double() @ rotation.matrix(), atol=1e-6)
    # the earlier hook now sees the rotated input: what calibration and the search record
    raw, rotated = seen[0], seen[1]
    assert torch.allclose(rotated, rotation.apply(raw), atol=1e-5) and not torch.allclose(rotated, raw, atol=1e-2)
    assert online_rotation_of(model.model.layers[1].mlp.up_proj) is None


def test_the_online_rotation_option_offers_exactly_the_kinds_rotate_online_knows():
    from dataclasses import fields

    from dgqtool.models.rotation import ONLINE_KINDS
    from dgqtool.recipe import Recipe

    choices = next(f.metadata["choices"] for f in fields(Recipe) if f.name == "online_rotation")
    assert choices == tuple(ONLINE_KINDS)
    llama_roles = {role for role, _ in adapter_for("llama").residual.online}
    assert all(set(roles) <= llama_roles for roles in ONLINE_KINDS.values())


def test_online_rotation_is_refused_where_the_family_has_no_entry():
    from dgqtool.models.rotation import rotate_online

    model = _tiny("llama")
    with pytest.raises(DGQError, match="--online-rotation must be one of none, down, down-o; got 'all'"):
        rotate_online(model, adapter_for("llama"), "all", seed=0)
    with pytest.raises(DGQError, match="rotation needs an RMSNorm model family; llama"):
        import dataclasses
        rotate_online(model, dataclasses.replace(adapter_for("llama"), residual=None), "down", seed=0)


def test_online_rotated_checkpoint_loads_everywhere_and_export_refuses(tiny_llama, corpus_file, tmp_path):
    """`--recipe rotate-online-capped-gptq` end to end: down_proj's input group is not smoothed
    (nothing to fold into), the checkpoint records the online rotation and carries its factors,
    load_checkpoint and from_pretrained apply it (bit-identical logits), the module equals its
    unrotated twin fed x Q, verify passes, and a compressed-tensors export is refused (exit 2)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from dgqtool.checkpoint import load_checkpoint
    from dgqtool.cli import app
    from dgqtool.nn.dgq_linear import DGQLinear
    from dgqtool.quant.rotate import factored_hadamard

    out = tmp_path / "online"
    common = ["--calib-data", str(corpus_file), "--nsamples", "4", "--seqlen", "64", "--group", "32", "--grid1", "4", "--grid2", "4"]
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(out), *common, "--recipe", "rotate-online-capped-gptq"])
    assert result.exit_code == 0, result.output
    assert "logits vs original" in result.output and "fail" not in result.output.lower()
    calib = json.loads((out.with_name("online.work") / "calibrate" / "manifest.json").read_text())
    assert calib["options"]["online_rotation"] == "down"
    assert not [k for k in calib["foldable"] if "down_proj" in k] and [k for k in calib["foldable"] if "gate_proj" in k]
    model, tokenizer, q = load_checkpoint(out)
    assert q["rotation"]["online"] == {"linears": ["mlp.down_proj"], "paley_order": 1, "sylvester_order": 128}
    assert q["format_version"] == 2  # a reader of version 1 refuses it instead of dropping the rotation
    stored = load_file(str(out / "model.safetensors"))
    expected = factored_hadamard(128, 2)
    for i in range(2):
        assert torch.equal(stored[f"model.layers.{i}.mlp.down_proj.online_signs"], expected.signs.float())
    assert "online_signs" not in " ".join(k for k in stored if "up_proj" in k)
    down = model.model.layers[1].mlp.down_proj
    plain = DGQLinear(down.in_features, down.out_features, down.group, dtype=torch.float32)
    plain.load_quantized(down.quantized_weight(), None, None)
    x = torch.randn(3, 128)
    assert torch.equal(down(x), plain(expected.apply(x))) and not torch.equal(down(x), plain(x))
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=model.dtype)  # fp16 when packed on a GPU
    ids = tokenizer("the red house of the old river is open", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
    half = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float16)  # modules built under fp16
    assert half.model.layers[0].mlp.down_proj.online_signs.dtype == torch.float32
    refused = CliRunner().invoke(app, ["export", str(out), "-o", str(tmp_path / "ct")])
    assert refused.exit_code == 2 and "rotates the input of mlp.down_proj online" in refused.output, refused.output
    assert not (tmp_path / "ct").exists()


def test_online_rotation_of_o_proj_too_records_one_block_shape_per_linear(tiny_llama, corpus_file, tmp_path):
    """--online-rotation down-o: o_proj's input (the heads side by side, hidden 64) is rotated
    online as well as down_proj's (128): two block shapes (Sylvester 64 and 128), so the
    record is per linear (format_version 3); neither input group is smoothed, verify passes,
    load_checkpoint and from_pretrained agree bit for bit, and o_proj equals its twin fed x Q."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from dgqtool.checkpoint import load_checkpoint
    from dgqtool.cli import app
    from dgqtool.nn.dgq_linear import DGQLinear
    from dgqtool.quant.rotate import factored_hadamard

    out = tmp_path / "online_o"
    common = ["--calib-data", str(corpus_file), "--nsamples", "4", "--seqlen", "64", "--group", "16", "--grid1", "4", "--grid2", "4"]
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(out), *common,
                                      "--recipe", "rotate-online-capped-gptq", "--online-rotation", "down-o"])
    assert result.exit_code == 0, result.output
    assert "logits vs original" in result.output and "fail" not in result.output.lower()
    calib = json.loads((out.with_name("online_o.work") / "calibrate" / "manifest.json").read_text())
    assert not [k for k in calib["foldable"] if "down_proj" in k or "o_proj" in k]
    model, tokenizer, q = load_checkpoint(out)
    assert q["format_version"] == 3
    assert q["rotation"]["online"] == {"linears": {"mlp.down_proj": {"paley_order": 1, "sylvester_order": 128},
                                                   "self_attn.o_proj": {"paley_order": 1, "sylvester_order": 64}}}
    o = model.model.layers[0].self_attn.o_proj
    plain = DGQLinear(o.in_features, o.out_features, o.group, dtype=torch.float32)
    plain.load_quantized(o.quantized_weight(), None, None)
    x = torch.randn(3, 64)
    assert torch.equal(o(x), plain(factored_hadamard(64, 2).apply(x))) and not torch.equal(o(x), plain(x))
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=model.dtype)
    ids = tokenizer("the red house of the old river is open", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)


def test_online_rotation_on_a_family_without_the_entry_is_one_error(tiny_opt, corpus_file, tmp_path):
    from typer.testing import CliRunner

    from dgqtool.cli import app

    common = ["--calib-data", str(corpus_file), "--nsamples", "2", "--seqlen", "32", "--group", "32"]
    refused = CliRunner().invoke(app, ["quantize", str(tiny_opt), "-o", str(tmp_path / "opt"), *common,
                                       "--online-rotation", "down"])
    assert refused.exit_code == 2 and "error: rotation needs an RMSNorm model family; opt" in refused.output
    assert not (tmp_path / "opt").exists()
    bad = CliRunner().invoke(app, ["quantize", str(tiny_opt), "-o", str(tmp_path / "opt"), *common, "--online-rotation", "up"])
    assert bad.exit_code == 2 and "--online-rotation" in bad.output and "up" in bad.output


def test_stored_factors_that_are_no_rotation_are_named():
    """A checkpoint's online_signs / online_paley are checked before the model runs."""
    from dgqtool.quant.rotate import factor_problems, factored_hadamard

    f = factored_hadamard(1536, seed=1)
    assert factor_problems(f.signs.float(), f.paley.float()) == []
    assert factor_problems(f.signs * 0.5, f.paley) == ["online_signs holds values other than +-1"]
    bad = f.paley.clone()
    bad[0, 1] *= -1
    assert factor_problems(f.signs, bad) == ["online_paley is no Hadamard matrix of order 12"]
