// The CPU emulator's stand-in for <cuda_runtime.h>: just enough of CUDA for the kernels of cuda/ to compile
// with g++ and run on the host (tests/test_cuda_emulated.py).  It is first on the include path of that
// build only; nvcc builds never see it.
//
// Model: a launch runs its blocks one after another; the threads of a block are fibers (emu_runtime.cpp)
// that the scheduler runs one at a time, each until it reaches __syncthreads() or returns, in a chosen
// order (forward, reverse or shuffled per barrier phase, so that a missing barrier shows as a result that
// depends on the order).  Hence:
//   * threadIdx / blockIdx / blockDim / gridDim are plain globals that the scheduler sets before it resumes
//     a fiber (only one runs at any time);
//   * __shared__ is `static`: one block runs at a time, so a function's static array is exactly the block's
//     shared memory (it keeps its values from the previous block, where the GPU's is undefined);
//   * __syncthreads() hands control back to the scheduler, which releases the barrier once every thread of
//     the block has arrived; a thread that returns while others wait at a barrier is reported as a fault
//     (undefined behaviour on the GPU);
//   * __CUDA_ARCH__ stays undefined, so lamb_math.h takes its host paths (bit-exact with the device ones).
#pragma once

#ifndef LAMB_CUDA_EMULATE
#error "tests/cuda_emu/cuda_runtime.h is the CPU emulator's stand-in: build with -DLAMB_CUDA_EMULATE"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------------------ runtime types
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// The last launch error, reset by the call (as the CUDA runtime's for non-sticky errors).
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

// ------------------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ------------------------------------------------------------------------------------------ built-ins
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

void __syncthreads();
int __syncthreads_or(int predicate);

// CUDA's device min/max overloads for integer and floating types (math.h has isfinite, sqrt, nan, powf ...).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// ------------------------------------------------------------------------------------------ launches
namespace lamb_emu {

// Runs `body` (one thread's kernel call) for every thread of every block; records the launch; a launch
// that CUDA would refuse (empty grid, more than 1024 threads, kernel arguments over 4 KiB) runs nothing and
// sets the error cudaGetLastError() returns.
void run_grid(const char* name, dim3 grid, dim3 block, size_t arg_bytes, void (*body)(void*), void* ctx);

// Bytes of the kernel's argument list laid out as a struct (natural alignment, as the CUDA ABI lays out
// __global__ parameters); CUDA caps it at 4 KiB (before 12.1, and for pre-Volta devices).
template <typename... A>
constexpr size_t arg_bytes() {
  size_t off = 0;
  ((off = (off + alignof(A) - 1) / alignof(A) * alignof(A) + sizeof(A)), ...);
  return off;
}

// What LAMB_LAUNCH(kernel, grid, block, stream) (cuda/include/launch.cuh) makes of a launch: call it with
// the kernel's arguments.  The arguments are copied once at the launch (as CUDA copies them into the
// launch's parameter buffer); each thread then calls the kernel, which copies them into its own by-value
// parameters.  Every launch completes before the call returns: one stream, so this is the stream's order.
template <typename F>
struct Launch {
  const char* name;
  dim3 grid, block;
  cudaStream_t stream;
  F kernel;

  Launch(const char* n, dim3 g, dim3 b, cudaStream_t s, F f) : name(n), grid(g), block(b), stream(s), kernel(f) {}

  template <typename... A>
  void operator()(const A&... a) {
    std::tuple<std::decay_t<A>...> params(a...);
    auto body = [&] { std::apply(kernel, params); };
    using Body = decltype(body);
    run_grid(name, grid, block, arg_bytes<std::decay_t<A>...>(), [](void* c) { (*static_cast<Body*>(c))(); },
             &body);
  }
};

}  // namespace lamb_emu
