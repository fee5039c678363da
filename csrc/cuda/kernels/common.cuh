// Shared pieces of the CUDA kernels: accumulator types, conversions, vector memory access,
// activations, and the host-side launch helpers (device properties, checked launches).
#pragma once

#include "platform.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <type_traits>

namespace sak {

// ------------------------------------------------------------------------------------------------
// Types: every product accumulates in fp32 (fp64 for double inputs).
// ------------------------------------------------------------------------------------------------
template <class T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };
template <class T>
using acc_t = typename AccOf<T>::type;

SAK_HOST_DEVICE float to_acc(float v) { return v; }
SAK_HOST_DEVICE double to_acc(double v) { return v; }
SAK_HOST_DEVICE float to_acc(__half v) { return __half2float(v); }
SAK_HOST_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
SAK_HOST_DEVICE T from_acc(acc_t<T> v);
template <>
SAK_HOST_DEVICE float from_acc<float>(float v) { return v; }
template <>
SAK_HOST_DEVICE double from_acc<double>(double v) { return v; }
template <>
SAK_HOST_DEVICE __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
SAK_HOST_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class T>
SAK_HOST_DEVICE T zero_of() { return from_acc<T>(acc_t<T>(0)); }

SAK_HOST_DEVICE int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
template <class X>
SAK_HOST_DEVICE X smin(X a, X b) { return a < b ? a : b; }
template <class X>
SAK_HOST_DEVICE X smax(X a, X b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------------
// Vector access: N elements of T at an address aligned to min(16, N * sizeof(T)) bytes, moved as
// 16/8/4/2-byte words (LDG.128 / LDS.128 for 16 bytes).
// ------------------------------------------------------------------------------------------------
template <int BYTES>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = unsigned; };
template <>
struct Word<2> { using type = unsigned short; };

template <class T, int N>
SAK_DEVICE void load_vec(T (&dst)[N], const T* src) {
  constexpr int BYTES = N * static_cast<int>(sizeof(T));
  constexpr int W = BYTES >= 16 ? 16 : BYTES;
  using WT = typename Word<W>::type;
  static_assert(BYTES % W == 0, "vector size");
#pragma unroll
  for (int i = 0; i < BYTES / W; ++i) {
    WT w = reinterpret_cast<const WT*>(src)[i];
    memcpy(reinterpret_cast<unsigned char*>(dst) + i * W, &w, W);
  }
}

template <class T, int N>
SAK_DEVICE void store_vec(T* dst, const T (&src)[N]) {
  constexpr int BYTES = N * static_cast<int>(sizeof(T));
  constexpr int W = BYTES >= 16 ? 16 : BYTES;
  using WT = typename Word<W>::type;
  static_assert(BYTES % W == 0, "vector size");
#pragma unroll
  for (int i = 0; i < BYTES / W; ++i) {
    WT w;
    memcpy(&w, reinterpret_cast<const unsigned char*>(src) + i * W, W);
    reinterpret_cast<WT*>(dst)[i] = w;
  }
}

// Elements of T per 16-byte vector.
template <class T>
constexpr int vec16() { return static_cast<int>(16 / sizeof(T)); }

SAK_HOST_DEVICE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------------
// Activations (same order as sparseadapter_kernels.reference.ACTIVATIONS), in the accumulator type.
// ------------------------------------------------------------------------------------------------
enum Act : int { kActRelu = 0, kActGelu = 1, kActSilu = 2, kActIdentity = 3 };

SAK_HOST_DEVICE float sak_erf(float v) { return erff(v); }
SAK_HOST_DEVICE double sak_erf(double v) { return erf(v); }
SAK_HOST_DEVICE float sak_exp(float v) { return expf(v); }
SAK_HOST_DEVICE double sak_exp(double v) { return exp(v); }

template <class A>
SAK_HOST_DEVICE A act_forward(A h, int act) {
  switch (act) {
    case kActRelu: return h <= A(0) ? A(0) : h;  // NaN stays NaN, as torch.relu keeps it
    case kActGelu: return A(0.5) * h * (A(1) + sak_erf(h * A(0.7071067811865476)));
    case kActSilu: return h / (A(1) + sak_exp(-h));
    default: return h;
  }
}

template <class A>
SAK_HOST_DEVICE A act_backward(A h, int act) {  // d act(h) / dh
  switch (act) {
    case kActRelu: return h > A(0) ? A(1) : A(0);
    case kActGelu: {
      const A cdf = A(0.5) * (A(1) + sak_erf(h * A(0.7071067811865476)));
      const A pdf = sak_exp(A(-0.5) * h * h) * A(0.3989422804014327);
      return cdf + h * pdf;
    }
    case kActSilu: {
      const A s = A(1) / (A(1) + sak_exp(-h));
      return s * (A(1) + h * (A(1) - s));
    }
    default: return A(1);
  }
}

namespace detail {
// An input element as staged for a product: act(v) rounded back to T (v itself for identity).
template <class T>
SAK_DEVICE T staged(T v, int act) {
  return act == kActIdentity ? v : from_acc<T>(act_forward(to_acc(v), act));
}
}  // namespace detail

// ------------------------------------------------------------------------------------------------
// Host side: device properties and checked launches.
// ------------------------------------------------------------------------------------------------
#if !defined(SAK_EMULATE)
using Stream = cudaStream_t;

// Called after every launch. The torch binding defines it as C10_CUDA_KERNEL_LAUNCH_CHECK() before
// including these headers; standalone code gets a check that throws.
#ifndef SAK_CHECK_LAUNCH
#define SAK_CHECK_LAUNCH() ::sak::throw_on_cuda_error(cudaGetLastError(), __FILE__, __LINE__)
#endif
#ifndef SAK_CHECK_CUDA
#define SAK_CHECK_CUDA(expr) ::sak::throw_on_cuda_error((expr), __FILE__, __LINE__)
#endif
#define SAK_MEMSET(ptr, value, bytes, stream) SAK_CHECK_CUDA(cudaMemsetAsync((ptr), (value), (bytes), (stream)))
#define SAK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  do {                                                           \
    kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__); \
    SAK_CHECK_LAUNCH();                                          \
  } while (0)

struct CudaError : public std::exception {
  char msg[256];
  const char* what() const noexcept override { return msg; }
};

inline void throw_on_cuda_error(cudaError_t err, const char* file, int line) {
  if (err != cudaSuccess) {
    CudaError e;
    snprintf(e.msg, sizeof(e.msg), "CUDA error %s at %s:%d", cudaGetErrorString(err), file, line);
    throw e;
  }
}

struct DeviceInfo {
  int sm_count = 0;
  int smem_optin = 0;  // largest dynamic shared memory per block after opting in
};

inline DeviceInfo device_info() {
  int dev = 0;
  SAK_CHECK_CUDA(cudaGetDevice(&dev));
  static DeviceInfo cache[64];
  static bool ready[64] = {};
  if (dev < 0 || dev >= 64) dev = 0;
  if (!ready[dev]) {  // benign race: every thread computes the same values
    DeviceInfo info;
    SAK_CHECK_CUDA(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, dev));
    SAK_CHECK_CUDA(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cache[dev] = info;
    ready[dev] = true;
  }
  return cache[dev];
}

// Allow `kernel` more than the default 48 KB of dynamic shared memory.
template <class K>
inline void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    SAK_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}
#else
using Stream = int;
#define SAK_CHECK_LAUNCH() ((void)0)
#define SAK_MEMSET(ptr, value, bytes, stream) std::memset((ptr), (value), (bytes))
#define SAK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::sak_emu::launch(kernel, dim3(grid), dim3(block), (smem_bytes), __VA_ARGS__)
struct DeviceInfo {
  int sm_count = 2;
  int smem_optin = 227 * 1024;
};
inline DeviceInfo device_info() { return DeviceInfo{}; }
template <class K>
inline void allow_smem(K, size_t) {}
#endif

}  // namespace sak
