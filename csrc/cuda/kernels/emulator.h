// A small SIMT emulator for the kernels of csrc/cuda/kernels, so that their index math, bounds and
// barriers are exercised on machines without a GPU (CI). Compile the kernels with -DSAK_EMULATE and
// a C++20 host compiler (ideally with -fsanitize=address: global and shared buffers are plain heap
// memory here, so every out-of-bounds access is reported).
//
// Model: the blocks of a grid run one after another; the threads of a block are real std::threads
// meeting at std::barrier for __syncthreads (block_sync) and per-warp barriers for warp exchanges.
// Shared memory is filled with 0xFF bytes (NaN for every float type) before each block, so reading
// memory nobody wrote shows up in results. cp.async copies are queued per thread and land only at
// cp_async_wait, so a missing wait or barrier reads stale data instead of silently working. mma.sync
// follows the PTX fragment layout of mma.m16n8k16 and accumulates in double.
#pragma once

#include <array>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace sak_emu {

struct BlockCtx {
  int nthreads = 0;
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<std::array<unsigned char, 64>> slots;  // one exchange slot per thread
  unsigned char* smem = nullptr;
};

inline BlockCtx* g_ctx = nullptr;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};
inline thread_local std::vector<Copy> t_open;
inline thread_local std::vector<std::vector<Copy>> t_groups;

inline int linear_tid() { return static_cast<int>(threadIdx.x); }

inline void block_sync() { g_ctx->block_bar->arrive_and_wait(); }
inline void warp_sync() { g_ctx->warp_bars[linear_tid() / 32]->arrive_and_wait(); }
inline unsigned char* smem() { return g_ctx->smem; }

template <class T>
T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= 64, "slot size");
  const int t = linear_tid();
  std::memcpy(g_ctx->slots[t].data(), &v, sizeof(T));
  warp_sync();
  T r;
  std::memcpy(&r, g_ctx->slots[(t & ~31) | ((t & 31) ^ mask)].data(), sizeof(T));
  warp_sync();
  return r;
}

inline void cp_async(void* dst, const void* src, int bytes) {
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15u) {
    std::fprintf(stderr, "emulator: misaligned cp.async (%p <- %p)\n", dst, src);
    std::abort();
  }
  t_open.push_back(Copy{dst, src, bytes});
}
inline void cp_async_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}
inline void cp_async_wait(int n) {
  while (static_cast<int>(t_groups.size()) > n) {
    for (const Copy& c : t_groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    t_groups.erase(t_groups.begin());
  }
}

inline float bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16 v;
    std::memcpy(&v, &bits, 2);
    return __bfloat162float(v);
  }
  __half v;
  std::memcpy(&v, &bits, 2);
  return __half2float(v);
}

// mma.sync.m16n8k16.row.col.f32.{bf16,f16}: each lane posts its fragments, then computes its own
// four accumulators from everyone's fragments.
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  const int t = linear_tid();
  const int base = t & ~31, lane = t & 31;
  unsigned char* mine = g_ctx->slots[t].data();
  std::memcpy(mine, a, 16);
  std::memcpy(mine + 16, b, 8);
  warp_sync();
  auto elem = [&](int src_lane, int reg_offset, int reg, int half) {
    uint32_t w;
    std::memcpy(&w, g_ctx->slots[base + src_lane].data() + reg_offset + 4 * reg, 4);
    return bits_to_float(static_cast<uint16_t>(half ? (w >> 16) : (w & 0xffffu)), bf16);
  };
  auto A = [&](int row, int k) {  // A[row][k], 16 x 16
    const int src = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return elem(src, 0, reg, k & 1);
  };
  auto B = [&](int k, int n) {  // B[k][n], 16 x 8
    const int src = n * 4 + (k % 8) / 2;
    return elem(src, 16, k >= 8 ? 1 : 0, k & 1);
  };
  const int g = lane / 4, tg = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * tg + (i & 1);
    double s = c[i];
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A(row, k)) * static_cast<double>(B(k, col));
    out[i] = static_cast<float>(s);
  }
  warp_sync();
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

// Run kernel(args...) over grid x block with smem_bytes of dynamic shared memory.
template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || nthreads % 32 != 0 || nthreads <= 0 || nthreads > 1024) {
    std::fprintf(stderr, "emulator: unsupported block shape (%u, %u, %u)\n", block.x, block.y, block.z);
    std::abort();
  }
  if (smem_bytes > 227 * 1024) {
    std::fprintf(stderr, "emulator: %zu bytes of shared memory exceed the sm_90 limit\n", smem_bytes);
    std::abort();
  }
  std::unique_ptr<unsigned char[]> smem(new unsigned char[smem_bytes ? smem_bytes : 1]);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockCtx ctx;
        ctx.nthreads = nthreads;
        ctx.block_bar = std::make_unique<std::barrier<>>(nthreads);
        for (int w = 0; w < nthreads / 32; ++w) ctx.warp_bars.push_back(std::make_unique<std::barrier<>>(32));
        ctx.slots.resize(nthreads);
        ctx.smem = smem.get();
        std::memset(ctx.smem, 0xff, smem_bytes);
        g_ctx = &ctx;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t]() {
            threadIdx = make_uint3(static_cast<unsigned>(t), 0, 0);
            blockIdx = make_uint3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            t_open.clear();
            t_groups.clear();
            kernel(args...);
            cp_async_commit();
            cp_async_wait(0);
          });
        }
        for (auto& th : threads) th.join();
        g_ctx = nullptr;
      }
}

}  // namespace sak_emu
