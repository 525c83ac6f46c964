"""The CUDA kernels: the conversion identity they rely on (CPU), that the library compiles for
sm_90a wherever nvcc is present (the CI compile check), and bit-exactness against the torch
integer reference on a GPU."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from dgqtool.gemm import dual_scale_gemm
from dgqtool.quant.dual_grained import DualGrainedWeight, code_interval, pack_nibbles, random_dual_grained
from dgqtool.quant.quantizer import quantize_per_tensor, quantize_per_token

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_imad_xor_conversion_is_exact_for_every_valid_code():
    """((nibbles * S2 + C) ^ 0x80808080) per byte == S2 * (code - zp) for every DGQ-legal triple."""
    s2 = torch.arange(1, 128, dtype=torch.int64).repeat_interleave(16)
    zp = torch.arange(16, dtype=torch.int64).repeat(127)
    lo, hi = code_interval(zp, s2)
    cases = [(s, z, c) for s, z, a, b in zip(s2.tolist(), zp.tolist(), lo.tolist(), hi.tolist()) for c in range(a, b + 1)]
    s, z, c = (torch.tensor(v, dtype=torch.int64) for v in zip(*cases))
    # four lanes with different codes of the same group: c, its mirror within the interval, and the bounds
    lanes = torch.stack([c, c.flip(0), c, c.flip(0)], dim=1)
    valid = (s.unsqueeze(1) * (lanes - z.unsqueeze(1))).abs() <= 127
    lanes = torch.where(valid, lanes, c.unsqueeze(1))
    word = (lanes * (256 ** torch.arange(4))).sum(1)
    const = ((128 - s * z) * 0x01010101) % 2**32
    converted = ((word * s + const) % 2**32) ^ 0x80808080
    bytes_ = (converted.unsqueeze(1) // (256 ** torch.arange(4))) % 256
    as_int8 = torch.where(bytes_ > 127, bytes_ - 256, bytes_)
    assert len(cases) > 10_000
    assert torch.equal(as_int8, s.unsqueeze(1) * (lanes - z.unsqueeze(1)))


@pytest.mark.parametrize("arch,marker,variants", [("sm_90a", "Sm90ColBroadcast", 3), ("sm_80", "dgq::sm80::ScaledGemm", 1)])
def test_generator_emits_every_variant_with_the_scale_epilogue(tmp_path, arch, marker, variants):
    pytest.importorskip("cutlass_library")
    from dgqtool.kernels import build

    table = build._generate(build.source_dir(), tmp_path, arch)
    files = sorted(tmp_path.glob("gemm_*.cu"))
    assert len(table) >= variants and len(files) == 2 * len(table)  # fp16 and bf16 outputs
    for path in files:
        text = path.read_text()
        assert marker in text and "IGMMA" not in text
        assert "extern \"C\" int dgq_gemm_" in text
    fused = sorted(tmp_path.glob("wgmma_*.cu"))
    if arch == "sm_90a":  # the fused register-A wgmma kernel: one unit per tile, fp16 and bf16 entry points
        ops = (tmp_path / "wgmma_ops.cuh").read_text()
        fused = [path for path in fused if path.name != "wgmma_common.cu"]
        assert fused and all(path.read_text().count("extern \"C\" int dgq_wgmma_") == 2 for path in fused)
        assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ops
    else:
        assert not fused


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_kernel_library_compiles(arch):
    """The CI compile check: the whole library builds for Hopper (CUTLASS GEMMs) and Ampere."""
    pytest.importorskip("cutlass_library")
    from dgqtool.kernels import build

    library = build.build(arch, log=lambda _msg: None)
    symbols = subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True).stdout
    assert "dgq_gemv_f16" in symbols and "dgq_unpack_s8" in symbols and "dgq_quantize_rows_bf16" in symbols
    assert "dgq_mma_bf16" in symbols
    assert ("dgq_gemm_co_128x256x128_c2x1_bf16" in symbols) == (arch == "sm_90a")
    assert ("dgq_wgmma_w128x128_s6_c1_bf16" in symbols) == (arch == "sm_90a")
    assert "dgq_quantize_rows_perm_f16" in symbols and "dgq_permute_s8" in symbols
    assert ("dgq_gemm_a_128x128x64_s4_bf16" in symbols) == (arch == "sm_80")


# ---------------------------------------------------------------- GPU: bit-exact against the reference


def _library():
    from dgqtool.kernels import runtime

    lib = runtime.library(torch.device("cuda"))
    assert lib is not None, "kernel library failed to build or load"
    return lib


def _weight(n, k, group, seed=0):
    w = random_dual_grained(n, k, group, torch.Generator().manual_seed(seed))
    return w, pack_nibbles(w.codes).cuda(), w.s2.cuda(), w.zero.cuda(), w.s1.half().cuda()


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k", [(37, 4096), (300, 4096), (37, 11008), (300, 11008), (70, 576), (3, 73792),
                                 (1027, 576), (4097, 4096), (1025, 11008)])
def test_activation_quantization_matches_reference(dtype, m, k):
    """Every launch shape: one load per thread (few rows), several held in registers (many rows,
    K = 11008), several rows per block with a spare team in the last one (M > 1024), and rows too
    long for the registers (K = 73792, read twice)."""
    from dgqtool.kernels import runtime

    lib = _library()
    x = (torch.randn(m, k, device="cuda") * torch.logspace(-2, 2, m, device="cuda").unsqueeze(1)).to(dtype)
    x[1] = 0  # all-zero row takes the 1e-8 scale floor
    q, s = runtime.quantize_rows(lib, x)
    q_ref, s_ref = quantize_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    static = torch.tensor([0.05], device="cuda")
    q, s = runtime.quantize_rows(lib, x, static)
    q_ref, s_ref = quantize_per_tensor(x, static)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("permuted", [False, True])
def test_quantization_rounds_ties_like_the_reference(dtype, permuted):
    """The kernels multiply by 1/scale and divide only near a half-integer: exact ties (a static
    scale of 0.25, round half to even) and near-ties (x = (j + 0.5) * scale rounded to the dtype)
    still equal the reference's division."""
    from dgqtool.kernels import runtime

    lib = _library()
    half = (torch.arange(-128, 128, device="cuda", dtype=torch.float32) + 0.5).repeat(2)  # 512 features
    x = (half * 0.25).to(dtype).unsqueeze(0)
    static = torch.tensor([0.25], device="cuda")
    # amax 127 c, so scale ~ c and x / scale ~ j + 0.5 (256 features: the amax, 254 near-ties, a zero)
    near = torch.cat([torch.tensor([127.0], device="cuda"), torch.arange(-127, 127, device="cuda") + 0.5,
                      torch.zeros(1, device="cuda")])
    rows = torch.stack([near * c for c in (1.0, 3.0, 0.3, 1e-3)]).to(dtype)
    quantize = runtime.quantize_rows_permuted if permuted else runtime.quantize_rows
    for inputs, scale, reference in ((x, static, quantize_per_tensor), (rows, None, quantize_per_token)):
        q, s = quantize(lib, inputs) if scale is None else quantize(lib, inputs, scale)
        q_ref, s_ref = reference(inputs) if scale is None else reference(inputs, scale)
        assert torch.equal(s, s_ref)
        assert torch.equal(q, runtime.permute_s8(lib, q_ref) if permuted else q_ref)


@gpu
@pytest.mark.parametrize("n,k,group", [(576, 576, 64), (1536, 576, 64), (4096, 4096, 128), (256, 11008, 128)])
def test_unpack_is_exact(n, k, group):
    from dgqtool.kernels import runtime

    w, qweight, s2, zero, _ = _weight(n, k, group)
    assert torch.equal(runtime.unpack_s8(_library(), qweight, s2, zero, group).cpu(), w.int8_weight())


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(576, 576, 64), (200, 1536, 64), (4096, 4096, 128), (256, 11008, 128),
                                     (200, 576, 96), (256, 1536, 32)])
def test_gemv_is_bit_exact(out_dtype, n, k, group):
    """N not a multiple of a block's channels, K = 576 (18 of 32 lanes busy) and 11008 (several
    batches of steps in flight), groups of 3 and 1 code words (the multiply-high group index),
    every channels-per-warp configuration."""
    from dgqtool.kernels import runtime

    lib = _library()
    w, qweight, s2, zero, s1 = _weight(n, k, group)
    x_q = torch.randint(-127, 128, (1, k), dtype=torch.int8, device="cuda")
    s_x = torch.rand(1, 1, device="cuda") * 1e-2
    ref = dual_scale_gemm(x_q, s_x, w.int8_weight().cuda(), s1, out_dtype)
    for config in runtime.GEMV_CONFIGS:
        assert torch.equal(runtime.gemv(lib, x_q, s_x, qweight, s2, zero, s1, group, out_dtype, config), ref), config


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(576, 576, 64), (200, 1536, 64), (4096, 4096, 128), (256, 11008, 128),
                                     (200, 576, 96), (256, 1536, 32)])
def test_tensor_core_kernel_is_bit_exact(out_dtype, n, k, group):
    """Ragged M (token tiles of 8..64 plus a second block row), N not a multiple of the channel
    tile, K with a partial 128-feature step (576), groups of 3 and 1 code words, every
    configuration."""
    from dgqtool.kernels import runtime

    lib = _library()
    w, qweight, s2, zero, s1 = _weight(n, k, group)
    w_s8 = w.int8_weight().cuda()
    for m in (1, 3, 8, 17, 40, 100, 1000):
        x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        s_x = torch.rand(m, 1, device="cuda") * 1e-2
        ref = dual_scale_gemm(x_q, s_x, w_s8, s1, out_dtype)
        for config in runtime.mma_configs(m):
            out = runtime.mma(lib, x_q, s_x, qweight, s2, zero, s1, group, out_dtype, config)
            assert torch.equal(out, ref), (m, config)


def _extreme_operands(n: int, k: int, group: int, m: int):
    """Codes 0 or 15 with zp 7 and S2 15 (weights -105 or 120) and 16 scattered +-1 activations per
    token: every int32 sum stays below 2048 in magnitude, so fp16 output holds it exactly."""
    codes = torch.randint(0, 2, (n, k), dtype=torch.uint8) * 15
    zero = torch.full((n, k // group), 7, dtype=torch.uint8)
    s2 = torch.full((n, k // group), 15, dtype=torch.int8)
    x_q = torch.zeros(m, k, dtype=torch.int8)
    for row in x_q:
        row[torch.randperm(k)[:16]] = torch.randint(0, 2, (16,), dtype=torch.int8) * 2 - 1
    return codes, zero, s2, DualGrainedWeight(codes, zero, s2, torch.ones(n)), x_q


@gpu
def test_tensor_core_integer_sums_are_exact():
    """Extreme weights (S2 (code - zp) in {-105, 120}) against 16 scattered +-1 activations per token
    over K = 4096: every sum is an integer below 2048 in magnitude, which fp16 holds exactly."""
    from dgqtool.kernels import runtime

    lib = _library()
    n, k, group, m = 48, 4096, 128, 5
    codes, zero, s2, w, x_q = _extreme_operands(n, k, group, m)
    one = torch.ones(n, dtype=torch.float16, device="cuda")
    out = runtime.mma(lib, x_q.cuda(), torch.ones(m, 1, device="cuda"), pack_nibbles(codes).cuda(), s2.cuda(),
                      zero.cuda(), one, group, torch.float16)
    acc = x_q.int() @ w.int8_weight().int().T
    assert acc.abs().max() > 500 and torch.equal(out.cpu().int(), acc)


@gpu
def test_gemv_integer_sums_are_exact():
    """S2 = 1, unit fp scales and x in {-1, 0, 1} keep |sum| <= 64 * 15 < 2048: fp16 holds it exactly."""
    from dgqtool.kernels import runtime

    lib = _library()
    codes = torch.randint(0, 16, (64, 64), dtype=torch.uint8)
    zero = torch.randint(0, 16, (64, 1), dtype=torch.uint8)
    s2 = torch.ones(64, 1, dtype=torch.int8)
    w = DualGrainedWeight(codes, zero, s2, torch.ones(64))
    x_q = torch.randint(-1, 2, (1, 64), dtype=torch.int8, device="cuda")
    out = runtime.gemv(lib, x_q, torch.ones(1, 1, device="cuda"), pack_nibbles(codes).cuda(), s2.cuda(), zero.cuda(),
                       torch.ones(64, dtype=torch.float16, device="cuda"), 64, torch.float16)
    acc = x_q.cpu().int() @ w.int8_weight().int().T
    assert acc.abs().max() > 0 and torch.equal(out.cpu().int(), acc)


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_every_cutlass_variant_is_bit_exact(out_dtype):
    from dgqtool.kernels import runtime

    lib = _library()
    if not lib.gemm_variants:
        pytest.skip("the CUTLASS GEMMs are built for sm_90a only")
    for n, k, group in [(576, 576, 64), (4096, 4096, 128), (1536, 576, 64)]:
        w, qweight, s2, zero, s1 = _weight(n, k, group)
        w_s8 = runtime.unpack_s8(lib, qweight, s2, zero, group)
        for m in (17, 200, 1024):
            x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
            s_x = torch.rand(m, 1, device="cuda") * 1e-2
            ref = dual_scale_gemm(x_q, s_x, w_s8, s1, out_dtype)
            for variant in lib.gemm_variants:
                out = runtime.int8_gemm(lib, x_q, s_x, w_s8, s1, out_dtype, variant)
                assert torch.equal(out, ref), (variant, m, n, k)


def _wgmma_library():
    lib = _library()
    if not lib.wgmma_variants:
        pytest.skip("the fused wgmma kernel is built for sm_90a only")
    return lib


def _wgmma_configs(lib, m, n, k):
    """Every instantiated tile and cluster with split-K off, at its default split and at 3 splits."""
    from dgqtool.kernels import runtime

    configs = []
    for bm, bn, stages, cluster in lib.wgmma_variants:
        for splits in {1, 3, runtime.wgmma_splits(m, n, k, bm, bn, cluster=cluster)}:
            configs.append((bm, bn, stages, cluster, splits))
    return configs


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k", [(19, 576), (19, 4096), (300, 4096), (300, 11008), (2, 73792),
                                 (1027, 576), (4097, 4096)])
def test_permuted_quantization_matches_reference(dtype, m, k):
    """The quantization kernel writing the wgmma order equals the reference, permuted by
    dgq_permute_s8 (and padded with zeros to a multiple of 128 features)."""
    from dgqtool.kernels import runtime

    lib = _library()
    x = (torch.randn(m, k, device="cuda") * torch.logspace(-2, 2, m, device="cuda").unsqueeze(1)).to(dtype)
    q, s = runtime.quantize_rows_permuted(lib, x)
    q_ref, s_ref = quantize_per_token(x)
    perm = runtime.permute_s8(lib, q_ref)
    assert q.shape == (m, (k + 127) // 128 * 128) and torch.equal(s, s_ref) and torch.equal(q, perm)
    # the permutation itself: feature 32t + 8j + 2i + e of a 128-block sits at 32j + 16e + 4t + i
    f = torch.arange(128)
    pos = 32 * ((f >> 3) & 3) + 16 * (f & 1) + 4 * (f >> 5) + ((f >> 1) & 3)
    blocks = k // 128
    natural = q_ref[:, : blocks * 128].reshape(m, blocks, 128)
    assert torch.equal(perm[:, : blocks * 128].reshape(m, blocks, 128)[:, :, pos.cuda()], natural)
    if k % 128:
        assert perm[:, blocks * 128:].float().abs().sum() == (q_ref[:, blocks * 128:].float().abs().sum())


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(576, 576, 64), (200, 1536, 64), (4096, 4096, 128), (256, 11008, 128),
                                     (300, 1536, 32), (136, 4160, 64)])
def test_wgmma_kernel_is_bit_exact(out_dtype, n, k, group):
    """Ragged M (1 .. 4097: partial token tiles, several token tiles), N not a multiple of the
    128/256-channel block (200, 300, 136: the scalar store path too), K with a partial 128-feature
    step (576, 4160) and K = 11008, groups of 32 / 64 / 128, every instantiated tile, split-K off,
    at 3 splits and at the default."""
    from dgqtool.kernels import runtime

    lib = _wgmma_library()
    w, qweight, s2, zero, s1 = _weight(n, k, group)
    w_s8 = w.int8_weight().cuda()
    for m in (1, 3, 17, 100, 1000, 4097):
        x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        s_x = torch.rand(m, 1, device="cuda") * 1e-2
        ref = dual_scale_gemm(x_q, s_x, w_s8, s1, out_dtype)
        x_p = runtime.permute_s8(lib, x_q)
        for config in _wgmma_configs(lib, m, n, k):
            out = runtime.wgmma_permuted(lib, x_p, s_x, qweight, s2, zero, s1, group, out_dtype, config)
            assert torch.equal(out, ref), (m, config)


@gpu
def test_wgmma_integer_sums_are_exact():
    """Extreme weights (S2 (code - zp) in {-105, 120}) and +-1 activations: int32 sums checked
    exactly through fp16 (|sum| < 2048), split-K included."""
    from dgqtool.kernels import runtime

    lib = _wgmma_library()
    n, k, group, m = 136, 4096, 128, 37
    codes, zero, s2, w, x_q = _extreme_operands(n, k, group, m)
    one = torch.ones(n, dtype=torch.float16, device="cuda")
    acc = x_q.int() @ w.int8_weight().int().T
    for config in _wgmma_configs(lib, m, n, k):
        out = runtime.wgmma(lib, x_q.cuda(), torch.ones(m, 1, device="cuda"), pack_nibbles(codes).cuda(), s2.cuda(),
                            zero.cuda(), one, group, torch.float16, config)
        assert acc.abs().max() > 500 and torch.equal(out.cpu().int(), acc), config


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_dgq_linear_through_wgmma_equals_reference(out_dtype, static):
    """The dispatched linear on the wgmma path (permuted quantization + fused kernel) for every
    tuned wgmma configuration in kernels/tuned_sm90.json and the untuned default."""
    from dgqtool.kernels import runtime

    lib = _wgmma_library()
    n, k, group = 576, 1536, 64
    w, qweight, s2, zero, s1 = _weight(n, k, group)
    w_s8 = w.int8_weight().cuda()
    scale = torch.tensor([0.02], device="cuda") if static else None
    tuned = {tuple(v[1]) for v in lib.paths.values() if v[0] == "wgmma" and len(v[1]) == 5}
    saved = dict(lib.paths)
    try:
        for m in (17, 100, 1000):
            x = torch.randn(m, k, device="cuda", dtype=out_dtype)
            x_q, s_x = quantize_per_tensor(x, scale) if static else quantize_per_token(x)
            ref = dual_scale_gemm(x_q, s_x, w_s8, s1, out_dtype)
            for config in sorted(tuned) + [runtime.wgmma_default(m, n, k)]:
                lib.paths[f"{runtime._bucket(m)},{n},{k}"] = ["wgmma", list(config)]
                assert runtime.choose_path(lib, m, n, k)[0] == "wgmma"
                assert torch.equal(runtime.dgq_linear(lib, x, qweight, s2, zero, s1, group, scale), ref), (m, config)
    finally:
        lib.paths.clear()
        lib.paths.update(saved)


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_ampere_build_is_bit_exact(out_dtype):
    """The sm_80 library (on a Hopper GPU it runs through its PTX): the emitted 2.x GEMM with the
    visitor-tree epilogue, and the whole dispatched linear, against the reference."""
    from dgqtool.kernels import runtime

    lib = runtime.library_for_arch("sm_80")
    assert lib is not None and lib.gemm_variants
    for n, k, group in [(576, 576, 64), (4096, 4096, 128), (1536, 576, 64)]:
        w, qweight, s2, zero, s1 = _weight(n, k, group)
        w_s8 = runtime.unpack_s8(lib, qweight, s2, zero, group)
        for m in (1, 17, 200, 1024):
            x = torch.randn(m, k, device="cuda", dtype=out_dtype)
            x_q, s_x = quantize_per_token(x)
            ref = dual_scale_gemm(x_q, s_x, w_s8, s1, out_dtype)
            assert torch.equal(runtime.dgq_linear(lib, x, qweight, s2, zero, s1, group), ref), (m, n, k)
            for variant in lib.gemm_variants:
                assert torch.equal(runtime.int8_gemm(lib, x_q, s_x, w_s8, s1, out_dtype, variant), ref), (variant, m)


@gpu
@pytest.mark.parametrize("static", [False, True])
def test_dgq_linear_on_gpu_equals_cpu_reference(static):
    from dgqtool.nn.dgq_linear import DGQLinear

    w = random_dual_grained(1536, 576, 64, torch.Generator().manual_seed(1))
    scale = torch.tensor([0.02]) if static else None
    module = DGQLinear.from_weight(w, torch.randn(1536), scale, torch.float16)
    x = torch.randn(3, 40, 576, dtype=torch.float16)
    ref = module(x)
    gpu_module = module.cuda()
    for batch, rows in ((1, 1), (3, 1), (3, 8), (3, 40)):  # decode (fused GEMV), small M (tensor cores), prefill
        out = gpu_module(x[:batch, :rows].cuda())
        assert torch.equal(out.cpu(), ref[:batch, :rows])


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,block", [(11008, 256), (1536, 128), (2048, 64), (256, 256), (16384, 256)])
@pytest.mark.parametrize("static", [False, True])
def test_fused_hadamard_quantization_equals_rotating_then_quantizing(dtype, k, block, static):
    """The online rotation fused into the per-token quantizer: bit-identical codes and scales to
    FactoredHadamard.apply (float32, rounded to x's dtype) followed by the torch quantizer, the
    op's reference path (dgq::rotated_linear's Python kernel), with outlier channels (what
    the rotation spreads), ragged M, blocks of 64 / 128 / 256 and 1 / 2 / 4 / 6 / 8 of them a warp,
    32-warp rows (M <= 64) and 8-warp rows (M = 300, 600)."""
    from dgqtool.kernels import runtime
    from dgqtool.quant.rotate import FactoredHadamard

    lib = _library()
    signs = torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    rotation = FactoredHadamard(signs, torch.ones(1, 1, dtype=torch.float64), block).to("cuda")
    signs = rotation.signs.to(torch.float32)
    scale = torch.tensor([0.05], device="cuda") if static else None
    for m in (1, 7, 300, 600):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        x[:, :3] *= 40  # massive channels
        y = rotation.apply(x)
        want_q, want_s = quantize_per_tensor(y, scale) if static else quantize_per_token(y)
        q, s = runtime.hadamard_quantize_rows(lib, x, signs, block, scale)
        assert torch.equal(s, want_s.expand_as(s)) and torch.equal(q, want_q), (m, k, block)
        # the rotation alone (an online-rotated checkpoint's linear then quantizes it itself)
        assert torch.equal(runtime.hadamard_rows(lib, x, signs, block), rotation.apply(x)), (m, k, block)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,paley", [(1536, 1), (1536, 12), (11008, 1)])
def test_online_rotated_linear_on_the_gpu_equals_the_cpu_module(dtype, k, paley):
    """A DGQ linear with an online input rotation at decode, small-M and prefill sizes: with
    Sylvester blocks (128; 11008's 43 blocks of 256) dgq::rotated_linear, the rotation fused into the
    quantizer on the GEMV and tensor-core paths, is bit-identical to the CPU module and to its
    Python kernel (rotate, then dgq::linear), static input scale and M = 0 included; with a Paley
    factor of 12 the torch ops run it (the factor's GEMM sums in another order on the GPU: within
    rounding)."""
    from dgqtool.nn.dgq_linear import DGQLinear
    from dgqtool.quant.rotate import FactoredHadamard, factored_hadamard

    rotation = factored_hadamard(k, seed=4)
    if paley == 1 and k == 1536:
        rotation = FactoredHadamard(rotation.signs, torch.ones(1, 1, dtype=torch.float64), 128)
    assert rotation.paley.shape[0] == paley
    w = random_dual_grained(576, k, 64, torch.Generator().manual_seed(2))
    module = DGQLinear.from_weight(w, None, None, dtype, rotation)
    x = torch.randn(3, 40, k, dtype=dtype)
    x[..., :2] *= 30
    ref = module(x)
    gpu_module = module.cuda()
    for batch, rows in ((1, 1), (3, 8), (3, 40)):
        got, want = gpu_module(x[:batch, :rows].cuda()).cpu(), ref[:batch, :rows]
        exact = torch.equal(got, want)
        assert exact if paley == 1 else exact or ((got - want).float().norm() / want.float().norm()) < 1e-2, (batch, rows)
    if paley == 1:  # the C++ kernel's fused rotating quantizer = the Python kernel's rotate, then quantize
        b, t = gpu_module._buffers, rotation.sylvester_order
        args = (b["qweight"], b["scales_s2"], b["qzeros"], b["scales_s1"], 64)
        for rows in (0, 1, 8, 40):
            xs = x[0, :rows].cuda()
            for scale in (None, torch.tensor([0.03], device="cuda")):
                assert torch.equal(torch.ops.dgq.rotated_linear.default(xs, b["online_signs"], t, *args, scale),
                                   torch.ops.dgq.rotated_linear_python.default(xs, b["online_signs"], t, *args, scale))
    # one graph through the rotated linear's op (dgq run's compiled decode)
    torch._dynamo.reset()
    x8 = x[:3, :8].cuda()
    assert torch.equal(torch.compile(gpu_module, fullgraph=True, backend="aot_eager")(x8), gpu_module(x8))



def _normalized(x, weight, inv_rms):
    """RMSNorm(x) with the given per-row 1 / rms: LlamaRMSNorm's two roundings."""
    return weight * (x.float() * inv_rms.unsqueeze(1)).to(x.dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 576), (17, 4096), (100, 11008), (1000, 576), (4097, 4096),
                                 (1025, 11008), (2, 65536)])
@pytest.mark.parametrize("static", [False, True])
def test_rmsnorm_quantization_equals_norming_then_quantizing(dtype, m, k, static):
    """The RMSNorm fused into the per-token quantizer, every register launch shape (one load a
    thread, several held, several rows a block, the longest rows it takes): with the row's 1 / rms
    the kernel reports, codes and scales equal LlamaRMSNorm's roundings then the torch quantizer,
    in natural and permuted order; that 1 / rms is the exact one within 16 ulp (fp32 sums of up to
    65536 squares in another order)."""
    from dgqtool.kernels import runtime

    lib = _library()
    x = (torch.randn(m, k, device="cuda") * torch.logspace(-2, 2, m, device="cuda").unsqueeze(1)).to(dtype)
    x[:, :3] *= 40  # massive channels
    if m > 2:
        x[1] = 0  # an all-zero row: 1 / sqrt(eps), codes 0 at the scale floor
    weight = (torch.rand(k, device="cuda") * 2).to(dtype)
    scale = torch.tensor([0.05], device="cuda") if static else None
    inv = torch.empty(m, device="cuda")
    q, s = runtime.rmsnorm_quantize_rows(lib, x, weight, 1e-5, scale, inv_rms=inv)
    y = _normalized(x, weight, inv)
    want_q, want_s = quantize_per_tensor(y, scale) if static else quantize_per_token(y)
    assert torch.equal(q, want_q) and torch.equal(s, want_s.expand_as(s)), (m, k)
    exact = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-5)
    assert ((inv.double() - exact).abs() <= exact * 2e-6).all()
    q_p, s_p = runtime.rmsnorm_quantize_rows(lib, x, weight, 1e-5, scale, permuted=True)
    assert torch.equal(q_p, runtime.permute_s8(lib, q)) and torch.equal(s_p, s)
    assert not torch.equal(q, runtime.quantize_rows(lib, x, scale)[0])  # the norm did act


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_linear_on_every_path_equals_the_linear_of_the_norm(dtype):
    """dgq::norm_linear (C++ kernel: GEMV and tensor-core paths; Python kernel: wgmma and expansion)
    equals dgq::linear of the norm computed with the kernel's 1 / rms, bit for bit; a weight of
    another dtype takes the unfused reference (the norm in torch ops)."""
    from dgqtool import ops
    from dgqtool.kernels import runtime

    lib = _library()
    n, k, group = 1536, 4096, 128
    _, qweight, s2, zero, s1 = _weight(n, k, group)
    weight = (torch.rand(k, device="cuda") * 2).to(dtype)
    wgmma_key = f"{runtime._bucket(300)},{n},{k}"
    saved, taken = dict(lib.paths), set()
    try:
        for m, path in ((1, None), (8, None), (40, None), (300, "wgmma"), (2048, None)):
            if path and lib.wgmma_variants:  # this untuned shape takes the expansion path at 300 rows
                lib.paths[wgmma_key] = [path, list(runtime.wgmma_default(m, n, k))]
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            taken.add(runtime.choose_path(lib, m, n, k)[0])
            if m <= 8:  # the C++ kernel runs these itself, through the fused norm quantizer
                assert runtime.native_plan(lib, x, n)[6] != 0
            inv = torch.empty(m, device="cuda")
            runtime.rmsnorm_quantize_rows(lib, x, weight, 1e-6, inv_rms=inv)
            want = ops.linear(_normalized(x, weight, inv), qweight, s2, zero, s1, group)
            assert torch.equal(ops.norm_linear(x, weight, 1e-6, qweight, s2, zero, s1, group), want), m
            assert torch.equal(torch.ops.dgq.norm_linear_python.default(x, weight, 1e-6, qweight, s2, zero, s1, group), want), m
    finally:
        lib.paths.clear()
        lib.paths.update(saved)
    assert taken >= {"gemv", "mma", "gemm"} and ("wgmma" in taken) == bool(lib.wgmma_variants), taken
    unfused = ops.norm_linear(x, weight.float(), 1e-6, qweight, s2, zero, s1, group)
    assert unfused.dtype == torch.float32
    assert torch.equal(unfused, ops.linear(ops.rms_norm(x, weight.float(), 1e-6), qweight, s2, zero, s1, group))
    assert ops.norm_linear(x[:0], weight, 1e-6, qweight, s2, zero, s1, group).shape == (0, n)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 11008), (3, 576), (17, 1536), (300, 11008), (1025, 11008), (4097, 1536)])
@pytest.mark.parametrize("static", [False, True])
def test_silu_mul_quantization_equals_the_torch_ops_then_quantizing(dtype, m, k, static):
    """The gated MLP's silu(gate) * up fused into the per-token quantizer, every register launch
    shape: codes and scales equal torch's CUDA ops (what the model computes) then the torch
    quantizer, in natural and permuted order."""
    from dgqtool import ops
    from dgqtool.kernels import runtime

    lib = _library()
    x = (torch.randn(m, 2 * k, device="cuda") * 4).to(dtype)
    x[:, :3] *= 10  # massive gate channels
    scale = torch.tensor([0.05], device="cuda") if static else None
    y = ops.silu_mul(x)
    want_q, want_s = quantize_per_tensor(y, scale) if static else quantize_per_token(y)
    q, s = runtime.silu_mul_quantize_rows(lib, x, scale)
    assert torch.equal(q, want_q) and torch.equal(s, want_s.expand_as(s)), (m, k)
    q_p, s_p = runtime.silu_mul_quantize_rows(lib, x, scale, permuted=True)
    assert torch.equal(q_p, runtime.permute_s8(lib, q)) and torch.equal(s_p, s)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul_linear_on_every_path_equals_the_linear_of_the_activation(dtype):
    """dgq::silu_mul_linear (C++ kernel: GEMV and tensor-core paths, the plan asked for the (M, K)
    linear; Python kernel: wgmma and expansion) equals dgq::linear of torch's silu(gate) * up."""
    from dgqtool import ops
    from dgqtool.kernels import runtime

    lib = _library()
    n, k, group = 1024, 2048, 128
    _, qweight, s2, zero, s1 = _weight(n, k, group)
    wgmma_key = f"{runtime._bucket(300)},{n},{k}"
    saved, taken = dict(lib.paths), set()
    try:
        for m, path in ((1, None), (8, None), (40, None), (300, "wgmma"), (2048, None)):
            if path and lib.wgmma_variants:
                lib.paths[wgmma_key] = [path, list(runtime.wgmma_default(m, n, k))]
            x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)
            taken.add(runtime.choose_path(lib, m, n, k)[0])
            if m <= 8:
                assert runtime.native_plan(lib, x[:, :k], n)[7] != 0
            want = ops.linear(ops.silu_mul(x), qweight, s2, zero, s1, group)
            assert torch.equal(ops.silu_mul_linear(x, qweight, s2, zero, s1, group), want), m
            assert torch.equal(torch.ops.dgq.silu_mul_linear_python.default(x, qweight, s2, zero, s1, group), want), m
    finally:
        lib.paths.clear()
        lib.paths.update(saved)
    assert taken >= {"gemv", "mma", "gemm"} and ("wgmma" in taken) == bool(lib.wgmma_variants), taken
    assert ops.silu_mul_linear(x[:0], qweight, s2, zero, s1, group).shape == (0, n)
