// The CPU emulator's stand-in for <cuda_runtime_api.h> (included by cuda/include/lamb_cuda.h): the same
// declarations as its <cuda_runtime.h>.
#pragma once

#include "cuda_runtime.h"
