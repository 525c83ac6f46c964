// Launcher shared by every emitted sm90 GEMM variant (generate.py writes the kernel types).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "dgq_gemm_launch.cuh"
#include "dgq_host_env.cuh"

namespace dgq {

template <class Gemm>
typename Gemm::Arguments gemm_arguments(const int8_t* x, const int8_t* w, const float* s_x, const void* s1,
                                        void* out, int m, int n, int k) {
  using Kernel = typename Gemm::GemmKernel;
  using ElementD = typename Kernel::ElementD;
  auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, 1));
  auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, 1));
  auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, cute::make_shape(m, n, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, n, 1));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {x, stride_a, w, stride_b},
      {{}, nullptr, stride_c, static_cast<ElementD*>(out), stride_d}};
  // Visitor tree arguments, children first: ((acc, s_x[row]) *, s1[col]) *
  args.epilogue.thread = {
      {{}, {s_x, 0.f, {}}, {}},
      {static_cast<cutlass::half_t const*>(s1), cutlass::half_t(0), {}},
      {}};
  int device = 0;  // the current device's SM count, not the first device's
  if (cudaGetDevice(&device) == cudaSuccess && device < dgq_host::kMaxDevices) {
    args.hw_info.device_id = device;
    args.hw_info.sm_count = dgq_host::sm_count(device);
  }
  return args;
}

template <class Gemm>
size_t gemm_workspace(int m, int n, int k) {
  auto args = gemm_arguments<Gemm>(nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k);
  return Gemm::get_workspace_size(args);
}

template <class Gemm>
int run_gemm(const int8_t* x, const int8_t* w, const float* s_x, const void* s1, void* out, int m, int n,
             int k, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return launch_gemm<Gemm>(gemm_arguments<Gemm>(x, w, s_x, s1, out, m, n, k), workspace, workspace_bytes, stream);
}

}  // namespace dgq
