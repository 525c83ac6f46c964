// Fused Hopper W4A8 GEMM (sm_90a): register-sourced wgmma with the 4-bit codes converted in registers.
//
// out^T = W x^T: the weights are wgmma's A operand (64 channels per m64 tile, from registers), the
// int8 tokens are B (the token count is wgmma's N, BN = 32..256), int32 accumulators, and the
// epilogue (acc * s_x[token]) * s1[channel] -> fp16 / bf16 in the tokens x channels layout.
//
// Block: one producer warpgroup (one thread issues the TMA loads) and two consumer warpgroups, each
// owning MT m64 tiles, so a block computes BM = 128 * MT channels x BN tokens. A K step is 128
// features: the codes of the block's rows (BM x 64 bytes, plain row-major, TMA) and the tokens
// (BN x 128 bytes, TMA with the 128-byte swizzle wgmma's K-major descriptor reads) land in one
// pipeline stage, STAGES deep, full / empty mbarriers.
//
// The A fragment of m64nNk32 (8-bit) is mma.sync m16n8k32's: lane (g = lane / 4, t = lane % 4) of
// warp w holds rows 16w + g and 16w + g + 8, k slots 4t..4t+3 and 16+4t..16+4t+3. Each lane loads
// one 16-byte word of codes per row and K step (features 32t..32t+31 of the step, one ld.shared.v4,
// conflict-free) and converts word j of it with the exact IMAD + XOR into its sub-step j operand:
// the low nibbles (features 32t + 8j + 2i) fill slots 4t + i, the high ones slots 16 + 4t + i. No
// weight reordering: the activations are stored in the matching order instead -- the quantization
// kernel writes feature 32t + 8j + 2i + e of each 128-feature block at position 32j + 16e + 4t + i
// (dgq_quantize_rows_perm_*, dgq_permute_s8), K padded to a multiple of 128 with zeros.
//
// Conversion overlaps the tensor cores: a K step's four wgmmas are issued as one group and stay in
// flight while the next step is converted into a second register set (wgmma.wait_group 1 retires
// the step before), and the two consumer warpgroups interleave.
// Clusters of CL blocks along the channels share the token tile: each block loads 1/CL of it and
// multicasts it to the cluster (empty barriers count the consumers of every block of the cluster).
// Split-K (splits > 1): each split stores its int32 tile to a workspace slot; the last split of
// a tile (a per-tile counter, reset by it) adds the others in fixed order and runs the epilogue, so
// the sums are exact whatever the order the splits finish.
// Persistent grid (MT = 1): one block per SM takes (tile, split) units in turn; the epilogue has
// its own shared memory, so the producer fills the next unit's stages while the consumers store
// this one.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstdlib>
#include <utility>

#include "dgq_host_env.cuh"  // g_env, sm_count: the host lookups made once
#include "wgmma_ops.cuh"  // emitted by generate.py: WgmmaRS<N>::mma, the register-A wgmma per N

namespace dgq_wgmma {

constexpr int kStepK = 128;       // features per K step
constexpr int kCodeBytes = 64;    // packed code bytes per row and K step
constexpr int kThreads = 384;     // producer warpgroup + two consumer warpgroups

struct Params {
  const int8_t* s2;
  const uint8_t* zp;
  const __half* s1;
  const float* s_x;
  void* out;
  int* partials;  // split-K: tiles x splits x BM x BN int32
  int* counters;  // split-K: one per tile, zero between launches
  long long* trace;  // profiling only (dgq_wgmma_set_trace): per unit, SM id and %globaltimer at 5 points
  int m, n, k, group, steps, steps_per_split;
  int tiles_x, tiles_y, splits, units;  // units = tiles_x * tiles_y * splits
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Barriers and shared memory by 32-bit shared address (the producer's waits also by pointer): the
// consumers' main loop computes one address per stage instead of pointer arithmetic and a
// conversion per access.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) { mbar_wait(smem_addr(bar), parity); }

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(x), "r"(y)
      : "memory");
}

// Cluster helpers (CL > 1): the token tile is multicast to the CL blocks of a cluster, which
// share it along the channel dimension, so each block loads 1/CL of it from L2.
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(bar)), "r"(cta));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, "
      "%4}], [%2], %5;" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(x), "r"(y), "h"(mask)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(int& r) { asm volatile("" : "+r"(r)::"memory"); }

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void wait_for_producer() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// K-major operand in the 128-byte swizzle: rows of 128 bytes, 8-row atoms 1024 bytes apart.
// Split in its two words: the main loop moves the start address (low word, 16-byte units, below
// 2^14 for any shared address) by 32-bit adds, the high word is one constant.
__device__ __forceinline__ uint32_t smem_descriptor_lo(const void* p) { return ((smem_addr(p) & 0x3FFFF) >> 4) | (1u << 16); }
constexpr uint32_t kDescriptorHi = (1024 >> 4) | (1u << 30);
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t lo) { return (uint64_t{kDescriptorHi} << 32) | lo; }

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

#include "dgq_word_group.cuh"  // WordGroup

template <typename F, int... I>
__device__ __forceinline__ void for_each_index(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}

template <int MT, int BN, int STAGES>
struct Layout {
  static constexpr int BM = 128 * MT;
  static constexpr int kTokenBytes = BN * kStepK;      // one stage of tokens
  static constexpr int kCodeStage = BM * kCodeBytes;   // one stage of codes
  static constexpr int kStageBytes = kTokenBytes + kCodeStage;
  static constexpr int kPipeline = STAGES * kStageBytes;
  static constexpr int kChunk = BN < 64 ? BN : 64;      // tokens per epilogue pass through shared memory
  static constexpr int kStagingRow = BM * 2 + 16;       // epilogue tile row (bytes): padded, no bank conflicts
  // Own space, not the pipeline's: the producer loads the next tile's stages during the epilogue.
  static constexpr int kStaging = kChunk * kStagingRow + BN * 4;  // a chunk of the tile, then s_x of its tokens
  static constexpr int kBytes = 1024 + kPipeline + kStaging + 2 * STAGES * 8 + 16;  // alignment slack, barriers, flag
  static_assert(kTokenBytes % 1024 == 0, "token stages must keep the 1024-byte swizzle alignment");
  static_assert(kStageBytes % 1024 == 0, "stages must keep the 1024-byte swizzle alignment");
  static_assert(kStaging % 8 == 0, "the barriers after the staging need 8-byte alignment");
  static_assert(BN <= 256, "a consumer thread loads the s_x of one token");
  static_assert(BN % kChunk == 0, "the epilogue stores whole chunks");
};

// Persistent only with one m64 tile per warpgroup and no cluster: with MT = 2 the unit loop's
// registers made ptxas serialize the wgmmas, and cluster peers must stay on one token tile.
template <int MT, int CL>
constexpr bool kPersistent = MT == 1 && CL == 1;

// A work unit: one (channel block, token block, K split); x fastest, as blocks are dispatched.
struct Unit {
  int ch0, tok0, tile, split, first_step, steps;
};

template <int BM, int BN>
__device__ __forceinline__ Unit unit_at(const Params& p, int u) {
  const int x = u % p.tiles_x, y = (u / p.tiles_x) % p.tiles_y, z = u / (p.tiles_x * p.tiles_y);
  const int first = z * p.steps_per_split;
  return Unit{x * BM, y * BN, y * p.tiles_x + x, z, first, min(p.steps - first, p.steps_per_split)};
}

// Persistent: a block takes units blockIdx.x, blockIdx.x + gridDim.x, ... (gridDim.x = units
// for one unit per block). Its producer runs on into the next unit's stages while the consumers
// finish the current one, so only the first unit's pipeline fill is exposed.
template <int MT, int BN, int STAGES, int CL, typename Out>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_kernel(const __grid_constant__ CUtensorMap codes_map, const __grid_constant__ CUtensorMap tokens_map,
                 const Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)  // wgmma / setmaxnreg: sm_90a only, not the PTX pass
  using L = Layout<MT, BN, STAGES>;
  constexpr int BM = L::BM;
  constexpr int NACC = BN / 2;  // accumulators per thread per m64 tile
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* tokens_smem = smem;                             // [STAGES][BN][128], swizzled
  uint8_t* codes_smem = smem + STAGES * L::kTokenBytes;    // [STAGES][BM][64]
  uint8_t* staging_smem = smem + L::kPipeline;             // epilogue chunk [kChunk][BM] + s_x [BN]
  uint64_t* full = reinterpret_cast<uint64_t*>(staging_smem + L::kStaging);
  uint64_t* empty = full + STAGES;
  int* flag = reinterpret_cast<int*>(empty + STAGES);

  long long t_entry = 0;
  if (p.trace != nullptr) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_entry));
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8 * CL);  // every consumer warp of the cluster releases a stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if constexpr (CL > 1) cluster_sync();  // the peers' barriers exist before any multicast or remote arrive
  const uint32_t rank = CL > 1 ? cluster_rank() : 0;
  // this block's share of the token tile: rows [rank * BN / CL, (rank + 1) * BN / CL), multicast to the cluster
  constexpr int kShare = BN / CL;
  static_assert(kShare % 8 == 0, "a share must keep the 1024-byte swizzle atoms");
  auto load_tokens = [&](int s, int step, int tok0) {
    uint8_t* dst = tokens_smem + s * L::kTokenBytes + rank * kShare * kStepK;
    if constexpr (CL > 1)
      tma_load_2d_multicast(dst, &tokens_map, &full[s], step * kStepK, tok0 + rank * kShare, (1u << CL) - 1);
    else
      tma_load_2d(dst, &tokens_map, &full[s], step * kStepK, tok0);
  };

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(&codes_map) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(&tokens_map) : "memory");
      int g = 0;  // stages filled so far, over all units
      for (int u = blockIdx.x; u < p.units; u += gridDim.x) {
        const Unit w = unit_at<BM, BN>(p, u);
        int it = 0;
        if (g == 0) {
          // the codes do not depend on the activation quantization: load the first stages before waiting for it
          const int prologue = min(w.steps, STAGES);
          for (; it < prologue; ++it) {
            mbar_expect_tx(&full[it], L::kStageBytes);
            tma_load_2d(codes_smem + it * L::kCodeStage, &codes_map, &full[it], (w.first_step + it) * kCodeBytes, w.ch0);
          }
          wait_for_producer();
          for (int i = 0; i < prologue; ++i) load_tokens(i, w.first_step + i, w.tok0);
          g = prologue;
        }
        for (; it < w.steps; ++it, ++g) {
          const int s = g % STAGES;
          if (g >= STAGES) mbar_wait(&empty[s], ((g / STAGES) - 1) & 1);
          mbar_expect_tx(&full[s], L::kStageBytes);
          tma_load_2d(codes_smem + s * L::kCodeStage, &codes_map, &full[s], (w.first_step + it) * kCodeBytes, w.ch0);
          load_tokens(s, w.first_step + it, w.tok0);
        }
      }
    }
    __syncwarp();
    if constexpr (CL > 1) cluster_sync();  // no block leaves while a peer may still write into it
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int ctid = threadIdx.x - 128;              // 0..255
  const int cw = wg - 1;                           // consumer warpgroup 0 / 1
  const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int words = p.k / 32, groups = p.k / p.group;
  const WordGroup group_of(p.group);
  // this thread's rows within the block tile, per m64 tile and half
  int row[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) row[mt][h] = (cw * MT + mt) * 64 + 16 * warp + 8 * h + g;
  const uint32_t staging = smem_addr(staging_smem), sx_smem = staging + L::kChunk * L::kStagingRow;
  // Stage-0 addresses; a stage's are these plus a multiple of its size. The stage index and the
  // full barrier's parity advance with each step (no division by STAGES in the loop).
  const uint32_t full0 = smem_addr(full), empty0 = smem_addr(empty);
  const uint32_t desc_lo0 = smem_descriptor_lo(tokens_smem);
  uint32_t code_row[MT][2];  // this thread's 16-byte code word of each row
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) code_row[mt][h] = smem_addr(codes_smem) + row[mt][h] * kCodeBytes + 16 * t;
  uint32_t stage = 0, phase = 0;  // the next stage to consume and its parity, over all units
  int u = blockIdx.x;
  do {
    const Unit w = unit_at<BM, BN>(p, u);
    const long long t_unit = t_entry;  // the kernel's entry for the first unit, else 0
    t_entry = 0;
    long long t_start = 0, t_data = 0, t_main = 0;
    if (p.trace != nullptr) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_start));
    int chan[MT][2];  // global channels of the rows, clamped
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) chan[mt][h] = min(w.ch0 + row[mt][h], p.n - 1);
    // The epilogue's scales, loaded now so that their latency hides under the main loop (two
    // dependent global round trips in the epilogue otherwise): s_x, one token per thread, comes
    // from the activation quantization.
    wait_for_producer();
    const float sx_mine = ctid < BN ? p.s_x[min(w.tok0 + ctid, p.m - 1)] : 0.f;
    float s1v[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) s1v[mt][h] = __half2float(p.s1[chan[mt][h]]);

    int acc[MT][NACC];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NACC; ++i) acc[mt][i] = 0;

    uint32_t scale[MT][2], cst[MT][2];
    auto load_scales = [&](int step) {
      const int gi = group_of(min(step * 4 + t, words - 1));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int idx = chan[mt][h] * groups + gi;
          const int s2 = __ldg(p.s2 + idx);
          scale[mt][h] = static_cast<uint32_t>(s2);
          cst[mt][h] = static_cast<uint32_t>(128 - s2 * static_cast<int>(__ldg(p.zp + idx))) * 0x01010101u;
        }
    };
    load_scales(w.first_step);

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NACC; ++i) fence_operand(acc[mt][i]);

    // Two operand register sets: a step's wgmmas (four sub-steps, one commit group) stay in flight
    // while the next step's codes are converted into the other set; wait_group 1 after each commit
    // retires the step before, whose registers and stage are then free.
    uint32_t areg[2][MT][4][4];
    auto release = [&](uint32_t s) {
      if (lane != 0) return;
      if constexpr (CL > 1) {
#pragma unroll
        for (int c = 0; c < CL; ++c) mbar_arrive_cluster(&empty[s], c);
      } else {
        mbar_arrive(empty0 + 8 * s);
      }
    };
    uint32_t previous = 0;  // the stage of the step before, released once its wgmmas retire
    auto do_step = [&](const int it, uint32_t (&a)[MT][4][4]) {
      const uint32_t s = stage;
      mbar_wait(full0 + 8 * s, phase);
      uint4 q[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) q[mt][h] = lds128(code_row[mt][h] + s * L::kCodeStage);
      uint32_t sc[MT][2], cc[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) sc[mt][h] = scale[mt][h], cc[mt][h] = cst[mt][h];
      if (it + 1 < w.steps) load_scales(w.first_step + it + 1);  // in flight during this step's MMAs
      const uint32_t desc_lo = desc_lo0 + s * (L::kTokenBytes >> 4);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t w0 = j == 0 ? q[mt][0].x : j == 1 ? q[mt][0].y : j == 2 ? q[mt][0].z : q[mt][0].w;
          const uint32_t w1 = j == 0 ? q[mt][1].x : j == 1 ? q[mt][1].y : j == 2 ? q[mt][1].z : q[mt][1].w;
          a[mt][j][0] = ((w0 & 0x0F0F0F0Fu) * sc[mt][0] + cc[mt][0]) ^ 0x80808080u;
          a[mt][j][1] = ((w1 & 0x0F0F0F0Fu) * sc[mt][1] + cc[mt][1]) ^ 0x80808080u;
          a[mt][j][2] = (((w0 >> 4) & 0x0F0F0F0Fu) * sc[mt][0] + cc[mt][0]) ^ 0x80808080u;
          a[mt][j][3] = (((w1 >> 4) & 0x0F0F0F0Fu) * sc[mt][1] + cc[mt][1]) ^ 0x80808080u;
#pragma unroll
          for (int r = 0; r < 4; ++r) fence_operand(a[mt][j][r]);
        }
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          WgmmaRS<BN>::mma(acc[mt], a[mt][j][0], a[mt][j][1], a[mt][j][2], a[mt][j][3], smem_descriptor(desc_lo + 2 * j));
      wgmma_commit();
      wgmma_wait<1>();
      if (it > 0) release(previous);
      previous = s;
      if (++stage == STAGES) stage = 0, phase ^= 1;
    };
    if (p.trace != nullptr) {
      mbar_wait(full0 + 8 * stage, phase);
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_data));
    }
    int it = 0;
    for (; it + 1 < w.steps; it += 2) {
      do_step(it, areg[0]);
      do_step(it + 1, areg[1]);
    }
    if (it < w.steps) do_step(it, areg[0]);
    wgmma_wait<0>();
    release(previous);
    if (p.trace != nullptr) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_main));
    if constexpr (CL > 1) cluster_sync();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NACC; ++i) fence_operand(acc[mt][i]);

    // a unit's end in the trace: after its epilogue, or after its partial sums for a later unit
    auto record_trace = [&]() {
      if (p.trace == nullptr || ctid != 0) return;
      long long t_end, sm;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_end));
      asm volatile("{ .reg .u32 r; mov.u32 r, %%smid; cvt.u64.u32 %0, r; }" : "=l"(sm));
      long long* rec = p.trace + 6 * static_cast<int64_t>(u);
      rec[0] = sm, rec[1] = t_unit ? t_unit : t_start, rec[2] = t_start, rec[3] = t_data, rec[4] = t_main, rec[5] = t_end;
    };
    if (p.splits > 1) {
      constexpr int per_split = MT * NACC * 256;
      int* slots = p.partials + static_cast<int64_t>(w.tile) * p.splits * per_split;
      int* mine = slots + static_cast<int64_t>(w.split) * per_split;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < NACC; ++i) __stcg(mine + (mt * NACC + i) * 256 + ctid, acc[mt][i]);
      __threadfence();
      named_barrier(1, 256);
      if (ctid == 0) *flag = atomicAdd(p.counters + w.tile, 1) == p.splits - 1;
      named_barrier(1, 256);
      if (!*flag) {
        record_trace();
        continue;  // to the next unit (the loop condition)
      }
      __threadfence();
      for (int z = 0; z < p.splits; ++z) {
        if (z == w.split) continue;
        const int* other = slots + static_cast<int64_t>(z) * per_split;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < NACC; ++i) acc[mt][i] += __ldcg(other + (mt * NACC + i) * 256 + ctid);
      }
      if (ctid == 0) p.counters[w.tile] = 0;  // ready for the next launch
    }

    // epilogue: (acc * s_x[token]) * s1[channel], staged in shared memory as [token][channel],
    // kChunk tokens at a time
    named_barrier(1, 256);  // both consumer warpgroups are done with the previous unit's staging
    // Shared memory only through explicit ld/st.shared: generic stores into the tile would (as SASS
    // showed) be ordered against every global s_x load, one L2 round trip per token pair.
    if (ctid < BN) asm volatile("st.shared.f32 [%0], %1;" ::"r"(sx_smem + 4 * ctid), "f"(sx_mine) : "memory");
    named_barrier(1, 256);
    Out* out = static_cast<Out*>(p.out);
    constexpr int VECS = BM / 8;  // 16-byte vectors per token row
    const bool vector_ok = (p.n % 8) == 0;
    // a compile-time chunk index, so every accumulator index stays a constant (a runtime one puts
    // acc in local memory and serializes the wgmmas)
    for_each_index(std::make_integer_sequence<int, BN / L::kChunk>{}, [&](auto chunk) {
      constexpr int ck = decltype(chunk)::value;
      if (ck > 0) named_barrier(1, 256);  // the previous chunk is stored
#pragma unroll
      for (int nb = ck * L::kChunk / 8; nb < (ck + 1) * L::kChunk / 8; ++nb) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int tl = 8 * nb + 2 * t + c;
          float sx;
          asm volatile("ld.shared.f32 %0, [%1];" : "=f"(sx) : "r"(sx_smem + 4 * tl));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float v = __fmul_rn(__fmul_rn(static_cast<float>(acc[mt][4 * nb + 2 * h + c]), sx), s1v[mt][h]);
              const Out o = from_float<Out>(v);
              asm volatile("st.shared.b16 [%0], %1;" ::"r"(staging + (tl - ck * L::kChunk) * L::kStagingRow + row[mt][h] * 2),
                           "h"(*reinterpret_cast<const unsigned short*>(&o))
                           : "memory");
            }
        }
      }
      named_barrier(1, 256);
      for (int i = ctid; i < L::kChunk * VECS; i += 256) {
        const int tl = i / VECS, cv = i % VECS;
        const int token = w.tok0 + ck * L::kChunk + tl, channel = w.ch0 + cv * 8;
        if (token >= p.m || channel >= p.n) continue;
        uint4 v;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "r"(staging + tl * L::kStagingRow + cv * 16));
        Out* dst = out + static_cast<int64_t>(token) * p.n + channel;
        if (vector_ok) {
          *reinterpret_cast<uint4*>(dst) = v;
        } else {
          const Out* e = reinterpret_cast<const Out*>(&v);
#pragma unroll
          for (int c = 0; c < 8; ++c)
            if (channel + c < p.n) dst[c] = e[c];
        }
      }
    });
    record_trace();
  } while (kPersistent<MT, CL> && (u += gridDim.x) < p.units);
#endif
}

inline PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// 2-D byte tensor (rows x cols, row pitch `pitch` bytes), box (box_rows x box_cols).
inline bool make_map(CUtensorMap* map, const void* base, uint64_t rows, uint64_t cols, uint64_t pitch,
                     uint32_t box_rows, uint32_t box_cols, bool swizzle) {
  auto encode = encode_fn();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {pitch};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Profiling: the units of launches that follow record (SM, entry, consumer start, first stage landed,
// main loop done, end) as %globaltimer ns into `trace` (6 x units int64); nullptr turns it off.
inline long long* g_trace = nullptr;  // set by dgq_wgmma_set_trace (wgmma_common.cu)

using dgq_host::g_env;
using dgq_host::kMaxDevices;
using dgq_host::sm_count;

// 0 ok, 1 unsupported shape, 3 launch failure. x_p: (m, k_pad) int8 in the permuted order,
// k_pad = k rounded up to 128. partials / counters: only read when splits > 1.
template <int MT, int BN, int STAGES, int CL, typename Out>
int launch(const void* qweight, const int8_t* s2, const uint8_t* zp, const void* s1, const int8_t* x_p,
           const float* s_x, void* out, int* partials, int* counters, int m, int n, int k, int group, int splits,
           cudaStream_t stream) {
  using L = Layout<MT, BN, STAGES>;
  if (m < 1 || n < 1 || k < 1 || k % 32 || group < 1 || group % 32 || k % group || splits < 1) return 1;
  if ((reinterpret_cast<uintptr_t>(qweight) | reinterpret_cast<uintptr_t>(x_p)) % 16) return 1;
  const int steps = (k + kStepK - 1) / kStepK, k_pad = steps * kStepK;
  const int per = (steps + splits - 1) / splits;
  splits = (steps + per - 1) / per;  // no empty split
  if (splits > 1 && (partials == nullptr || counters == nullptr)) return 1;
  CUtensorMap codes_map, tokens_map;
  if (!make_map(&codes_map, qweight, n, k / 2, k / 2, L::BM, kCodeBytes, false)) return 1;
  if (!make_map(&tokens_map, x_p, m, k_pad, k_pad, BN / CL, kStepK, true)) return 1;
  // channel blocks rounded up to whole clusters: a block past N loads zero codes (TMA fill) and
  // its share of the tokens for its peers, and stores nothing
  const int tiles_x = ((n + L::BM - 1) / L::BM + CL - 1) / CL * CL, tiles_y = (m + BN - 1) / BN;
  const int units = tiles_x * tiles_y * splits;
  Params p{s2, zp, static_cast<const __half*>(s1), s_x, out, partials, counters, g_trace, m, n, k, group, steps, per,
           tiles_x, tiles_y, splits, units};
  auto kernel = wgmma_kernel<MT, BN, STAGES, CL, Out>;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices) return 3;
  // a function's shared-memory limit belongs to each device's context: raised once per device
  static bool configured[kMaxDevices] = {};
  if (!configured[device]) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes) != cudaSuccess) return 3;
    configured[device] = true;
  }
  // Persistent variants: one block per SM (a block holds an SM's registers) taking units in turn.
  // DGQ_PERSIST=0: one unit per block (A/B timing).
  const bool one_per_block = !kPersistent<MT, CL> || g_env.persist_off;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(one_per_block ? units : min(units, sm_count(device)));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = L::kBytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = CL;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  attribute[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[1].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  // Programmatic dependent launch only for small M: a waiting block holds a whole SM's registers,
  // which at large M starves the activation quantization it waits for (measured: qkv M = 2048
  // linear 17 us above kernel + quantization with it on).
  config.numAttrs = g_env.pdl_off || m > 256 ? 1 : 2;
  return cudaLaunchKernelEx(&config, kernel, codes_map, tokens_map, p) == cudaSuccess ? 0 : 3;
}

}  // namespace dgq_wgmma
