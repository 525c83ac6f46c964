// Launch of one emitted CUTLASS GEMM from its built arguments, shared by the sm80 and sm90 variants.
#pragma once
#include <cuda_runtime.h>
#include <cstddef>

#include "cutlass/cutlass.h"

namespace dgq {

// 0 on success; 1 shape not supported by this variant; 2 workspace too small; 3 launch failure.
template <class Gemm>
int launch_gemm(typename Gemm::Arguments const& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
  return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 3;
}

}  // namespace dgq
