// Platform layer of the CUDA kernels: the few device primitives the kernels use (barriers, warp
// shuffles, dynamic shared memory, cp.async, mma.sync), written once for nvcc and once for the host
// SIMT emulator of csrc/cuda/kernels/emulator.h (compiled with -DSAK_EMULATE by a plain C++ compiler,
// so the kernels' index math and synchronisation are tested on machines without a GPU).
//
// No torch dependency here or in any kernels/*.cuh header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(SAK_EMULATE)
#include "emulator.h"
#define SAK_DEVICE inline
#define SAK_HOST_DEVICE inline
#define SAK_GLOBAL
#define SAK_LAUNCH_BOUNDS(n)
#else
#define SAK_DEVICE __device__ __forceinline__
#define SAK_HOST_DEVICE __host__ __device__ __forceinline__
#define SAK_GLOBAL __global__
#define SAK_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#endif

namespace sak {
namespace dev {

// ------------------------------------------------------------------------------------------------
// Threads, barriers, warp exchange
// ------------------------------------------------------------------------------------------------
SAK_DEVICE int tid() { return static_cast<int>(threadIdx.x); }
SAK_DEVICE int lane() { return static_cast<int>(threadIdx.x) & 31; }
SAK_DEVICE int warp() { return static_cast<int>(threadIdx.x) >> 5; }

#if defined(SAK_EMULATE)
SAK_DEVICE void block_sync() { sak_emu::block_sync(); }
SAK_DEVICE void warp_sync() { sak_emu::warp_sync(); }
template <class T>
SAK_DEVICE T shfl_xor(T v, int mask) { return sak_emu::shfl_xor(v, mask); }
SAK_DEVICE unsigned char* smem() { return sak_emu::smem(); }
#else
SAK_DEVICE void block_sync() { __syncthreads(); }
SAK_DEVICE void warp_sync() { __syncwarp(); }
template <class T>
SAK_DEVICE T shfl_xor(T v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
SAK_DEVICE unsigned char* smem() {
  extern __shared__ __align__(16) unsigned char sak_dynamic_smem[];
  return sak_dynamic_smem;
}
#endif

// ------------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies that complete at cp_async_wait<N>().
// Both addresses must be 16-byte aligned.
// ------------------------------------------------------------------------------------------------
#if defined(SAK_EMULATE)
SAK_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src) { sak_emu::cp_async(smem_dst, gmem_src, 16); }
SAK_DEVICE void cp_async_commit() { sak_emu::cp_async_commit(); }
template <int N>
SAK_DEVICE void cp_async_wait() { sak_emu::cp_async_wait(N); }
#else
SAK_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}
SAK_DEVICE void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
SAK_DEVICE void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// ------------------------------------------------------------------------------------------------
// Tensor cores: D = A(16x16, row) * B(16x8, col) + C, fp32 accumulators, A/B in f16 or bf16.
// Fragment layout (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4; two 16-bit elements per
// register, the lower column/k index in the low half):
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// ------------------------------------------------------------------------------------------------
template <class T>
struct MmaType;
template <>
struct MmaType<__half> { static constexpr bool is_bf16 = false; };
template <>
struct MmaType<__nv_bfloat16> { static constexpr bool is_bf16 = true; };

template <class T>
SAK_DEVICE void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(SAK_EMULATE)
  sak_emu::mma_16816(c, a, b, MmaType<T>::is_bf16);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (MmaType<T>::is_bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // never built: setup.py and the Makefile target sm_80 and sm_90 only
#endif
}

}  // namespace dev
}  // namespace sak
