// The CUDA device API on the CPU SIMT harness (sf_simt.h, which includes this file at its end):
// CUDA's built-in variables, barriers, warp functions, atomics and math intrinsics, in the global
// namespace as CUDA has them, each mapped onto the harness's fibers and warp exchanges.
#pragma once

// ---------------------------------------------------------------------------------------------
// Built-in variables and device functions, in the global namespace as CUDA has them.
// ---------------------------------------------------------------------------------------------
#define threadIdx (::sf::simt::fiber().tid)
#define blockIdx (::sf::simt::runner().block_idx)
#define blockDim (::sf::simt::runner().block_dim)
#define gridDim (::sf::simt::runner().grid_dim)
#define warpSize 32

inline void __syncthreads() { sf::simt::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { sf::simt::warp_exchange(mask, &mask, 0, true); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { sf::simt::fail("__trap()"); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  sf::simt::check_width(width);
  int lane = sf::simt::lane_id();
  return sf::simt::shuffle_from(mask, var, (lane & ~(width - 1)) + (src_lane & (width - 1)), false);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  sf::simt::check_width(width);
  int lane = sf::simt::lane_id();
  int src = lane ^ lane_mask;
  return sf::simt::shuffle_from(mask, var, src, (src & ~(width - 1)) != (lane & ~(width - 1)));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  sf::simt::check_width(width);
  int lane = sf::simt::lane_id();
  int src = lane + int(delta);
  return sf::simt::shuffle_from(mask, var, src, (src & ~(width - 1)) != (lane & ~(width - 1)));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  sf::simt::check_width(width);
  int lane = sf::simt::lane_id();
  int src = lane - int(delta);
  return sf::simt::shuffle_from(mask, var, src, src < (lane & ~(width - 1)));
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  int mine = predicate != 0;
  const unsigned char* buf = sf::simt::warp_exchange(mask, &mine, sizeof(int));
  const sf::simt::Warp& w = sf::simt::runner().warps[sf::simt::fiber().warp];
  unsigned out = 0;
  for (int l = 0; l < w.lanes; ++l) {
    int p;
    std::memcpy(&p, buf + l * sf::simt::kExchangeSlot, sizeof(int));
    if ((mask >> l & 1u) && p) out |= 1u << l;
  }
  return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == (mask & sf::simt::runner().warps[sf::simt::fiber().warp].exists);
}
inline unsigned __activemask() { return sf::simt::runner().warps[sf::simt::fiber().warp].exists; }

// Atomics (blocks run concurrently on several host threads).
template <typename T>
inline T sf_simt_atomic_rmw(T* address, T val, T (*op)(T, T)) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, op(old, val), std::memory_order_relaxed)) {
  }
  return old;
}
inline float atomicAdd(float* a, float v) { return sf_simt_atomic_rmw<float>(a, v, [](float x, float y) { return x + y; }); }
inline double atomicAdd(double* a, double v) {
  return sf_simt_atomic_rmw<double>(a, v, [](double x, double y) { return x + y; });
}
inline int atomicAdd(int* a, int v) { return std::atomic_ref<int>(*a).fetch_add(v, std::memory_order_relaxed); }
inline unsigned atomicAdd(unsigned* a, unsigned v) {
  return std::atomic_ref<unsigned>(*a).fetch_add(v, std::memory_order_relaxed);
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*a).fetch_add(v, std::memory_order_relaxed);
}
inline int atomicMax(int* a, int v) { return sf_simt_atomic_rmw<int>(a, v, [](int x, int y) { return x > y ? x : y; }); }
inline int atomicMin(int* a, int v) { return sf_simt_atomic_rmw<int>(a, v, [](int x, int y) { return x < y ? x : y; }); }
inline int atomicExch(int* a, int v) { return std::atomic_ref<int>(*a).exchange(v, std::memory_order_relaxed); }
inline float atomicExch(float* a, float v) { return std::atomic_ref<float>(*a).exchange(v, std::memory_order_relaxed); }
inline int atomicCAS(int* a, int compare, int v) {
  std::atomic_ref<int>(*a).compare_exchange_strong(compare, v, std::memory_order_relaxed);
  return compare;
}
inline unsigned atomicCAS(unsigned* a, unsigned compare, unsigned v) {
  std::atomic_ref<unsigned>(*a).compare_exchange_strong(compare, v, std::memory_order_relaxed);
  return compare;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long compare, unsigned long long v) {
  std::atomic_ref<unsigned long long>(*a).compare_exchange_strong(compare, v, std::memory_order_relaxed);
  return compare;
}

// Math intrinsics: the fast-math forms map to the accurate C library functions (the GPU versions
// are approximations within a few ulp; kernels must not depend on their exact error).
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// The kernel launch: SF_LAUNCH(kernel, grid, block, smem, stream, args...) expands to this.
template <typename... Params, typename... Args>
inline void sf_simt_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  std::function<void()> body = [&]() { kernel(args...); };
  sf::simt::launch(grid, block, smem, body);
}
