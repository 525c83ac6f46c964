"""`torch.ops.dgq.linear`: a registered custom op (schema, fake implementation, integer reference on
CPU) that torch.compile(fullgraph=True) traces a DGQ model through, with logits equal to eager."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from dgqtool import ops
from dgqtool.checkpoint import load_checkpoint
from dgqtool.format import WEIGHT_FORMATS
from dgqtool.gemm import dual_scale_gemm
from dgqtool.quant.dual_grained import random_dual_grained
from dgqtool.quant.quantizer import quantize_per_tensor, quantize_per_token
from tiny_packed import write_packed

GEN = torch.Generator().manual_seed(0)
WEIGHT = random_dual_grained(48, 128, 32, GEN)
PACKED = WEIGHT_FORMATS["dgq"].encode(WEIGHT)
ARGS = (PACKED["qweight"], PACKED["scales_s2"], PACKED["qzeros"], PACKED["scales_s1"], 32)


@pytest.fixture(scope="module")
def packed(tiny_llama, tmp_path_factory):
    return write_packed(tiny_llama, tmp_path_factory.mktemp("ops") / "ckpt")


@pytest.mark.parametrize("static", [False, True])
def test_op_is_the_exact_integer_product(static):
    x = torch.randn(5, 128, generator=GEN)
    scale = torch.tensor([0.02]) if static else None
    out = ops.linear(x, *ARGS, scale)
    x_q, s_x = quantize_per_token(x) if scale is None else quantize_per_tensor(x, scale)
    acc = x_q.long() @ WEIGHT.int8_weight().long().T  # int64: no float accumulation at all
    assert out.dtype == x.dtype and out.shape == (5, 48)
    assert torch.equal(out, acc.float() * s_x * PACKED["scales_s1"].float())
    assert torch.equal(ops.linear(x, *ARGS, scale, WEIGHT.int8_weight()), out)  # the cached int8 weight


def test_op_registration_passes_opcheck():
    x = torch.randn(3, 128, generator=GEN)
    for extra in [(None, None), (torch.tensor([0.01]), WEIGHT.int8_weight())]:
        torch.library.opcheck(torch.ops.dgq.linear.default, (x, *ARGS, *extra))


def test_online_rotation_op_equals_apply_and_compiles_into_one_graph():
    """dgq::hadamard_rows (a Sylvester-only online rotation) passes opcheck and equals
    FactoredHadamard.apply bit for bit; dgq::rotated_linear passes opcheck; a module with such a
    rotation compiles whole (fullgraph) into one rotated_linear op, output equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from dgqtool.nn.dgq_linear import DGQLinear
    from dgqtool.quant.rotate import factored_hadamard

    rotation = factored_hadamard(128, seed=3)
    assert (rotation.paley.shape[0], rotation.sylvester_order) == (1, 128)
    x = torch.randn(5, 128, generator=GEN)
    torch.library.opcheck(torch.ops.dgq.hadamard_rows.default, (x, rotation.signs.float(), 128))
    assert torch.equal(ops.hadamard_rows(x, rotation.signs.float(), 128), rotation.apply(x))
    signs = rotation.signs.float()
    torch.library.opcheck(torch.ops.dgq.rotated_linear.default, (x, signs, 128, *ARGS))
    module = DGQLinear.from_weight(WEIGHT, None, None, torch.float32, rotation)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        eager = module(x)
        compiled = torch.compile(module, fullgraph=True, backend=counter)(x)
    targets = [n.target for g in counter.graphs for n in g.graph.nodes]
    assert counter.frame_count == 1 and targets.count(torch.ops.dgq.rotated_linear.default) == 1
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, DGQLinear.from_weight(WEIGHT, None, None, torch.float32)(x))


def _compiled_logits(model, ids, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    with torch.no_grad():
        logits = torch.compile(model, fullgraph=True, backend=counter)(ids).logits
    graph_ops = [n for g in counter.graphs for n in g.graph.nodes if n.target is torch.ops.dgq.linear.default]
    return logits, counter.frame_count, len(graph_ops)


def test_compiled_model_runs_through_the_ops_and_equals_eager(packed):
    model, _, _ = load_checkpoint(packed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=GEN)
    logits, frames, dgq_ops = _compiled_logits(model, ids, "aot_eager")  # traced cold: int8 weights not yet cached
    with torch.no_grad():
        eager = model(ids).logits
    assert frames == 1 and dgq_ops == 14  # one graph, every DGQ linear one op
    assert torch.equal(logits, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_linear_is_the_linear_of_transformers_rmsnorm(dtype):
    """ops.rms_norm is LlamaRMSNorm bit for bit; dgq::norm_linear is dgq::linear of it (CPU) and
    passes opcheck; a weight of another dtype promotes as the norm does."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(128, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(128, generator=GEN) * 2)
    norm = norm.to(dtype)
    x = (torch.randn(5, 128, generator=GEN) * 3).to(dtype)
    with torch.no_grad():
        assert torch.equal(ops.rms_norm(x, norm.weight, 1e-5), norm(x))
        out = ops.norm_linear(x, norm.weight, 1e-5, *ARGS)
        assert torch.equal(out, ops.linear(norm(x), *ARGS)) and not torch.equal(out, ops.linear(x, *ARGS))
        assert ops.norm_linear(x, norm.weight.float(), 1e-5, *ARGS).dtype == torch.float32
    torch.library.opcheck(torch.ops.dgq.norm_linear.default, (x, norm.weight.detach(), 1e-5, *ARGS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_linear_is_the_linear_of_the_mlps_activation(dtype):
    """ops.silu_mul is LlamaMLP's act_fn(gate) * up on [gate | up] bit for bit; dgq::silu_mul_linear
    is dgq::linear of it (CPU) and passes opcheck."""
    from transformers.activations import ACT2FN

    x = (torch.randn(5, 256, generator=GEN) * 3).to(dtype)
    want = ACT2FN["silu"](x[:, :128]) * x[:, 128:]
    assert torch.equal(ops.silu_mul(x), want)
    out = ops.silu_mul_linear(x, *ARGS)
    assert torch.equal(out, ops.linear(want, *ARGS)) and out.shape == (5, 48)
    torch.library.opcheck(torch.ops.dgq.silu_mul_linear.default, (x, *ARGS))


def test_only_norms_computing_llamas_formula_move_into_the_linears():
    """The copies of LlamaRMSNorm (Mistral, Qwen2, Qwen3) qualify; Gemma's (1 + w) and Olmo2's single
    rounding (weight times the float32 product, then the cast) do not."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from dgqtool.nn.fused import _computes_llama_rmsnorm

    assert [_computes_llama_rmsnorm(c(8)) for c in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, GemmaRMSNorm, Olmo2RMSNorm)] \
        == [True, True, True, False, False]


def test_fused_model_computes_its_norms_in_the_linears_and_compiles(packed):
    """fuse_for_inference on LLaMA: each layer's two RMSNorms move into the fused q/k/v and gate/up
    linears (dgq::norm_linear) and its MLP's silu(gate) * up into down_proj (dgq::silu_mul_linear),
    the state_dict keeps its keys, logits equal the unfused model's bit for bit (CPU), and the model
    compiles into one graph of 4 norm_linear, 2 silu_mul_linear and 2 linear (o_proj) ops."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from dgqtool.checkpoint import fuse_for_inference
    from dgqtool.nn.fused import GatedMLPInLinears, NormInLinears

    model, _, _ = load_checkpoint(packed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=GEN)
    keys = set(model.state_dict())
    with torch.no_grad():
        unfused = model(ids).logits
    fused = fuse_for_inference(model)
    assert sum(isinstance(m, NormInLinears) for m in fused.modules()) == 4
    assert sum(isinstance(m, GatedMLPInLinears) for m in fused.modules()) == 2
    assert {k for k in fused.state_dict() if "norm" in k or "down_proj" in k} == {k for k in keys if "norm" in k or "down_proj" in k}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        eager = fused(ids).logits
        compiled = torch.compile(fused, fullgraph=True, backend=counter)(ids).logits
    targets = [n.target for g in counter.graphs for n in g.graph.nodes]
    assert counter.frame_count == 1
    assert targets.count(torch.ops.dgq.norm_linear.default) == 4 and targets.count(torch.ops.dgq.linear.default) == 2
    assert targets.count(torch.ops.dgq.silu_mul_linear.default) == 2
    assert torch.equal(eager, unfused) and torch.equal(compiled, eager)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager(packed):
    model, _, _ = load_checkpoint(packed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=GEN)
    with torch.no_grad():
        eager = model(ids).logits
    logits, frames, dgq_ops = _compiled_logits(model, ids, "inductor")
    assert frames == 1 and dgq_ops == 14
    # the op is opaque and exact; inductor only refuses the float ops around it (norms, softmax)
    assert (logits - eager).abs().max() <= 1e-5 * eager.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_decode_equals_eager(packed):
    model, tokenizer, _ = load_checkpoint(packed, "cuda")
    model.half()
    ids = tokenizer("the red house of the old river", return_tensors="pt").input_ids.cuda()
    greedy = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    eager = model.generate(ids, **greedy)
    compiled = model.generate(ids, cache_implementation="static", **greedy)  # static cache on CUDA: transformers compiles
    assert torch.equal(compiled, eager)


def _decode_step_inputs(model, ids):
    """A static KV cache filled by an eager prefill of ids, and the next step's inputs (a fresh
    cache per call: recent transformers advance the cache's own position on every step)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    positions = torch.arange(ids.shape[1], device=ids.device)
    token = model(input_ids=ids, past_key_values=cache, cache_position=positions).logits[:, -1].argmax(-1)
    return {"input_ids": token.view(-1, 1), "past_key_values": cache,
            "cache_position": torch.tensor([ids.shape[1]], device=ids.device)}


def test_compiled_decode_step_is_one_graph_equal_to_eager(packed):
    """What graph_decode compiles (compile_step): the one-token step over the static cache, traced
    whole (fullgraph) through the ops. Not bit-exact even without inductor: under dynamo
    transformers takes its tracing branch for the attention mask (measured: 6e-8 absolute)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, _, _ = load_checkpoint(packed)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=GEN)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        eager = model(**_decode_step_inputs(model, ids)).logits
        compiled = torch.compile(model, fullgraph=True, backend=counter)(**_decode_step_inputs(model, ids)).logits
    assert counter.frame_count == 1
    assert (compiled - eager).abs().max() <= 1e-6 * eager.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_graph_decode_equals_eager_on_cuda(packed):
    """On the kernel path, as `dgq run` decodes (fused linears, CUDA graph per token): the inductor
    compiled step gives the eager step's greedy tokens and its logits within fp16 fusion error;
    traced without inductor (aot_eager) within transformers' tracing-branch error."""
    from dgqtool.checkpoint import fuse_for_inference
    from dgqtool.run import compile_step, graph_decode

    model, tokenizer, _ = load_checkpoint(packed, "cuda")
    model = fuse_for_inference(model.half())
    ids = tokenizer("the red house of the old river", return_tensors="pt").input_ids.cuda()
    torch._dynamo.reset()
    eager = graph_decode(model, ids, 12)
    compiled = graph_decode(model, ids, 12, step_model=compile_step(model))
    assert eager.shape == (1, 12) and torch.equal(compiled, eager)
    with torch.no_grad():
        want = model(**_decode_step_inputs(model, ids)).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**_decode_step_inputs(model, ids)).logits
        fused = compile_step(model)(**_decode_step_inputs(model, ids)).logits
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= 1e-3 * scale
    assert (fused.float() - want.float()).abs().max() <= 2e-2 * scale  # inductor: fp16 fusions


NATIVE_CHECK = """
import torch
from dgqtool.ops import load_native
native = load_native()
print(native, *("dgq_torch_ops.cpp" in torch._C._dispatch_dump(op).split("CUDA:")[1].splitlines()[0]
                for op in ("dgq::linear", "dgq::rotated_linear", "dgq::norm_linear", "dgq::silu_mul_linear")))
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("disabled", [False, True])
def test_cpp_kernel_builds_and_replaces_the_python_cuda_kernel(disabled):
    """The C++ torch extension builds against the running torch (CPU-only torch included; cached
    with the kernel library) and, loaded, is the active CUDA kernel of dgq::linear, rotated_linear,
    norm_linear and silu_mul_linear; DGQ_NATIVE_OPS=0
    keeps the Python one. In a fresh process: loading it changes the op for the whole process."""
    env = {**os.environ, "DGQ_NATIVE_OPS": "0" if disabled else "1"}
    done = subprocess.run([sys.executable, "-c", NATIVE_CHECK], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(not disabled)] * 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
def test_cpp_kernel_equals_the_python_kernel_and_the_reference(dtype, static):
    """dgq::linear through the C++ kernel (the GEMV at M = 1, the tensor-core kernel up to 64 rows,
    the Python kernel beyond and for fp32) is the integer reference bit for bit: three shapes, M
    from 0 to 300 (3 and 4 share a bucket: the plan asked at 3 serves 4), a transposed (non-contiguous)
    input, both activation modes (the static scale given in fp16)."""
    from dgqtool.quant.dual_grained import pack_nibbles

    assert ops.load_native()
    for n, k, group in [(576, 1536, 64), (4096, 4096, 128), (136, 11008, 32)]:
        w = random_dual_grained(n, k, group, torch.Generator().manual_seed(n))
        args = (pack_nibbles(w.codes).cuda(), w.s2.cuda(), w.zero.cuda(), w.s1.half().cuda(), group)
        scale = torch.tensor([0.02], device="cuda", dtype=torch.float16) if static else None
        for m in (0, 1, 3, 4, 8, 17, 64, 65, 300):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            x_q, s_x = quantize_per_tensor(x, scale.float()) if static else quantize_per_token(x)
            want = ops.linear_python(x, *args, scale)
            assert torch.equal(want, dual_scale_gemm(x_q, s_x, w.int8_weight().cuda(), args[3], dtype)), (n, m)
            for _ in range(2):  # the first call of a bucket asks dgq::plan, the second uses its answer
                assert torch.equal(ops.linear(x, *args, scale), want), (n, k, m)
            assert torch.equal(ops.linear(x.T.contiguous().T, *args, scale), want)  # a strided input
            if dtype != torch.float32 and m == 1:
                assert torch.ops.dgq.plan(x, args[0], group, static)[0] == 1  # this ran the C++ GEMV path
        if dtype != torch.float32:  # an untuned shape at M <= 64: the C++ tensor-core path
            assert torch.ops.dgq.plan(torch.empty(8, k, device="cuda", dtype=dtype), args[0], group, static)[0] == 2
