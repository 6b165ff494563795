// One spelling for every kernel launch of cuda/, so that the same sources also run on the CPU.
//
//   LAMB_LAUNCH(kernel, grid, block, stream)(args...);
//
// Under nvcc it is `kernel<<<grid, block, 0, stream>>>(args...)`.  The `<<< >>>` syntax is not C++, so the
// test build (tests/cuda_emu, compiled by g++ with -DLAMB_CUDA_EMULATE and its own cuda_runtime.h first on
// the include path) turns it into a call of lamb_emu::Launch, which runs every block and every thread of
// the grid on the host: tests/test_cuda_emulated.py checks these kernels against the float64 references
// on machines without a GPU.  No dynamic shared memory is used anywhere, hence the fixed 0.
#pragma once

#include <cuda_runtime.h>

#if defined(LAMB_CUDA_EMULATE)
#define LAMB_LAUNCH(kernel, grid, block, stream) \
  ::lamb_emu::Launch(#kernel, (grid), (block), (stream), [](auto&... lamb_emu_args) { kernel(lamb_emu_args...); })
#else
#define LAMB_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif
