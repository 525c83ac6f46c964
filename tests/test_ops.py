"""`torch.ops.dgq.linear`: a registered custom op (schema, fake implementation, integer reference on
CPU) that torch.compile(fullgraph=True) traces a DGQ model through, with logits equal to eager."""

from __future__ import annotations

import pytest
import torch

from dgqtool import ops
from dgqtool.checkpoint import load_checkpoint
from dgqtool.format import WEIGHT_FORMATS
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
