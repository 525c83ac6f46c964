// Kernel type and launcher shared by the emitted sm80 (Ampere) GEMM variants: a CUTLASS 2.x
// multistage s8 x s8 -> s32 tensor-op GEMM whose epilogue visitor tree (Sm80EVT) computes
//   D[m, n] = (float(acc[m, n]) * s_x[m]) * s1[n]      (rounded once to fp16 / bf16)
// in the torch reference's order, so outputs are bit-identical to `dgqtool.gemm.dual_scale_gemm`.
// generate.py instantiates it per tile configuration.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "dgq_gemm_launch.cuh"

namespace dgq::sm80 {

template <class ThreadblockShape, class WarpShape, int Stages, class ElementOut>
struct ScaledGemm {
  static constexpr int kAlignmentOut = 8;
  static constexpr int kEpilogueStages = 1;
  using Round = cutlass::FloatRoundStyle;
  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<
      ThreadblockShape, WarpShape, ElementOut, kAlignmentOut, kEpilogueStages>;
  using Acc = cutlass::epilogue::threadblock::VisitorAccFetch;
  using TokenScale = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float>;
  using ChannelScale = cutlass::epilogue::threadblock::VisitorRowBroadcast<
      ThreadMap, cutlass::half_t, cute::Stride<cute::_0, cute::_1, int32_t>>;
  using TimesToken = cutlass::epilogue::threadblock::VisitorCompute<
      cutlass::multiplies, float, float, Round::round_to_nearest>;
  using TimesChannel = cutlass::epilogue::threadblock::VisitorCompute<
      cutlass::multiplies, ElementOut, float, Round::round_to_nearest>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<
      ThreadMap, ElementOut, Round::round_to_nearest, cute::Stride<int64_t, cute::_1, int64_t>>;
  using Tree = cutlass::epilogue::threadblock::Sm80EVT<
      Store, cutlass::epilogue::threadblock::Sm80EVT<
                 TimesChannel, cutlass::epilogue::threadblock::Sm80EVT<TimesToken, Acc, TokenScale>, ChannelScale>>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      int8_t, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, 16,
      int8_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, 16,
      ElementOut, cutlass::layout::RowMajor, kAlignmentOut,
      int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      ThreadblockShape, WarpShape, cutlass::gemm::GemmShape<16, 8, 32>, Tree,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Stages,
      cutlass::arch::OpMultiplyAddSaturate, kEpilogueStages>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <class Config>
typename Config::Gemm::Arguments gemm_arguments(const int8_t* x, const int8_t* w, const float* s_x, const void* s1,
                                                void* out, int m, int n, int k) {
  using ElementOut = typename Config::Gemm::ElementC;
  // Visitor tree arguments, children first: ((acc, s_x[row]) *, s1[col]) *, then the store.
  typename Config::Tree::Arguments tree{
      {{{}, {s_x, 0.f, {}}, {}},
       {static_cast<cutlass::half_t const*>(s1), cutlass::half_t(0), {cute::_0{}, cute::_1{}, int32_t(n)}},
       {}},
      {static_cast<ElementOut*>(out), {int64_t(n), cute::_1{}, int64_t(m) * n}}};
  return typename Config::Gemm::Arguments(
      cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k}, 1, tree, x, w, nullptr, nullptr,
      int64_t(m) * k, int64_t(n) * k, 0, 0, k, k, 0, 0);
}

template <class Config>
size_t gemm_workspace(int m, int n, int k) {
  return Config::Gemm::get_workspace_size(gemm_arguments<Config>(nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k));
}

template <class Config>
int run_gemm(const int8_t* x, const int8_t* w, const float* s_x, const void* s1, void* out, int m, int n, int k,
             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return launch_gemm<typename Config::Gemm>(gemm_arguments<Config>(x, w, s_x, s1, out, m, n, k), workspace,
                                            workspace_bytes, stream);
}

}  // namespace dgq::sm80
