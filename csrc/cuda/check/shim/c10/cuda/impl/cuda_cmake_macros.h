// Stand-in for the header that CUDA builds of torch generate (CPU wheels do not ship it), so that
// `make check-cuda` can compile csrc/cuda/ops_cuda.cu against a CPU-only torch's headers. Used only
// by that compile-only check, placed last on the include path: a real CUDA torch's copy wins.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
