// Hand-written DGQ kernels (sm_80+): the exact 4-bit -> int8 weight conversion, a fused W4A8 GEMV
// for decode-sized M, a fused tensor-core (mma.sync) kernel for small and mid M, and per-token int8
// activation quantization.
//
// Packed layout (dgqtool.quant.dual_grained.pack_nibbles): byte i of a weight row holds input
// feature 2i in the low nibble and 2i+1 in the high one, so a little-endian 32-bit word holds
// features 8j..8j+7 at bits 4t. S2 (int8) and zp (uint8) are (N, K/g); s1 is fp16 (N,).
//
// Conversion, 2 instructions per 4 weights (LiquidGEMM's IMAD + XOR): with
//   C = (128 - S2*zp) * 0x01010101 (mod 2^32),
//   ((word & 0x0F0F0F0F) * S2 + C) ^ 0x80808080
// every byte is 128 + S2*(code - zp) in [1, 255] before the XOR -- DGQ's code clamp keeps
// |S2*(code - zp)| <= 127, so no byte carries -- and the XOR turns it into that int8 exactly.
// The low nibbles give features 8j+{0,2,4,6}, the high ones 8j+{1,3,5,7}.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#ifndef DGQ_PDL
#define DGQ_PDL 0
#endif

#include "dgq_host_env.cuh"  // g_env: the A/B switches, read once (outside the anonymous namespace: one instance)

namespace {

__device__ __forceinline__ uint32_t group_constant(int s2, int zp) {
  return static_cast<uint32_t>(128 - s2 * zp) * 0x01010101u;
}

#include "dgq_word_group.cuh"  // WordGroup

__device__ __forceinline__ void convert8(uint32_t word, uint32_t s2, uint32_t c, uint32_t& even, uint32_t& odd) {
  even = ((word & 0x0F0F0F0Fu) * s2 + c) ^ 0x80808080u;
  odd = (((word >> 4) & 0x0F0F0F0Fu) * s2 + c) ^ 0x80808080u;
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

// Programmatic dependent launch (Hopper builds, DGQ_PDL): the activation quantization lets the
// fused GEMV / tensor-core kernel that consumes it launch while it still runs; the consumer starts
// its blocks and loads its first codes (into L2 or registers), then waits (griddepcontrol.wait: the producer
// grid completed and its writes are visible) before it reads the activations. Hides the gap
// between the two kernels, which at decode sizes is a third of the linear's time.
__device__ __forceinline__ void allow_dependents() {
#if DGQ_PDL
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void wait_for_producer() {
#if DGQ_PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

template <typename Kernel, typename... Args>
int launch(Kernel kernel, dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = DGQ_PDL && !dgq_host::g_env.pdl_off ? 1 : 0;  // DGQ_PDL=0: plain stream order
  return cudaLaunchKernelEx(&config, kernel, args...) == cudaSuccess ? 0 : 3;
}

// One thread per 32 input features (one uint4 of codes): writes the int8 weight row-major (N, K).
__global__ void unpack_s8_kernel(const uint4* __restrict__ qweight, const int8_t* __restrict__ s2,
                                 const uint8_t* __restrict__ zp, uint4* __restrict__ w, int n, int k, int group) {
  const int chunks_per_row = k / 32;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(n) * chunks_per_row) return;
  const int row = static_cast<int>(i / chunks_per_row);
  const int g = static_cast<int>(i % chunks_per_row) * 32 / group;
  const int64_t sg = static_cast<int64_t>(row) * (k / group) + g;
  const uint32_t scale = static_cast<uint32_t>(s2[sg]);
  const uint32_t c = group_constant(s2[sg], zp[sg]);
  const uint4 q = qweight[i];
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  uint32_t outw[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t even, odd;
    convert8(words[j], scale, c, even, odd);
    outw[2 * j] = __byte_perm(even, odd, 0x5140);      // features 8j+0..3
    outw[2 * j + 1] = __byte_perm(even, odd, 0x7362);  // features 8j+4..7
  }
  w[2 * i] = make_uint4(outw[0], outw[1], outw[2], outw[3]);
  w[2 * i + 1] = make_uint4(outw[4], outw[5], outw[6], outw[7]);
}

__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Fused tensor-core W4A8 for small and mid M, in the swapped form out^T = W x^T: the converted
// weights are mma's A operand (16 channels per m16 tile, CT tiles per warp), the int8 tokens are B
// (8 per n8 tile, TT tiles per block). A K step is 128 features; lane (g = lane / 4, t = lane % 4)
// loads one 16-byte word of codes -- features [32t, 32t + 32) -- for channels g and g + 8 of each
// tile, and the same 32 features of token g. The dot product does not care which feature sits in
// which mma k slot as long as A and B agree, so slot 4t + i of sub-step j carries feature
// 32t + 8j + 2i and slot 16 + 4t + i feature 32t + 8j + 2i + 1: exactly the even / odd words of
// convert8, and two byte permutes of the activations. No weight reordering, loads fully coalesced
// (a warp reads 64 contiguous bytes per channel). The block's warps split K and sum their int32
// tiles in shared memory, so the result is exact whatever the split.
template <int CT, int TT, int MAX_THREADS, typename Out>
__global__ void __launch_bounds__(MAX_THREADS) mma_kernel(const uint4* __restrict__ qweight, const int8_t* __restrict__ s2,
                                                  const uint8_t* __restrict__ zp, const __half* __restrict__ s1,
                                                  const int8_t* __restrict__ x, const float* __restrict__ s_x,
                                                  Out* __restrict__ out, int m, int n, int k, int group) {
  constexpr int CHANNELS = 16 * CT, TOKENS = 8 * TT;
  __shared__ int tile[TOKENS][CHANNELS];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ch0 = blockIdx.x * CHANNELS, tok0 = blockIdx.y * TOKENS;
  const int words_per_row = k / 32, groups = k / group;
  const WordGroup group_of(group);
  for (int i = threadIdx.x; i < TOKENS * CHANNELS; i += blockDim.x) (&tile[0][0])[i] = 0;

  int row[CT][2];  // rows past n (and tokens past m) repeat the last one; their results are not stored
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int h = 0; h < 2; ++h) row[c][h] = min(ch0 + 16 * c + 8 * h + g, n - 1);
  const uint4* xrow[TT];
#pragma unroll
  for (int tt = 0; tt < TT; ++tt)
    xrow[tt] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(min(tok0 + 8 * tt + g, m - 1)) * k);

  int acc[CT][TT][4];
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int tt = 0; tt < TT; ++tt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[c][tt][i] = 0;

  const int steps = (k + 127) / 128;
  if (warp * 4 + t < words_per_row)
#pragma unroll
    for (int c = 0; c < CT; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) prefetch_l2(qweight + static_cast<int64_t>(row[c][h]) * words_per_row + warp * 4 + t);
  wait_for_producer();
#pragma unroll 2
  for (int step = warp; step < steps; step += warps) {
    const int word = step * 4 + t;  // this lane's 32 features
    const bool live = word < words_per_row;  // K % 128 != 0: the tail lanes feed zeros
    uint32_t even[CT][2][4], odd[CT][2][4];
#pragma unroll
    for (int c = 0; c < CT; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row[c][h];
        const uint4 q = live ? __ldg(qweight + static_cast<int64_t>(r) * words_per_row + word) : make_uint4(0, 0, 0, 0);
        const int sg = r * groups + (live ? group_of(word) : 0);
        const uint32_t scale = static_cast<uint32_t>(s2[sg]);
        const uint32_t cst = group_constant(s2[sg], zp[sg]);
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) convert8(words[j], scale, cst, even[c][h][j], odd[c][h][j]);
      }
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      const uint4 lo = live ? __ldg(xrow[tt] + 2 * word) : make_uint4(0, 0, 0, 0);
      const uint4 hi = live ? __ldg(xrow[tt] + 2 * word + 1) : make_uint4(0, 0, 0, 0);
      const uint32_t xs[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t xe = __byte_perm(xs[2 * j], xs[2 * j + 1], 0x6420);
        const uint32_t xo = __byte_perm(xs[2 * j], xs[2 * j + 1], 0x7531);
#pragma unroll
        for (int c = 0; c < CT; ++c)
          mma_s8(acc[c][tt], even[c][0][j], even[c][1][j], odd[c][0][j], odd[c][1][j], xe, xo);
      }
    }
  }
  __syncthreads();  // the tile is zeroed
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int tt = 0; tt < TT; ++tt)
#pragma unroll
      for (int i = 0; i < 4; ++i)  // accumulator i: channel g (+8 for i >= 2), token 2t (+1 for odd i)
        atomicAdd(&tile[8 * tt + 2 * t + (i & 1)][16 * c + g + 8 * (i >> 1)], acc[c][tt][i]);
  __syncthreads();
  for (int i = threadIdx.x; i < TOKENS * CHANNELS; i += blockDim.x) {
    const int token = tok0 + i / CHANNELS, channel = ch0 + i % CHANNELS;
    if (token < m && channel < n)
      out[static_cast<int64_t>(token) * n + channel] =
          from_float<Out>((static_cast<float>(tile[i / CHANNELS][i % CHANNELS]) * s_x[token]) * __half2float(s1[channel]));
  }
}

// The fused wgmma kernel's activation order (dgq_wgmma_sm90.cuh): within each 128-feature block,
// feature 32t + 8j + 2i + e sits at 32j + 16e + 4t + i, so the tokens in shared memory match the
// k slots of the converted weight words; rows are padded with zeros to a multiple of 128. A group
// of 8 features 8u..8u+7 (one t, j) lands as two 4-byte words: evens at `base`, odds at base + 16.
__device__ __forceinline__ int permuted_base(int f0) {
  const int within = f0 & 127;
  return (f0 & ~127) + 32 * ((within >> 3) & 3) + 4 * (within >> 5);
}

__device__ __forceinline__ void store_permuted(int8_t* qrow, int f0, uint32_t lo, uint32_t hi) {
  const int base = permuted_base(f0);  // lo: features f0..f0+3, hi: f0+4..f0+7 (little-endian bytes)
  *reinterpret_cast<uint32_t*>(qrow + base) = __byte_perm(lo, hi, 0x6420);
  *reinterpret_cast<uint32_t*>(qrow + base + 16) = __byte_perm(lo, hi, 0x7531);
}

// Natural int8 rows (m, k) -> the permuted, zero-padded order (m, k_pad); one thread per 8 features.
__global__ void permute_s8_kernel(const int8_t* __restrict__ x, int8_t* __restrict__ y, int m, int k, int k_pad) {
  const int units = k_pad / 8;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(m) * units) return;
  const int r = static_cast<int>(i / units), f0 = static_cast<int>(i % units) * 8;
  uint2 v = make_uint2(0, 0);
  if (f0 < k) v = *reinterpret_cast<const uint2*>(x + static_cast<int64_t>(r) * k + f0);
  store_permuted(y + static_cast<int64_t>(r) * k_pad, f0, v.x, v.y);
}

// Per-token (static_scale == nullptr) or static per-tensor symmetric int8, bit-identical to
// dgqtool.quant.quantizer: scale = max(amax * (1/127), 1e-8), q = clamp(rint(x / scale), -127, 127).
// Multiplying by r = rcp_rn(scale) instead of dividing: |x * r - x / scale| and |fl(x / scale) -
// x / scale| are both below 2.3e-5 for |x / scale| <= 128 (relative errors 2^-23 and 2^-24), so
// where x * r is more than 1e-3 away from a half-integer both round to the same integer; nearer
// one (ties included: round half to even), the correctly rounded division decides. Beyond 128 both
// clamp to +-127. A NaN (0 * inf for a subnormal static scale) also takes the division.
__device__ __forceinline__ int8_t quantize_one(float v, float s, float r) {
  const float y = v * r;
  float q = rintf(y);
  if (!(fabsf(y - q) <= 0.499f)) q = rintf(__fdiv_rn(v, s));
  return static_cast<int8_t>(fminf(fmaxf(q, -127.f), 127.f));
}

// The abs-max of one 16-byte load of In values, and its codes.
template <typename In>
__device__ __forceinline__ float load_amax(const uint4& raw) {
  const In* e = reinterpret_cast<const In*>(&raw);
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 16 / static_cast<int>(sizeof(In)); ++j) amax = fmaxf(amax, fabsf(to_float(e[j])));
  return amax;
}

template <typename In>
__device__ __forceinline__ void quantize_load(const uint4& raw, float s, float r, int8_t* out) {
  const In* e = reinterpret_cast<const In*>(&raw);
#pragma unroll
  for (int j = 0; j < 16 / static_cast<int>(sizeof(In)); ++j) out[j] = quantize_one(to_float(e[j]), s, r);
}

// Each row is reduced by the kTeam threads that read it (kTeam / 32 warps, one or more rows per
// block); every thread of the block calls it. Returns the row's scale.
template <int kTeam>
__device__ __forceinline__ float row_scale(float amax, float* warp_max) {
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  const int first = threadIdx.x / kTeam * (kTeam / 32);
  amax = 0.f;
#pragma unroll
  for (int w = 0; w < kTeam / 32; ++w) amax = fmaxf(amax, warp_max[first + w]);
  return fmaxf(amax * (1.0f / 127.f), 1e-8f);
}

// The row's sum over its kTeam threads, the same value in every thread (a xor butterfly, then the
// warps' partial sums in warp order).
template <int kTeam>
__device__ __forceinline__ float row_sum(float v, float* warp_part) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x / 32] = v;
  __syncthreads();
  const int first = threadIdx.x / kTeam * (kTeam / 32);
  v = 0.f;
#pragma unroll
  for (int w = 0; w < kTeam / 32; ++w) v += warp_part[first + w];
  return v;
}

// The RMSNorm in front of a quantizer (transformers' LlamaRMSNorm and its copies): in float32
// x * rsqrt(mean(x^2) + eps), rounded to In, times the weight w (In), rounded to In.
template <typename In>
struct RowNorm {
  const In* w;  // nullptr: no norm
  float eps;
  float* inv_rms;  // optional: each row's rsqrt(mean(x^2) + eps), the one value a reference needs to match
};

template <typename In>
__device__ __forceinline__ float load_square_sum(const uint4& raw) {
  const In* e = reinterpret_cast<const In*>(&raw);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < 16 / static_cast<int>(sizeof(In)); ++j) sum += to_float(e[j]) * to_float(e[j]);
  return sum;
}

// silu(g) * u of one 16-byte load each of the gate and up halves, rounded as torch's CUDA ops round
// transformers' act_fn(gate) * up: silu in float32 (g / (1 + exp(-g)), IEEE division, the accurate
// expf) rounded to In, the product rounded to In.
template <typename In>
__device__ __forceinline__ uint4 silu_mul_load(const uint4& gate, const uint4& up) {
  uint4 out;
  const In* g = reinterpret_cast<const In*>(&gate);
  const In* u = reinterpret_cast<const In*>(&up);
  In* o = reinterpret_cast<In*>(&out);
#pragma unroll
  for (int j = 0; j < 16 / static_cast<int>(sizeof(In)); ++j) {
    const float a = to_float(g[j]);
    const In act = from_float<In>(__fdiv_rn(a, __fadd_rn(1.f, expf(-a))));
    o[j] = from_float<In>(__fmul_rn(to_float(act), to_float(u[j])));
  }
  return out;
}

template <typename In>
__device__ __forceinline__ uint4 normalize_load(const uint4& raw, const uint4& weight, float inv) {
  uint4 out;
  const In* e = reinterpret_cast<const In*>(&raw);
  const In* w = reinterpret_cast<const In*>(&weight);
  In* o = reinterpret_cast<In*>(&out);
#pragma unroll
  for (int j = 0; j < 16 / static_cast<int>(sizeof(In)); ++j)
    o[j] = from_float<In>(__fmul_rn(to_float(w[j]), to_float(from_float<In>(__fmul_rn(to_float(e[j]), inv)))));
  return out;
}

// kTeam threads per row, blockDim.x / kTeam rows per block, VEC elements per 16-byte load. R > 0:
// each thread holds its R loads of the row in registers, so the row is read from memory once and
// all its loads are in flight together. R = 0 (rows too long for the registers, or float input in
// the permuted order): the row is read twice, the second time mostly from L2. PERM: the output in
// the wgmma kernel's order, rows of k_pad bytes; with R > 0 it needs 16-bit input, whose one load
// is exactly one 8-feature unit of it. PRE (R > 0 only) transforms the row into the registers
// first, so the transformed activation never goes to memory: kNorm its RMSNorm (RowNorm); kSiluMul
// rows of 2k values [gate | up] become silu(gate) * up (the MLP's input to down_proj).
enum class Pre { kNone, kNorm, kSiluMul };

template <typename In, bool PERM, int R, int kTeam, Pre PRE = Pre::kNone>
__global__ void __launch_bounds__(1024) quantize_rows_kernel(const In* __restrict__ x, int8_t* __restrict__ q,
                                                             float* __restrict__ scale,
                                                             const float* __restrict__ static_scale, int m, int k,
                                                             int k_pad, RowNorm<In> norm) {
  constexpr int VEC = 16 / sizeof(In);
  static_assert(R == 0 || !PERM || VEC == 8, "the register path permutes whole 8-feature loads");
  static_assert(kTeam % 32 == 0, "a row is read by whole warps");
  static_assert(PRE == Pre::kNone || R > 0, "the transform needs the row in registers");
  allow_dependents();
  __shared__ float warp_max[32];
  const int r_index = blockIdx.x * (blockDim.x / kTeam) + threadIdx.x / kTeam, lane = threadIdx.x % kTeam;
  const bool live = r_index < m;  // the last block's spare teams still join the barrier
  const int64_t row_id = live ? r_index : m - 1;
  const uint4* row = reinterpret_cast<const uint4*>(x + row_id * (PRE == Pre::kSiluMul ? 2 * k : k));
  int8_t* const qrow = q + row_id * (PERM ? k_pad : k);
  auto store = [&](int v, const int8_t* out) {  // the VEC codes of load v, natural order
    if constexpr (VEC == 8) {
      reinterpret_cast<uint2*>(qrow)[v] = *reinterpret_cast<const uint2*>(out);
    } else {
      reinterpret_cast<uint32_t*>(qrow)[v] = *reinterpret_cast<const uint32_t*>(out);
    }
  };
  const int vectors = k / VEC;
  uint4 held[R > 0 ? R : 1];
  if constexpr (R > 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int v = lane + r * kTeam;
      if constexpr (PRE == Pre::kSiluMul) {
        held[r] = v < vectors ? silu_mul_load<In>(row[v], row[vectors + v]) : make_uint4(0, 0, 0, 0);
      } else {
        held[r] = v < vectors ? row[v] : make_uint4(0, 0, 0, 0);
      }
    }
  }
  if constexpr (PRE == Pre::kNorm) {
    __shared__ float warp_part[32];
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) sum += load_square_sum<In>(held[r]);
    const float inv = rsqrtf(__fdiv_rn(row_sum<kTeam>(sum, warp_part), static_cast<float>(k)) + norm.eps);
    const uint4* weight = reinterpret_cast<const uint4*>(norm.w);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int v = lane + r * kTeam;
      if (v < vectors) held[r] = normalize_load<In>(held[r], weight[v], inv);
    }
    if (live && lane == 0 && norm.inv_rms != nullptr) norm.inv_rms[row_id] = inv;
  }
  float s;
  if (static_scale == nullptr) {
    float amax = 0.f;
    if constexpr (R > 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) amax = fmaxf(amax, load_amax<In>(held[r]));
    } else {
      for (int v = lane; v < vectors; v += kTeam) amax = fmaxf(amax, load_amax<In>(row[v]));
    }
    s = row_scale<kTeam>(amax, warp_max);
  } else {
    s = static_scale[0];
  }
  if (!live) return;
  const float rs = __frcp_rn(s);
  if (lane == 0) scale[row_id] = s;
  if constexpr (R > 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int v = lane + r * kTeam;
      if (v >= vectors) continue;
      int8_t out[VEC];
      quantize_load<In>(held[r], s, rs, out);
      if constexpr (PERM) {
        store_permuted(qrow, 8 * v, *reinterpret_cast<const uint32_t*>(out), *reinterpret_cast<const uint32_t*>(out + 4));
      } else {
        store(v, out);
      }
    }
    if constexpr (PERM)  // the zero padding up to k_pad
      for (int u = vectors + lane; u < k_pad / 8; u += kTeam) store_permuted(qrow, 8 * u, 0, 0);
  } else if constexpr (PERM) {
    for (int u = lane; u < k_pad / 8; u += kTeam) {
      uint32_t word[2] = {0, 0};
      if (8 * u < k) {
        int8_t out[8];
#pragma unroll
        for (int h = 0; h < 8 / VEC; ++h) quantize_load<In>(row[u * (8 / VEC) + h], s, rs, out + h * VEC);
        word[0] = *reinterpret_cast<const uint32_t*>(out);
        word[1] = *reinterpret_cast<const uint32_t*>(out + 4);
      }
      store_permuted(qrow, 8 * u, word[0], word[1]);
    }
  } else {
    for (int v = lane; v < vectors; v += kTeam) {
      int8_t out[VEC];
      quantize_load<In>(row[v], s, rs, out);
      store(v, out);
    }
  }
}

// Decode GEMV for one token. At decode sizes the kernel is bound by the bytes it keeps in flight
// (Nsight Compute on the H100: ~2 blocks and 3.5 warps per scheduler, stalls mostly on global
// loads), so every lane keeps U steps of codes in flight: the first U are issued before the kernel
// waits for the activation quantization it overlaps (programmatic dependent launch) -- with U = 4,
// all of a row's codes for K = 4096 -- and each next U before the current ones are converted. A
// warp owns CH output channels; lane i takes 32 features (one 16-byte word of codes) per channel
// per step, converts them in registers and accumulates with dp4a against the int8 token, whose
// bytes are permuted to the even/odd feature order of the converted words.
template <int CH, int U>
struct CodeSteps {
  uint4 q[U][CH];
  uint32_t scale[U][CH], cst[U][CH];

  __device__ __forceinline__ void load(const uint4* __restrict__ qweight, const int8_t* __restrict__ s2,
                                       const uint8_t* __restrict__ zp, const int (&channel)[CH], int first_chunk,
                                       int chunks, int groups, const WordGroup& group_of) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = first_chunk + 32 * u;
      if (chunk >= chunks) continue;
      const int gi = group_of(chunk);
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        q[u][c] = __ldg(qweight + static_cast<int64_t>(channel[c]) * chunks + chunk);
        const int sg = channel[c] * groups + gi;
        scale[u][c] = static_cast<uint32_t>(s2[sg]);
        cst[u][c] = group_constant(s2[sg], zp[sg]);
      }
    }
  }
};

template <int CH, int U, typename Out>
__global__ void __launch_bounds__(256) gemv_kernel(const uint4* __restrict__ qweight, const int8_t* __restrict__ s2,
                                                   const uint8_t* __restrict__ zp, const __half* __restrict__ s1,
                                                   const int8_t* __restrict__ x, const float* __restrict__ s_x,
                                                   Out* __restrict__ out, int n, int k, int group) {
  const int lane = threadIdx.x & 31;
  const int first = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * CH;
  if (first >= n) return;
  const int chunks = k / 32, groups = k / group;
  const WordGroup group_of(group);
  int channel[CH];  // a tail warp recomputes the last channel, unwritten
#pragma unroll
  for (int c = 0; c < CH; ++c) channel[c] = min(first + c, n - 1);

  CodeSteps<CH, U> cur;
  cur.load(qweight, s2, zp, channel, lane, chunks, groups, group_of);
  wait_for_producer();
  const uint4* token = reinterpret_cast<const uint4*>(x);
  int acc[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) acc[c] = 0;
  for (int base = lane; base < chunks; base += 32 * U) {
    CodeSteps<CH, U> next;
    if (base + 32 * U < chunks) next.load(qweight, s2, zp, channel, base + 32 * U, chunks, groups, group_of);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = base + 32 * u;
      if (chunk < chunks) {
        const uint4 a = __ldg(token + 2 * chunk), b = __ldg(token + 2 * chunk + 1);
        const uint32_t xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          const uint32_t words[4] = {cur.q[u][c].x, cur.q[u][c].y, cur.q[u][c].z, cur.q[u][c].w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t even, odd;
            convert8(words[j], cur.scale[u][c], cur.cst[u][c], even, odd);
            acc[c] = __dp4a(static_cast<int>(even), static_cast<int>(__byte_perm(xs[2 * j], xs[2 * j + 1], 0x6420)), acc[c]);
            acc[c] = __dp4a(static_cast<int>(odd), static_cast<int>(__byte_perm(xs[2 * j], xs[2 * j + 1], 0x7531)), acc[c]);
          }
        }
      }
    }
    cur = next;
  }
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    int v = acc[c];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0 && first + c < n)
      out[first + c] = from_float<Out>((static_cast<float>(v) * s_x[0]) * __half2float(s1[first + c]));
  }
}

template <int CH, int U, typename Out>
int launch_gemv(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                const float* s_x, void* out, int n, int k, int group, cudaStream_t stream) {
  constexpr int warps = 8;
  const int per_block = warps * CH;
  return launch(gemv_kernel<CH, U, Out>, dim3((n + per_block - 1) / per_block), dim3(warps * 32), stream,
                static_cast<const uint4*>(qweight), s2, zp, static_cast<const __half*>(s1), x, s_x,
                static_cast<Out*>(out), n, k, group);
}

// Configurations (channels per warp, steps in flight per lane): more steps in flight suit few
// output channels (o, down at decode: one wave of blocks), fewer registers suit many (qkv, gate_up).
template <typename Out>
int gemv_dispatch(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                  const float* s_x, void* out, int n, int k, int group, int channels_per_warp, int steps,
                  cudaStream_t stream) {
  if (k < 1 || k % 32 || group < 1 || group % 32 || k % group) return 1;
#define DGQ_GEMV_CONFIG(CH, U) \
  if (channels_per_warp == CH && steps == U) return launch_gemv<CH, U, Out>(qweight, s2, zp, s1, x, s_x, out, n, k, group, stream);
  DGQ_GEMV_CONFIG(2, 1)
  DGQ_GEMV_CONFIG(2, 2)
  DGQ_GEMV_CONFIG(2, 4)
  DGQ_GEMV_CONFIG(1, 8)
  DGQ_GEMV_CONFIG(4, 2)
#undef DGQ_GEMV_CONFIG
  return 1;
}

template <int CT, int TT, typename Out>
int launch_mma(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
               const float* s_x, void* out, int m, int n, int k, int group, int warps, cudaStream_t stream) {
  const dim3 grid((n + 16 * CT - 1) / (16 * CT), (m + 8 * TT - 1) / (8 * TT));
  // 16 warps (register cap 128): built for one channel tile and up to 16 tokens, where it fits
  if constexpr (CT == 1 && TT <= 2) {
    if (warps == 16)
      return launch(mma_kernel<CT, TT, 512, Out>, grid, dim3(warps * 32), stream, static_cast<const uint4*>(qweight),
                    s2, zp, static_cast<const __half*>(s1), x, s_x, static_cast<Out*>(out), m, n, k, group);
  }
  if (warps > 8) return 1;
  return launch(mma_kernel<CT, TT, 256, Out>, grid, dim3(warps * 32), stream, static_cast<const uint4*>(qweight), s2,
                zp, static_cast<const __half*>(s1), x, s_x, static_cast<Out*>(out), m, n, k, group);
}

// Token tiles from M (up to 64 tokens per block; more M adds blocks that re-read the weights from
// L2); channel tiles per warp (1 or 2) and warps per block (4, 8 or 16 -- more warps split K
// finer, so more bytes are in flight when N gives few blocks) are the tuned knobs.
template <int CT, typename Out>
int mma_by_rows(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                const float* s_x, void* out, int m, int n, int k, int group, int warps, cudaStream_t stream) {
  if (m <= 8) return launch_mma<CT, 1, Out>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, warps, stream);
  if (m <= 16) return launch_mma<CT, 2, Out>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, warps, stream);
  if (m <= 32) return launch_mma<CT, 4, Out>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, warps, stream);
  return launch_mma<CT, 8, Out>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, warps, stream);
}

template <typename Out>
int mma_dispatch(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                 const float* s_x, void* out, int m, int n, int k, int group, int channel_tiles, int warps,
                 cudaStream_t stream) {
  if (k < 1 || k % 32 || group < 1 || group % 32 || k % group || m < 1 || (warps != 4 && warps != 8 && warps != 16))
    return 1;
  if (channel_tiles == 1) return mma_by_rows<1, Out>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, warps, stream);
  if (channel_tiles == 2) return mma_by_rows<2, Out>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, warps, stream);
  return 1;
}

template <typename In, bool PERM = false, Pre PRE = Pre::kNone>
int quantize_rows(const void* x, int8_t* q, float* scale, const float* static_scale, int m, int k, cudaStream_t stream,
                  RowNorm<In> norm = {nullptr, 0.f, nullptr}) {
  constexpr int VEC = 16 / sizeof(In);
  constexpr int kMaxHeld = 8;  // 16-byte loads a thread keeps in registers
  if (k % VEC || (PERM && k % 32)) return 1;
  const int vectors = k / VEC, k_pad = (k + 127) / 128 * 128;
  auto run = [&](auto kernel, int team) {
    // Up to ~1024 rows a row's latency is the kernel's: a block per row (measured: 64-thread
    // teams of 4 rows per block doubled M = 128...512). Many rows: 256-thread blocks of several
    // rows, fewer blocks to schedule (M = 8192: 57 -> 42 us for K = 4096).
    const int rows_per_block = m <= 1024 ? 1 : 256 / min(team, 256);
    kernel<<<(m + rows_per_block - 1) / rows_per_block, team * rows_per_block, 0, stream>>>(
        static_cast<const In*>(x), q, scale, static_scale, m, k, k_pad, norm);
    return cudaGetLastError() == cudaSuccess ? 0 : 3;
  };
  if constexpr (PERM && VEC != 8) {
    if constexpr (PRE != Pre::kNone) return 1;  // the transforms need the register path
    return run(quantize_rows_kernel<In, PERM, 0, 256>, 256);
  } else {
    if (m <= 1024) {  // about one load per thread, a block per row: enough blocks, short rows in flight
      if (vectors <= 256) return run(quantize_rows_kernel<In, PERM, 1, 256, PRE>, 256);
      if (vectors <= 1024) return run(quantize_rows_kernel<In, PERM, 1, 1024, PRE>, 1024);
      if (vectors <= 2048) return run(quantize_rows_kernel<In, PERM, 2, 1024, PRE>, 1024);
    }
    // 64 threads per row holding up to 8 loads each: K <= 4096 (16-bit) in registers
    if (vectors <= 64 * kMaxHeld) return run(quantize_rows_kernel<In, PERM, kMaxHeld, 64, PRE>, 64);
    if (vectors <= 256 * kMaxHeld) return run(quantize_rows_kernel<In, PERM, kMaxHeld, 256, PRE>, 256);
    if (vectors <= 1024 * kMaxHeld) return run(quantize_rows_kernel<In, PERM, kMaxHeld, 1024, PRE>, 1024);
    if constexpr (PRE != Pre::kNone) return 1;
    return run(quantize_rows_kernel<In, PERM, 0, 1024>, 1024);
  }
}


// Per-token int8 quantization of x Q with the online rotation Q = diag(s) blockdiag(S_t) / sqrt(t)
// fused in (quant/rotate.py FactoredHadamard with no Paley factor), so x Q never goes to memory.
// `signs` holds s (+-1) in float32, `sign_scale` fl32(t^-1/2) as Python's t ** -0.5 rounds it: the
// product is exactly FactoredHadamard.apply's scaled sign. A lane owns E = t / 32 consecutive
// features of a t-block (one load), a warp a block at a time, the block's warps R blocks each, held
// in registers. The butterflies run in FactoredHadamard.apply's order -- strides 1, 2, ..., t / 2,
// each one fp32 add or subtract, in registers below E and across lanes from E on -- and the result
// is rounded once to In, so the rotated values are apply()'s bit for bit and the codes and scales
// those of the plain quantizer on them. With `rotated` set it writes those values and quantizes nothing.
template <typename In, int E, int R, int W>
__global__ void __launch_bounds__(32 * W) hadamard_quantize_rows_kernel(const In* __restrict__ x,
                                                                     const float* __restrict__ signs,
                                                                     int8_t* __restrict__ q, float* __restrict__ scale,
                                                                     const float* __restrict__ static_scale,
                                                                     In* __restrict__ rotated, float sign_scale, int k) {
  constexpr int T = 32 * E;
  static_assert(E * sizeof(In) <= 16 && (E & (E - 1)) == 0, "a lane loads its E features at once");
  __shared__ float warp_max[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32, blocks = k / T;
  const int64_t row = blockIdx.x;
  float v[R][E];
  float amax = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int b = warp + r * warps;
    if (b >= blocks) continue;
    const int f0 = b * T + lane * E;
    In raw[E];
    if constexpr (E * sizeof(In) == 16) {
      *reinterpret_cast<uint4*>(raw) = *reinterpret_cast<const uint4*>(x + row * k + f0);
    } else if constexpr (E * sizeof(In) == 8) {
      *reinterpret_cast<uint2*>(raw) = *reinterpret_cast<const uint2*>(x + row * k + f0);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) raw[e] = x[row * k + f0 + e];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) v[r][e] = __fmul_rn(to_float(raw[e]), signs[f0 + e] * sign_scale);  // no FMA
#pragma unroll
    for (int h = 1; h < E; h *= 2)  // strides within the lane's E features
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (!(e & h)) {
          const float a = v[r][e], c = v[r][e + h];
          v[r][e] = __fadd_rn(a, c), v[r][e + h] = __fsub_rn(a, c);
        }
#pragma unroll
    for (int h = 1; h < 32; h *= 2) {  // strides E * h: the partner lane holds the other half
      const bool upper = lane & h;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float other = __shfl_xor_sync(0xffffffffu, v[r][e], h);
        v[r][e] = upper ? __fsub_rn(other, v[r][e]) : __fadd_rn(v[r][e], other);
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      v[r][e] = to_float(from_float<In>(v[r][e]));  // x Q in x's dtype, as FactoredHadamard.apply returns it
      amax = fmaxf(amax, fabsf(v[r][e]));
    }
  }
  if (rotated != nullptr) {  // the same for the whole grid: no thread reaches row_scale's barrier
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int b = warp + r * warps;
      if (b >= blocks) continue;
      In* dst = rotated + row * k + b * T + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e) dst[e] = from_float<In>(v[r][e]);
    }
    return;
  }
  const float s = static_scale == nullptr ? row_scale<32 * W>(amax, warp_max) : static_scale[0];
  const float rs = __frcp_rn(s);
  if (threadIdx.x == 0) scale[row] = s;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int b = warp + r * warps;
    if (b >= blocks) continue;
    int8_t out[E];
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = quantize_one(v[r][e], s, rs);
    int8_t* dst = q + row * k + b * T + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) dst[e] = out[e];
  }
}

// W warps per row: 32 while the rows alone fill too few warps (decode, small batches), so a
// row's blocks are spread over more warps and the row's latency shrinks; 8 for many rows.
template <typename In>
int hadamard_quantize_rows(const void* x, const float* signs, int8_t* q, float* scale, const float* static_scale,
                           void* rotated, int m, int k, int t, cudaStream_t stream) {
  if (m < 1 || t < 64 || k % t) return 1;
  const bool wide = m <= 64 && k / t > 8;
  const int warps = wide ? 32 : 8, per_warp = (k / t + warps - 1) / warps;
  const float sign_scale = static_cast<float>(std::pow(static_cast<double>(t), -0.5));  // libm pow, as Python's **
  auto run = [&](auto kernel) {
    kernel<<<m, 32 * warps, 0, stream>>>(static_cast<const In*>(x), signs, q, scale, static_scale,
                                         static_cast<In*>(rotated), sign_scale, k);
    return cudaGetLastError() == cudaSuccess ? 0 : 3;
  };
#define DGQ_HADAMARD_BLOCK(E)                                                                          \
  if (t == 32 * E) {                                                                                   \
    if (wide) {                                                                                        \
      if (per_warp <= 1) return run(hadamard_quantize_rows_kernel<In, E, 1, 32>);                      \
      if (per_warp <= 2) return run(hadamard_quantize_rows_kernel<In, E, 2, 32>);                      \
      if (per_warp <= 4) return run(hadamard_quantize_rows_kernel<In, E, 4, 32>);                      \
    } else {                                                                                           \
      if (per_warp <= 1) return run(hadamard_quantize_rows_kernel<In, E, 1, 8>);                       \
      if (per_warp <= 2) return run(hadamard_quantize_rows_kernel<In, E, 2, 8>);                       \
      if (per_warp <= 4) return run(hadamard_quantize_rows_kernel<In, E, 4, 8>);                       \
      if (per_warp <= 6) return run(hadamard_quantize_rows_kernel<In, E, 6, 8>);                       \
      if (per_warp <= 8) return run(hadamard_quantize_rows_kernel<In, E, 8, 8>);                       \
    }                                                                                                  \
  }
  DGQ_HADAMARD_BLOCK(2)
  DGQ_HADAMARD_BLOCK(4)
  DGQ_HADAMARD_BLOCK(8)
#undef DGQ_HADAMARD_BLOCK
  return 1;
}

}  // namespace

// C entry points (loaded with ctypes). Return 0 on success, 1 unsupported shape, 3 launch error.
extern "C" int dgq_unpack_s8(const void* qweight, const int8_t* s2, const uint8_t* zp, int8_t* w, int n, int k,
                             int group, cudaStream_t stream) {
  if (k < 1 || k % 32 || group < 1 || group % 32 || k % group) return 1;
  const int64_t threads = static_cast<int64_t>(n) * (k / 32);
  unpack_s8_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
      static_cast<const uint4*>(qweight), s2, zp, reinterpret_cast<uint4*>(w), n, k, group);
  return cudaGetLastError() == cudaSuccess ? 0 : 3;
}

// One int8 token (M = 1); (channels_per_warp, steps) picks the configuration.
extern "C" int dgq_gemv_f16(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                            const float* s_x, void* out, int n, int k, int group, int channels_per_warp, int steps,
                            cudaStream_t stream) {
  return gemv_dispatch<__half>(qweight, s2, zp, s1, x, s_x, out, n, k, group, channels_per_warp, steps, stream);
}

extern "C" int dgq_gemv_bf16(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                             const float* s_x, void* out, int n, int k, int group, int channels_per_warp, int steps,
                             cudaStream_t stream) {
  return gemv_dispatch<__nv_bfloat16>(qweight, s2, zp, s1, x, s_x, out, n, k, group, channels_per_warp, steps,
                                      stream);
}

extern "C" int dgq_mma_f16(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                           const float* s_x, void* out, int m, int n, int k, int group, int channel_tiles, int warps,
                           cudaStream_t stream) {
  return mma_dispatch<__half>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, channel_tiles, warps, stream);
}

extern "C" int dgq_mma_bf16(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x,
                            const float* s_x, void* out, int m, int n, int k, int group, int channel_tiles, int warps,
                            cudaStream_t stream) {
  return mma_dispatch<__nv_bfloat16>(qweight, s2, zp, s1, x, s_x, out, m, n, k, group, channel_tiles, warps, stream);
}

extern "C" int dgq_quantize_rows_f16(const void* x, int8_t* q, float* scale, const float* static_scale, int m, int k,
                                     cudaStream_t stream) {
  return quantize_rows<__half>(x, q, scale, static_scale, m, k, stream);
}

extern "C" int dgq_quantize_rows_bf16(const void* x, int8_t* q, float* scale, const float* static_scale, int m, int k,
                                      cudaStream_t stream) {
  return quantize_rows<__nv_bfloat16>(x, q, scale, static_scale, m, k, stream);
}

extern "C" int dgq_quantize_rows_f32(const void* x, int8_t* q, float* scale, const float* static_scale, int m, int k,
                                     cudaStream_t stream) {
  return quantize_rows<float>(x, q, scale, static_scale, m, k, stream);
}

// The same quantization, written in the fused wgmma kernel's permuted order, rows padded to a
// multiple of 128 features with zeros (q is m x k_pad).
extern "C" int dgq_quantize_rows_perm_f16(const void* x, int8_t* q, float* scale, const float* static_scale, int m,
                                          int k, cudaStream_t stream) {
  return quantize_rows<__half, true>(x, q, scale, static_scale, m, k, stream);
}

extern "C" int dgq_quantize_rows_perm_bf16(const void* x, int8_t* q, float* scale, const float* static_scale, int m,
                                           int k, cudaStream_t stream) {
  return quantize_rows<__nv_bfloat16, true>(x, q, scale, static_scale, m, k, stream);
}

extern "C" int dgq_quantize_rows_perm_f32(const void* x, int8_t* q, float* scale, const float* static_scale, int m,
                                          int k, cudaStream_t stream) {
  return quantize_rows<float, true>(x, q, scale, static_scale, m, k, stream);
}

// The same quantizations of RMSNorm(x) = w * (x * rsqrt(mean(x^2) + eps)) (RowNorm's roundings),
// so a norm's output is quantized for the linears that read it without going to memory; w is (k,)
// in x's dtype. inv_rms (optional, m floats) receives each row's rsqrt(mean(x^2) + eps). Rows
// longer than the register path (k > 65536) are not supported (1).
#define DGQ_RMSNORM_QUANTIZE(NAME, IN, PERM)                                                                   \
  extern "C" int NAME(const void* x, const void* w, float eps, int8_t* q, float* scale, const float* static_scale, \
                      float* inv_rms, int m, int k, cudaStream_t stream) {                                      \
    return quantize_rows<IN, PERM, Pre::kNorm>(x, q, scale, static_scale, m, k, stream,                         \
                                         {static_cast<const IN*>(w), eps, inv_rms});                            \
  }
DGQ_RMSNORM_QUANTIZE(dgq_rmsnorm_quantize_rows_f16, __half, false)
DGQ_RMSNORM_QUANTIZE(dgq_rmsnorm_quantize_rows_bf16, __nv_bfloat16, false)
DGQ_RMSNORM_QUANTIZE(dgq_rmsnorm_quantize_rows_perm_f16, __half, true)
DGQ_RMSNORM_QUANTIZE(dgq_rmsnorm_quantize_rows_perm_bf16, __nv_bfloat16, true)
#undef DGQ_RMSNORM_QUANTIZE

// The same quantizations of silu(gate) * up for x (m, 2k) = [gate | up] (the fused gate/up output):
// the codes (m, k) of down_proj's input, which never goes to memory. Rows longer than the register
// path (k > 65536) are not supported (1).
#define DGQ_SILU_MUL_QUANTIZE(NAME, IN, PERM)                                                                  \
  extern "C" int NAME(const void* x, int8_t* q, float* scale, const float* static_scale, int m, int k,       \
                      cudaStream_t stream) {                                                                  \
    return quantize_rows<IN, PERM, Pre::kSiluMul>(x, q, scale, static_scale, m, k, stream);                   \
  }
DGQ_SILU_MUL_QUANTIZE(dgq_silu_mul_quantize_rows_f16, __half, false)
DGQ_SILU_MUL_QUANTIZE(dgq_silu_mul_quantize_rows_bf16, __nv_bfloat16, false)
DGQ_SILU_MUL_QUANTIZE(dgq_silu_mul_quantize_rows_perm_f16, __half, true)
DGQ_SILU_MUL_QUANTIZE(dgq_silu_mul_quantize_rows_perm_bf16, __nv_bfloat16, true)
#undef DGQ_SILU_MUL_QUANTIZE

// Natural int8 activations (m, k) -> the permuted order (m, k_pad) (tests, benchmarks).
extern "C" int dgq_permute_s8(const int8_t* x, int8_t* y, int m, int k, cudaStream_t stream) {
  if (k % 32 || m < 1) return 1;
  const int k_pad = (k + 127) / 128 * 128;
  const int64_t threads = static_cast<int64_t>(m) * (k_pad / 8);
  permute_s8_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(x, y, m, k, k_pad);
  return cudaGetLastError() == cudaSuccess ? 0 : 3;
}

// x (m, k) -> int8 codes and scales of x Q, Q the online rotation in blocks of t = 64, 128 or 256
// features (signs: s = +-1, float32; scaled by t^-1/2 here); k a multiple of t, at most 64 blocks a row.
extern "C" int dgq_hadamard_quantize_rows_f16(const void* x, const float* signs, int8_t* q, float* scale,
                                              const float* static_scale, int m, int k, int t, cudaStream_t stream) {
  return hadamard_quantize_rows<__half>(x, signs, q, scale, static_scale, nullptr, m, k, t, stream);
}

extern "C" int dgq_hadamard_quantize_rows_bf16(const void* x, const float* signs, int8_t* q, float* scale,
                                               const float* static_scale, int m, int k, int t, cudaStream_t stream) {
  return hadamard_quantize_rows<__nv_bfloat16>(x, signs, q, scale, static_scale, nullptr, m, k, t, stream);
}

// x Q alone, in x's dtype: the online rotation in front of a linear that quantizes its own input.
extern "C" int dgq_hadamard_rows_f16(const void* x, const float* signs, void* out, int m, int k, int t,
                                     cudaStream_t stream) {
  return hadamard_quantize_rows<__half>(x, signs, nullptr, nullptr, nullptr, out, m, k, t, stream);
}

extern "C" int dgq_hadamard_rows_bf16(const void* x, const float* signs, void* out, int m, int k, int t,
                                      cudaStream_t stream) {
  return hadamard_quantize_rows<__nv_bfloat16>(x, signs, nullptr, nullptr, nullptr, out, m, k, t, stream);
}
