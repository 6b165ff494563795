// Helpers shared by lamb_kernels.cu and lars_kernels.cu: vector loads/stores, alignment, dtype dispatch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "lamb_cuda.h"
#include "lamb_math.h"
#include "multi_tensor_apply.cuh"

namespace lamb_cuda {

using lamb_math::bf16_t;
using lamb_math::fp16_t;

constexpr int kVec = 4;  // elements per vector access (16 bytes of fp32, 8 of bf16/fp16)

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load_f(const T* base, int64_t i, float (&out)[V]) {
  const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(base + i);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = lamb_math::to_float(x.v[k]);
}

template <int V, typename T>
__device__ __forceinline__ void store_f(T* base, int64_t i, const float (&in)[V]) {
  Vec<T, V> x;
#pragma unroll
  for (int k = 0; k < V; ++k) x.v[k] = lamb_math::from_float<T>(in[k]);
  *reinterpret_cast<Vec<T, V>*>(base + i) = x;
}

__device__ __forceinline__ bool is_aligned(const void* p, int bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Runs __VA_ARGS__ with P (parameter), G (gradient), S (state) and MASTER set for a batch's dtype combination
// (lamb_math::Combo).
#define LAMB_CUDA_COMBO(c, P_, G_, S_, MASTER_, ...)                          \
  case c: {                                                                   \
    using P = P_;                                                             \
    using G = G_;                                                             \
    using S = S_;                                                             \
    constexpr bool MASTER = MASTER_;                                          \
    __VA_ARGS__;                                                              \
    break;                                                                    \
  }
#define LAMB_CUDA_DISPATCH(combo, ...)                                        \
  switch (combo) {                                                            \
    LAMB_CUDA_COMBO(kF32, float, float, float, false, __VA_ARGS__)            \
    LAMB_CUDA_COMBO(kBF16, bf16_t, bf16_t, bf16_t, false, __VA_ARGS__)        \
    LAMB_CUDA_COMBO(kF16, fp16_t, fp16_t, fp16_t, false, __VA_ARGS__)         \
    LAMB_CUDA_COMBO(kBF16Master, bf16_t, bf16_t, float, true, __VA_ARGS__)    \
    LAMB_CUDA_COMBO(kF16Master, fp16_t, fp16_t, float, true, __VA_ARGS__)     \
    LAMB_CUDA_COMBO(kBF16G32, bf16_t, float, bf16_t, false, __VA_ARGS__)      \
    LAMB_CUDA_COMBO(kF16G32, fp16_t, float, fp16_t, false, __VA_ARGS__)       \
    LAMB_CUDA_COMBO(kBF16MasterG32, bf16_t, float, float, true, __VA_ARGS__)  \
    LAMB_CUDA_COMBO(kF16MasterG32, fp16_t, float, float, true, __VA_ARGS__)   \
    default:                                                                  \
      return cudaErrorInvalidValue;                                           \
  }

}  // namespace lamb_cuda
