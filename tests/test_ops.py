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
