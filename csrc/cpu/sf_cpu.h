// What every native CPU kernel (csrc/cpu/*.cpp) shares: the vector type and a vector exp
// (sf_cpu_vec.h), the register-blocked product every attention op is made of, denormal flushing,
// parallel loops, dtype dispatch and the torch bindings (namespace semask_fast_cpu).
//
// Vectors are GCC vector extensions sized to the widest registers the build targets (AVX-512:
// 16 floats, AVX/AVX2: 8, otherwise 4): one source for every instruction set, the compiler picks
// the instructions (FMA where present, since -ffp-contract=fast).  The build is -march=native
// (semask_fast/_build.py), or the compiler's baseline for SEMASK_FAST_CPU_ISA=portable.
//
// Every kernel computes in fp32 (fp64 for double inputs, so gradcheck runs on the kernels);
// fp16 / bf16 rows are converted to fp32 when staged and rounded once when written (or, where the
// CPU has a matrix unit, multiplied there: sf_cpu_matrix.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/sf_window_geometry.h"
#include "sf_cpu_vec.h"

// Hidden: every kernel library (csrc/cpu/*.cpp, one .so each) runs its own compiled copy of these
// inline functions.  With default visibility the dynamic linker bound every library's calls to the
// first loaded library's copy of each template instance (block_product<...> included), so an op's
// speed depended on which op was loaded first and on that library's inlining decisions.
#pragma GCC visibility push(hidden)
namespace sf::cpu {

// ----------------------------------------------------------- large buffers --
// Kernels' large outputs (and large scratch tensors, e.g. per-range partial sums) come from a pool
// of storages they released before.  torch's CPU allocator hands a large block back to the system
// when it is freed, so every call's output was freshly mapped memory whose first touch, by the
// kernel, cost a page fault, a memcg charge and the kernel's zeroing per page: 14 ms for a 54 MB
// output on one thread here (6 ms with huge pages), a quarter of a 512^2 Swin stage's window
// attention.  A pooled storage is reused once nothing but the pool refers to it (no tensor or view
// of it is alive), for a request of the same byte size.  The pool keeps every storage it took
// while they fit under its cap, SEMASK_FAST_CPU_POOL_MIB (default 512, per op library; 0 turns
// the pool off; read at each request, so that a process can switch it, e.g. to measure
// allocations); past the cap a request gets torch's memory, unpooled.  It never evicts: evicting
// to make room made a step whose buffers exceed the cap allocate and release every one of them
// each call, slower than no pool (SeMask windowed fwd+bwd, 278 MB of buffers: 163 ms with a
// 256 MiB evicting pool, 94 without a pool, 74 with all of them pooled).  Requests under
// kMinPooledBytes use torch's allocator (malloc recycles small blocks already).  Contents are
// uninitialised either way, as at::empty's.
class BufferPool {
 public:
  static constexpr size_t kMinPooledBytes = size_t(4) << 20;

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    const size_t cap = cap_from_environment();
    if (bytes < kMinPooledBytes || cap == 0) return fresh(sizes, options);
    std::lock_guard<std::mutex> lock(mutex_);
    for (const c10::Storage& s : storages_)
      if (s.nbytes() == bytes && s.use_count() == 1) return at::empty({0}, options).set_(s, 0, sizes);
    at::Tensor t = fresh(sizes, options);
    if (held_ + bytes <= cap) {
      storages_.push_back(t.storage());
      held_ += bytes;
    }
    return t;
  }

 private:
  static size_t cap_from_environment() {
    const char* v = std::getenv("SEMASK_FAST_CPU_POOL_MIB");
    return size_t(v && *v ? std::strtoull(v, nullptr, 10) : 512) << 20;
  }

  // at::empty, with the 2 MiB-aligned part of a large block advised into transparent huge pages
  // (a hint: fewer faults on first touch).
  static at::Tensor fresh(at::IntArrayRef sizes, const at::TensorOptions& options) {
    at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + t.nbytes()) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
    return t;
  }

  std::mutex mutex_;
  std::vector<c10::Storage> storages_;
  size_t held_ = 0;
};

// at::empty's contract, memory from this library's BufferPool.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static BufferPool pool;
  return pool.empty(sizes, options);
}

// ------------------------------------------------------------- prefetching --
// Software prefetch of the next task's inputs into L2 while the current task computes.  A task's
// operands come from DRAM once (a windowed stage's inputs are far larger than the caches) and the
// hardware prefetchers do not run ahead across a task's strided rows.  The products issue one
// prefetch per k step (NextTaskPrefetch::step): spread over the task, the fetches overlap its
// arithmetic, where a burst of them would stall on the fill buffers.  Into L2, not L1: one task's
// operands exceed L1.
class NextTaskPrefetch {
 public:
  static constexpr int kLine = 64;
  // rows of row_bytes each, row r at p + r * stride (bytes).  At most kMaxRanges ranges.
  void add(const void* p, int64_t rows, int64_t stride, int64_t row_bytes) {
    if (count_ == kMaxRanges || rows <= 0 || row_bytes <= 0) return;
    ranges_[count_++] = {static_cast<const char*>(p), stride, rows, row_bytes, nullptr};
  }
  // rows of row_bytes each at the given addresses (the array must outlive the prefetches).
  template <typename P>
  void add_rows(P* const* rows, int64_t count, int64_t row_bytes) {
    if (count_ == kMaxRanges || count <= 0 || row_bytes <= 0) return;
    static_assert(sizeof(P*) == sizeof(const char*));
    ranges_[count_++] = {nullptr, 0, count, row_bytes, reinterpret_cast<const void* const*>(rows)};
  }
  // Prefetches the next line, if any is left (the cursor walks rows, then their lines).  Always
  // inlined: called out of line from a product's k loop, it made the loop spill and reload all
  // its accumulators around every call (the semantic global forward: 51 -> 72 ms).
  __attribute__((always_inline)) void step() {
    if (range_ == count_) return;
    const Range& g = ranges_[range_];
    if (!line_) {
      const char* row = g.listed ? static_cast<const char*>(g.listed[row_]) : g.p + row_ * g.stride;
      line_ = row - reinterpret_cast<uintptr_t>(row) % kLine;
      row_end_ = row + g.row_bytes;
    }
#ifdef SF_CPU_X86
    _mm_prefetch(line_, _MM_HINT_T1);
#else
    __builtin_prefetch(line_, 0, 2);
#endif
    line_ += kLine;
    if (line_ >= row_end_) {
      line_ = nullptr;
      if (++row_ == g.rows) row_ = 0, ++range_;
    }
  }

 private:
  struct Range {
    const char* p;
    int64_t stride, rows, row_bytes;
    const void* const* listed;  // row addresses, or null: strided rows from p
  };
  static constexpr int kMaxRanges = 6;
  Range ranges_[kMaxRanges];
  int count_ = 0, range_ = 0;
  int64_t row_ = 0;
  const char *line_ = nullptr, *row_end_ = nullptr;
};

// ------------------------------------------------------------ the product --
// C[r][v] (R rows x V vectors of kLanes<T> columns) = init[r][v] + sum_{k < K} A(r, k) * B[k][v]:
// A read as scalars A[r * a_rs + k * a_ks] and broadcast, B rows of vectors (row stride ldb),
// C and init row stride ldc; init may be C itself (accumulate) or nullptr (zero).  Every attention
// product of the CPU kernels is one of these with the right strides (S^T = K Q^T + bias,
// O = P V, dV = P^T dO, ...); the register block stays in registers for the whole k loop.
// kUnitRows: a_rs == 1 (A's rows adjacent, e.g. P^T read as P), so the R scalars of a k step sit at
// fixed offsets from one pointer instead of R computed addresses.  row_scale (or nullptr): C's row r
// is stored times row_scale[r], so a product can write its final rows (e.g. O = P V / l) in place.
// kStats: the block's column statistics are taken while it is in registers (ColumnStats); a
// separate instance, so that the other products carry neither the argument nor the test.
template <typename T>
struct ColumnStats {
  T* col_max;  // per column: the max of the values here and of C's column (NaN wins)
  T* sum;      // row stride ldc, as C: C added here (first: stored)
  bool first;
};

template <typename T, int R, int V, bool kUnitRows, bool kStats>
inline void block_product_body(int K, const T* __restrict__ A, int64_t a_rs, int64_t a_ks, const T* __restrict__ B,
                               int64_t ldb, T* C, int64_t ldc, const T* init, NextTaskPrefetch* next,
                               const T* row_scale, const ColumnStats<T>* stats) {
  constexpr int L = kLanes<T>;
  if constexpr (kUnitRows) a_rs = 1;
  // Every loop over the block is unrolled so that acc lives in registers (GCC otherwise keeps the
  // array on the stack around the k loop: a store and a load per accumulator and block).
  Vec<T> acc[R][V];
  if (init) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = vload(init + r * ldc + v * L);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = Vec<T>{};
  }
  for (int k = 0; k < K; ++k) {
    if (next) next->step();
    Vec<T> b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = vload(B + k * ldb + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec<T> a = vsplat(A[r * a_rs + k * a_ks]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  if (row_scale) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec<T> s = vsplat(row_scale[r]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] *= s;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) vstore(C + r * ldc + v * L, acc[r][v]);
  if constexpr (kStats) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      Vec<T> mx = vload(stats->col_max + v * L);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        mx = vmax<T>(mx, acc[r][v]);
        T* e = stats->sum + r * ldc + v * L;
        vstore(e, stats->first ? acc[r][v] : vload(e) + acc[r][v]);
      }
      vstore(stats->col_max + v * L, mx);
    }
  }
}

template <typename T, int R, int V, bool kUnitRows>
inline void block_product(int K, const T* __restrict__ A, int64_t a_rs, int64_t a_ks, const T* __restrict__ B,
                          int64_t ldb, T* C, int64_t ldc, const T* init, NextTaskPrefetch* next,
                          const T* row_scale) {
  block_product_body<T, R, V, kUnitRows, false>(K, A, a_rs, a_ks, B, ldb, C, ldc, init, next, row_scale, nullptr);
}

template <typename T, int R, int V, bool kUnitRows>
inline void block_product_stats(int K, const T* __restrict__ A, int64_t a_rs, int64_t a_ks, const T* __restrict__ B,
                                int64_t ldb, T* C, int64_t ldc, const T* init, NextTaskPrefetch* next,
                                const T* row_scale, const ColumnStats<T>* stats) {
  block_product_body<T, R, V, kUnitRows, true>(K, A, a_rs, a_ks, B, ldb, C, ldc, init, next, row_scale, stats);
}

template <typename T>
using BlockProductFn = void (*)(int, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, const T*,
                                NextTaskPrefetch*, const T*);
template <typename T>
using BlockProductStatsFn = void (*)(int, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, const T*,
                                     NextTaskPrefetch*, const T*, const ColumnStats<T>*);

constexpr int kMaxBlockVecs = 4;
constexpr int kMaxBlockRows = 12;

// The register blocks of R = 1..kMaxBlockRows rows for V vectors (with the statistics: kStats).
template <typename T, int V, bool kUnitRows, bool kStats, int... Rs>
constexpr auto row_table(std::integer_sequence<int, Rs...>) {
  if constexpr (kStats)
    return std::array<BlockProductStatsFn<T>, sizeof...(Rs)>{&block_product_stats<T, Rs + 1, V, kUnitRows>...};
  else
    return std::array<BlockProductFn<T>, sizeof...(Rs)>{&block_product<T, Rs + 1, V, kUnitRows>...};
}

// Every (V, kUnitRows) table: [kUnitRows * kMaxBlockVecs + V - 1][R - 1].
template <typename T, bool kStats>
constexpr auto block_tables() {
  constexpr auto counts = std::make_integer_sequence<int, kMaxBlockRows>{};
  return std::array<decltype(row_table<T, 1, false, kStats>(counts)), 2 * kMaxBlockVecs>{
      row_table<T, 1, false, kStats>(counts), row_table<T, 2, false, kStats>(counts),
      row_table<T, 3, false, kStats>(counts), row_table<T, 4, false, kStats>(counts),
      row_table<T, 1, true, kStats>(counts),  row_table<T, 2, true, kStats>(counts),
      row_table<T, 3, true, kStats>(counts),  row_table<T, 4, true, kStats>(counts)};
}

// Rows per register block for V vectors: as many as the accumulator registers allow.
constexpr int block_rows(int v) { return std::min(kMaxBlockRows, SF_CPU_ACC_REGS / v); }

// C (rows x cols, cols a multiple of kLanes<T>) = [C or init +] sum_k A(r, k) B[k][:], tiled into
// register blocks.  The caller pads cols (zero columns in B) to whole vectors.  accumulate: add to
// C; init (row stride ldc, exclusive with accumulate): add to these values instead; row_scale
// (rows values): C's rows scaled as stored; stats (product_with_stats): C's column maxima
// (col_max, cols values) and C added to stats.sum (row stride ldc), without another pass over C.
template <typename T, bool kStats>
inline void tiled_product(int rows, int cols, int K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                          T* C, int64_t ldc, bool accumulate, const T* init, NextTaskPrefetch* next,
                          const T* row_scale, const ColumnStats<T>* stats) {
  constexpr int L = kLanes<T>;
  static constexpr auto tables = block_tables<T, kStats>();
  const int vecs = cols / L;
  for (int v0 = 0; v0 < vecs; v0 += kMaxBlockVecs) {
    const int nv = std::min(kMaxBlockVecs, vecs - v0);
    const auto& table = tables[(a_rs == 1 ? kMaxBlockVecs : 0) + nv - 1];
    // Rows split evenly over the fewest blocks, sizes differing by one at most (49 rows in blocks
    // of 8: seven of 7, not six of 8 and one of 1, whose single accumulator chain runs at the FMA
    // latency, not its throughput; 32 in blocks of 6: 6 6 5 5 5 5, not 6 6 6 6 6 2).
    const int blocks = (rows + block_rows(nv) - 1) / block_rows(nv);
    const int small = blocks ? rows / blocks : 0, larger = blocks ? rows % blocks : 0;
    for (int b = 0, r0 = 0; b < blocks; r0 += small + (b < larger), ++b) {
      const int nr = small + (b < larger);
      const int64_t c_off = int64_t(r0) * ldc + v0 * L;
      const T* start = accumulate ? C + c_off : init ? init + c_off : nullptr;
      const T* scale = row_scale ? row_scale + r0 : nullptr;
      if constexpr (kStats) {
        const ColumnStats<T> block{stats->col_max + v0 * L, stats->sum + c_off, stats->first};
        table[nr - 1](K, A + r0 * a_rs, a_rs, a_ks, B + v0 * L, ldb, C + c_off, ldc, start, next, scale, &block);
      } else {
        table[nr - 1](K, A + r0 * a_rs, a_rs, a_ks, B + v0 * L, ldb, C + c_off, ldc, start, next, scale);
      }
    }
  }
}

template <typename T>
inline void product(int rows, int cols, int K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate = false, const T* init = nullptr, NextTaskPrefetch* next = nullptr,
                    const T* row_scale = nullptr) {
  tiled_product<T, false>(rows, cols, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate, init, next, row_scale, nullptr);
}

template <typename T>
inline void product_with_stats(int rows, int cols, int K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
                               int64_t ldb, T* C, int64_t ldc, const ColumnStats<T>& stats) {
  tiled_product<T, true>(rows, cols, K, A, a_rs, a_ks, B, ldb, C, ldc, false, nullptr, nullptr, nullptr, &stats);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// n items in blocks of at most `target`, balanced: `count` blocks of `size` (the last one shorter).
struct Blocks {
  int count, size;
};
inline Blocks balanced(int n, int target) {
  const int count = (n + target - 1) / target;
  const int size = (n + count - 1) / count;
  return {(n + size - 1) / size, size};
}

// ---------------------------------------------------------------- transpose --
// [a0 b0 a1 b1 ...] of the low halves (hi: of the high halves).
template <typename T, size_t... I>
inline Vec<T> interleave_lo(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  constexpr int N = sizeof...(I);
  return __builtin_shufflevector(a, b, ((I % 2) ? int(I / 2 + N) : int(I / 2))...);
}
template <typename T, size_t... I>
inline Vec<T> interleave_hi(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  constexpr int N = sizeof...(I);
  return __builtin_shufflevector(a, b, ((I % 2) ? int(I / 2 + N + N / 2) : int(I / 2 + N / 2))...);
}

// Transposes an L x L block (L = kLanes<T>) in registers: row r of dst = column r of src, times
// scale.  src rows at src + r * lds (rows >= src_rows read as zeros), dst rows at dst + c * ldd for
// c < dst_rows.  log2(L) rounds of interleaving row k with row k + L/2 (each round rotates the
// (row, column) index bits by one).
// kFull: src_rows == dst_rows == L, every loop unrolled with no bounds tests.
template <typename T, bool kFull>
inline void transpose_block(const T* src, int64_t lds, int src_rows, T* dst, int64_t ldd, int dst_rows, T scale) {
  constexpr int L = kLanes<T>;
  constexpr auto seq = std::make_index_sequence<L>{};
  if constexpr (kFull) src_rows = dst_rows = L;
  const Vec<T> s = vsplat(scale);
  Vec<T> r[L], t[L];
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) r[i] = i < src_rows ? vload(src + i * lds) * s : Vec<T>{};
#pragma GCC unroll 4
  for (int round = 1; round < L; round *= 2) {
#pragma GCC unroll 8
    for (int k = 0; k < L / 2; ++k) {
      t[2 * k] = interleave_lo<T>(r[k], r[k + L / 2], seq);
      t[2 * k + 1] = interleave_hi<T>(r[k], r[k + L / 2], seq);
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) r[i] = t[i];
  }
#pragma GCC unroll 16
  for (int c = 0; c < dst_rows; ++c) vstore(dst + c * ldd, r[c]);
}

// dst (cols x ld_dst) = scale * src^T for src (rows x cols, row stride lds, cols a multiple of L):
// dst columns past rows, up to round_up(rows, L), are zero.
template <typename T>
inline void transpose(const T* src, int64_t lds, int rows, int cols, T* dst, int64_t ld_dst, T scale = T(1)) {
  constexpr int L = kLanes<T>;
  for (int r0 = 0; r0 < rows; r0 += L)
    for (int c0 = 0; c0 < cols; c0 += L) {
      const int src_rows = std::min(L, rows - r0), dst_rows = std::min(L, cols - c0);
      auto block = src_rows == L && dst_rows == L ? &transpose_block<T, true> : &transpose_block<T, false>;
      block(src + r0 * lds + c0, lds, src_rows, dst + c0 * ld_dst + r0, ld_dst, dst_rows, scale);
    }
}

// ------------------------------------------------------------- conversion --
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// 16 fp16 / bf16 values <-> fp32 vectors with the conversion instructions of the build: widening
// is exact; narrowing rounds to nearest even (bf16 needs AVX512-BF16 for it, else the scalar loop).
#if defined(__AVX512F__)
template <typename S>
constexpr bool kWidens16 = std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>;
template <typename S>
constexpr bool kNarrows16 = std::is_same_v<S, c10::Half>
#if defined(__AVX512BF16__)
                            || std::is_same_v<S, c10::BFloat16>
#endif
    ;
template <typename S>
inline __m512 widen16(const S* src) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (std::is_same_v<S, c10::BFloat16>) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}
template <typename S>
inline __m256i narrow16(__m512 v) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<S, c10::BFloat16>) return (__m256i)_mm512_cvtneps_pbh(v);
  else
#endif
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

// n elements of src (any storage type) -> dst in the compute type, times scale.
template <typename S, typename T>
inline void load_row(T* __restrict__ dst, const S* __restrict__ src, int64_t n, T scale = T(1)) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && kWidens16<S>) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_mul_ps(widen16(src + i), sv));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]) * scale;
}
// n compute-type values -> storage type (fp16 / bf16: round to nearest even).
template <typename S, typename T>
inline void store_row(S* __restrict__ dst, const T* __restrict__ src, int64_t n, T scale = T(1)) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && kNarrows16<S>) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), narrow16<S>(_mm512_mul_ps(_mm512_loadu_ps(src + i), sv)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<S>(src[i] * scale);
}

// ------------------------------------------------------- denormals, threads --
// Sets flush-to-zero and denormals-are-zero for its scope.  The -100 shift mask makes exp
// underflow; products on denormals run an order of magnitude slower on x86.  fp32 results change
// only below 1.2e-38, far under every tolerance (the GPU kernels flush too).
class FlushDenormals {
 public:
  FlushDenormals() {
#ifdef SF_CPU_X86
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);
#endif
  }
  ~FlushDenormals() {
#ifdef SF_CPU_X86
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_ = 0;
};

// at::parallel_for (torch's thread pool, honouring torch.set_num_threads) with denormals flushed
// in every worker.  fn(begin, end) over [0, n); grain: items per task at least.
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, const F& fn) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    FlushDenormals flush;
    fn(begin, end);
  });
}

// A per-thread scratch buffer of at least n elements (reused across calls: no allocation in the
// hot loop; each kernel library has its own).  64-byte aligned: the kernels carve their tiles out
// of it at multiples of 64 bytes, so each vector access stays within one cache line (malloc's
// 16-byte alignment made every tile straddle lines).  Contents are unspecified.
template <typename T>
inline T* scratch(int slot, size_t n) {
  struct Buffer {
    T* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[8];
  Buffer& b = buffers[slot];
  if (b.size < n) {
    std::free(b.data);
    b.data = static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
    b.size = b.data ? n : 0;
    TORCH_CHECK(b.data, "semask_fast cpu: cannot allocate ", n * sizeof(T), " bytes of scratch");
  }
  return b.data;
}

// ------------------------------------------------------- streaming stores --
// Stores one vector at a vector-aligned address past the cache (a non-temporal store): for
// outputs written once and not read again by the kernel, so their lines need not be read for
// ownership first.  Call stream_fence() before the end of the parallel chunk.
template <typename T>
inline void stream_vec(T* dst, Vec<T> v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(dst, (__m512)v);
  else _mm512_stream_pd(dst, (__m512d)v);
#elif defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(dst, (__m256)v);
  else _mm256_stream_pd(dst, (__m256d)v);
#elif defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) _mm_stream_ps(dst, (__m128)v);
  else _mm_stream_pd(dst, (__m128d)v);
#else
  vstore(dst, v);
#endif
}

// Orders this thread's non-temporal stores before whatever follows.
inline void stream_fence() {
#ifdef SF_CPU_X86
  _mm_sfence();
#endif
}

// ---------------------------------------------------------- online softmax --
// The lane-wise max of init and n rows of vectors at tile + j * ld: four independent chains (one
// chain would run at the latency of vmax, a row per four cycles).
template <typename T>
inline Vec<T> column_max(const T* tile, int64_t ld, int n, Vec<T> init) {
  Vec<T> m[4] = {init, init, init, init};
  int j = 0;
  for (; j + 4 <= n; j += 4)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) m[u] = vmax<T>(m[u], vload(tile + (j + u) * ld));
  for (; j < n; ++j) m[0] = vmax<T>(m[0], vload(tile + j * ld));
  return vmax<T>(vmax<T>(m[0], m[1]), vmax<T>(m[2], m[3]));
}

// One key block of an online softmax over S^T (keys as rows, queries in lanes), for the query
// lanes [0, kLanes) at st: given the block's column max mx (>= the running max m), replaces the
// block by exp(S^T - mx) and updates the running max m, sum l, and alpha = exp(m_old - mx), the
// factor the caller rescales its output accumulators by (0 on the first block, m_old = -inf).
template <typename T>
inline void online_softmax_block(T* st, int64_t ld, int keys, Vec<T> mx, T* m, T* l, T* alpha) {
  Vec<T> sum{};
  for (int j = 0; j < keys; ++j) {
    T* e = st + int64_t(j) * ld;
    const Vec<T> x = vexp_nonpositive(vload(e) - mx);
    vstore(e, x);
    sum += x;
  }
  const Vec<T> al = vexp_nonpositive(vload(m) - mx);
  vstore(alpha, al);
  vstore(l, vload(l) * al + sum);
  vstore(m, mx);
}

// ------------------------------------------------------------------ dropout --
// Philox-4x32-10 keyed by the seed, counter (index lo, index hi, 0, 0): first output word.  The
// same hash as the GPU kernels, so a seed replays the same keep-mask on every backend.
inline uint32_t philox(uint64_t seed, uint64_t index) {
  uint32_t c0 = uint32_t(index), c1 = uint32_t(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    c0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    c1 = uint32_t(p1);
    c2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c3 = uint32_t(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Multiplier of a probability under dropout: 1/(1-p) when element `index` is kept, else 0
// (kept when (hash >> 8) / 2^24 >= p, compared in fp32 as on the GPU).
inline float dropout_factor(uint64_t seed, uint64_t index, float p) {
  const float u = static_cast<float>(philox(seed, index) >> 8) * (1.0f / 16777216.0f);
  return u >= p ? 1.0f / (1.0f - p) : 0.0f;
}

// The shifted-window geometry of an H x W image, or an error naming `op` and the sizes.
inline sf::WindowGeometry window_geometry(const char* op, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy,
                                          int64_t sx, bool pad_then_roll) {
  const char* error = sf::window_geometry_error(H, W, wh, ww, sy, sx);
  TORCH_CHECK(error == nullptr, op, ": ", error, " (image ", H, " x ", W, ", window ", wh, " x ", ww, ", shift ", sy,
              ", ", sx, ")");
  return sf::make_window_geometry(H, W, wh, ww, sy, sx, pad_then_roll);
}

}  // namespace sf::cpu
#pragma GCC visibility pop

// ----------------------------------------------------------------- bindings --
#define SF_CPU_LIBRARY(m) TORCH_LIBRARY_FRAGMENT(semask_fast_cpu, m)
#define SF_CPU_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(semask_fast_cpu, CPU, m)

#define SF_CPU_CHECK_INPUT(t, n)                                                                   \
  TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device());             \
  TORCH_CHECK((t).dim() == (n), #t " must have ", n, " dims, got ", (t).dim())
#define SF_CPU_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
// Kernels that take row strides: the last dim contiguous (stride 1, or a single element).
#define SF_CPU_CHECK_CONTIGUOUS_LAST_DIM(t) \
  TORCH_CHECK((t).stride(-1) == 1 || (t).size(-1) == 1, #t " must have a contiguous last dim")
#define SF_CPU_CHECK_SAME_DTYPE(t, ref) \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), #t " has dtype ", (t).scalar_type(), " but " #ref " has ", (ref).scalar_type())

// Runs the lambda with scalar_t = the storage type (float, double, c10::Half, c10::BFloat16) and
// T = its compute type (float; double for double).
#define SF_CPU_DISPATCH(dtype, name, ...)                                                               \
  [&] {                                                                                                 \
    switch (dtype) {                                                                                    \
      case at::kFloat: {                                                                                \
        using scalar_t = float;                                                                         \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      case at::kDouble: {                                                                               \
        using scalar_t = double;                                                                        \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      case at::kHalf: {                                                                                 \
        using scalar_t = c10::Half;                                                                     \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      case at::kBFloat16: {                                                                             \
        using scalar_t = c10::BFloat16;                                                                 \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      default:                                                                                          \
        TORCH_CHECK(false, name ": unsupported dtype ", dtype, " (float32, float64, float16, bfloat16)"); \
    }                                                                                                   \
  }()
