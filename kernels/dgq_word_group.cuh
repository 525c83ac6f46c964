// The group of a 32-code word, shared by the GEMV / tensor-core kernels and the wgmma kernel.
#pragma once

#include <cstdint>

// Group of a 32-code word: word / (group / 32) with one multiply-high instead of an integer
// division (~20 instructions in the hot loops). magic = ceil(2^32 / d) overshoots 2^32 / d by
// e < d, so the quotient is exact while word * e < 2^32 (any K below 2^42 / group); d = 1
// (group 32) would overflow the magic and takes the word itself.
struct WordGroup {
  uint32_t magic;
  bool one;
  __device__ __forceinline__ explicit WordGroup(int group)
      : magic(0xFFFFFFFFu / static_cast<uint32_t>(group / 32) + 1u), one(group == 32) {}
  __device__ __forceinline__ int operator()(int word) const {
    return one ? word : static_cast<int>(__umulhi(static_cast<uint32_t>(word), magic));
  }
};

