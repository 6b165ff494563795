// A generic multi-tensor launcher: packs tensor addresses and per-block (tensor, chunk) indices into
// kernel arguments and calls a functor per chunk (after apex's csrc/multi_tensor_apply.cuh).  It knows
// nothing of the algorithm; one functor per algorithm and pass lives in lamb_kernels.cu / lars_kernels.cu.
// No torch headers: pointers and sizes in, 64-bit sizes and offsets throughout.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.cuh"

namespace lamb_cuda {

constexpr int kBlockSize = 512;
constexpr int kMaxTensors = 36;  // per launch; with 5 addresses a tensor the arguments stay under 4 KiB
constexpr int kMaxBlocks = 240;  // per launch

template <int N>
struct TensorListMetadata {
  void* addr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_base[kMaxTensors];  // the tensor's first chunk among all chunks of the call
  int id[kMaxTensors];              // the tensor's index in the call (per-tensor scratch)
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};

template <int N, typename F, typename... Args>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_kernel(int64_t chunk_size, TensorListMetadata<N> meta,
                                                                  F functor, Args... args) {
  functor(chunk_size, meta, args...);
}

// ptrs[k][i]: address k (0..N-1) of tensor i; numel[i], chunk_base[i], id[i] as in TensorListMetadata.
// Empty tensors are skipped.  Returns the first launch error (cudaSuccess when none).
template <int N, typename F, typename... Args>
cudaError_t multi_tensor_apply(int64_t chunk_size, int n, void* const* const* ptrs, const int64_t* numel,
                               const int64_t* chunk_base, const int* id, cudaStream_t stream, F functor,
                               Args... args) {
  TensorListMetadata<N> meta;
  int last = -1;
  for (int i = 0; i < n; ++i)
    if (numel[i] > 0) last = i;
  int loc_tensor = 0;
  int loc_block = 0;
  for (int i = 0; i < n; ++i) {
    if (numel[i] == 0) continue;
    for (int k = 0; k < N; ++k) meta.addr[k][loc_tensor] = ptrs[k][i];
    meta.numel[loc_tensor] = numel[i];
    meta.chunk_base[loc_tensor] = chunk_base[i];
    meta.id[loc_tensor] = id[i];
    ++loc_tensor;
    const int64_t chunks = (numel[i] + chunk_size - 1) / chunk_size;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[loc_block] = static_cast<unsigned char>(loc_tensor - 1);
      meta.block_to_chunk[loc_block] = static_cast<int>(c);
      ++loc_block;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = loc_tensor == kMaxTensors && last_chunk;
      const bool blocks_full = loc_block == kMaxBlocks;
      const bool done = i == last && last_chunk;
      if (tensors_full || blocks_full || done) {
        LAMB_LAUNCH(multi_tensor_kernel<N>, loc_block, kBlockSize, stream)(chunk_size, meta, functor, args...);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        loc_block = 0;
        if (last_chunk) {
          loc_tensor = 0;
        } else {  // the tensor continues in the next launch, in slot 0
          for (int k = 0; k < N; ++k) meta.addr[k][0] = meta.addr[k][loc_tensor - 1];
          meta.numel[0] = meta.numel[loc_tensor - 1];
          meta.chunk_base[0] = meta.chunk_base[loc_tensor - 1];
          meta.id[0] = meta.id[loc_tensor - 1];
          loc_tensor = 1;
        }
      }
    }
  }
  return cudaSuccess;
}

// Deterministic block sum (fixed tree for a fixed block size); the result is valid in thread 0.
template <int K>
__device__ inline void block_sum(double (&v)[K], double* shared /* K * kBlockSize */) {
  const int t = threadIdx.x;
  for (int k = 0; k < K; ++k) shared[k * kBlockSize + t] = v[k];
  __syncthreads();
  for (int s = kBlockSize / 2; s > 0; s >>= 1) {
    if (t < s)
      for (int k = 0; k < K; ++k) shared[k * kBlockSize + t] += shared[k * kBlockSize + t + s];
    __syncthreads();
  }
  for (int k = 0; k < K; ++k) v[k] = shared[k * kBlockSize];
}

}  // namespace lamb_cuda
