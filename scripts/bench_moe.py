"""MoE on the H200: one Qwen3-30B-A3B-shaped expert block (128 experts, top-8, H 2048, I 768) as
ExpertLinears: bf16 nn.Linear loop vs DGQ linears loop (unfused / gate+up fused per expert), and
transformers' fused-parameter experts (eager loop, grouped_mm) for reference; then the search of
the shared-input gate/up group: one call per linear vs stacked rows. Writes $OUT/bench_moe.json
(docs/results/bench_moe.json: the H200 run of 2026-12-01)."""

import json
import os
import time

import torch
from torch import nn

from bench_e2e import timed  # scripts/ is on sys.path when a script runs
from dgqtool.models.moe import ExpertLinears, ExpertMLP
from dgqtool.nn.dgq_linear import DGQLinear
from dgqtool.nn.fused import ProjectionSlice, SharedInputLinear, fuse
from dgqtool.quant.quantizer import fake_quantize_activations
from dgqtool.quant.search import accumulate_moments, quantize_weight, quantize_weights, rtn_dual_grained

E, K, H, I = 128, 8, 2048, 768
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
results = {"shape": dict(experts=E, top_k=K, hidden=H, intermediate=I), "moe": [], "search": {}}


act = nn.SiLU()
gate_up = (torch.randn(E, 2 * I, H) * 0.02).to(dev, dt)
down = (torch.randn(E, H, I) * 0.02).to(dev, dt)


def lin(w):
    m = nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev, dtype=dt)
    m.weight.data.copy_(w)
    return m


float_block = ExpertLinears([ExpertMLP(lin(gate_up[e, :I]), lin(gate_up[e, I:]), lin(down[e]), act) for e in range(E)])


def dgq(m):
    return DGQLinear.from_weight(rtn_dual_grained(m.weight.float(), 128), None, None, dt).to(dev)


dgq_block = ExpertLinears([ExpertMLP(dgq(x.gate_proj), dgq(x.up_proj), dgq(x.down_proj), act) for x in float_block])
fused_experts = []
for x in dgq_block:
    shared = SharedInputLinear(fuse([x.gate_proj, x.up_proj]), (I, I))
    fused_experts.append(ExpertMLP(ProjectionSlice(shared, 0, 0, I), ProjectionSlice(shared, 1, I, 2 * I), x.down_proj, act))
fused_block = ExpertLinears(fused_experts)

hf = {}
try:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    for impl in ("eager", "grouped_mm", "batched_mm"):
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = impl
        m = Qwen3MoeExperts(cfg).to(dev, dt)
        m.gate_up_proj.data.copy_(gate_up)
        m.down_proj.data.copy_(down)
        hf[impl] = m
except Exception as exc:  # noqa: BLE001
    results["hf_error"] = repr(exc)

with torch.no_grad():
    for T in (1, 8, 64, 512, 2048):
        x = torch.randn(T, H, device=dev, dtype=dt)
        idx = torch.rand(T, E, device=dev).topk(K, dim=-1).indices
        w = torch.softmax(torch.randn(T, K, device=dev), -1).to(dt)
        row = {"tokens": T}
        ref = float_block(x, idx, w).float()
        for name, block in (("bf16 loop", float_block), ("dgq loop", dgq_block), ("dgq loop, gate+up fused", fused_block)):
            row[name] = timed(lambda: block(x, idx, w), repeats=20, warmups=3)
        row["dgq rel err vs bf16"] = float((dgq_block(x, idx, w).float() - ref).norm() / ref.norm())
        row["fused == unfused"] = bool(torch.equal(fused_block(x, idx, w), dgq_block(x, idx, w)))
        for impl, m in hf.items():
            try:
                row[f"transformers {impl} (bf16)"] = timed(lambda: m(x, idx, w), repeats=20, warmups=3)
                if impl == "eager":
                    row["ExpertLinears == transformers eager"] = float((m(x, idx, w).float() - ref).abs().max())
            except Exception as exc:  # noqa: BLE001
                row[f"transformers {impl} (bf16)"] = repr(exc)[:120]
        results["moe"].append(row)
        print(json.dumps(row), flush=True)

    # search: 16 experts' gate/up (32 linears of 768 x 2048) share one activation
    xs = torch.randn(4096, H, device=dev) * (1 + 10 * (torch.rand(H, device=dev) > 0.99))
    moments = accumulate_moments(xs, lambda t: fake_quantize_activations(t, None), None)
    ws = [gate_up[e, p * I:(p + 1) * I].float() for e in range(16) for p in (0, 1)]
    quantize_weight(ws[0], moments, group=128)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    loop = [quantize_weight(wi, moments, group=128) for wi in ws]
    torch.cuda.synchronize()
    t_loop = time.perf_counter() - t
    t = time.perf_counter()
    stacked = quantize_weights(ws, moments, group=128)
    torch.cuda.synchronize()
    t_stacked = time.perf_counter() - t
    same = all(torch.equal(a.weight.codes, b.weight.codes) and torch.equal(a.weight.s1, b.weight.s1)
               and torch.equal(a.weight.s2, b.weight.s2) for a, b in zip(loop, stacked))
    results["search"] = {"linears": len(ws), "loop_s": t_loop, "stacked_s": t_stacked, "identical": same}
    print(json.dumps(results["search"]), flush=True)

os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
with open(os.path.join(os.environ.get("OUT", "."), "bench_moe.json"), "w") as f:
    json.dump(results, f, indent=1)
