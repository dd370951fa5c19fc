// CPU SIMT harness: runs CUDA C++ kernel sources, unchanged, on the CPU with CUDA's semantics.
//
// Included (through sf_common.cuh) when a .cu file is compiled by g++ with -DSF_SIMT.
//
// Execution model
// - A launch runs every block of the grid; blocks are spread over several host threads
//   (SF_SIMT_THREADS, default: hardware concurrency).  Each host thread runs one block at a time.
// - The threads of a block are cooperative fibers on that host thread.  A fiber runs until it
//   reaches a barrier (__syncthreads, or a warp-level operation) or returns.  Between two barriers
//   the order in which the fibers run is a seeded random permutation (SF_SIMT_SEED, default 0;
//   fixed per (seed, block) so runs are reproducible), so a kernel that relies on an order the
//   hardware does not guarantee (a missing __syncthreads) computes wrong values in tests.
// - Shared memory is declared with SF_DYNAMIC_SHARED(T, name) (the harness cannot express
//   `extern __shared__ T name[]`) and SF_STATIC_SHARED(T, name, count) (a thread_local static:
//   one copy per host thread, i.e. per running block; a plain `__shared__` does not compile
//   here, so none escapes the count below).  Both are filled with 0xFF bytes (NaN for every
//   float type) before a block uses them, so reading shared memory nobody wrote shows up.
// - A block's static plus dynamic shared memory must fit the target architecture's limit
//   (SF_SIMT_ARCH: sm_80 163 KiB, sm_86 / sm_89 99 KiB, sm_90 227 KiB, the default), and its
//   static shared memory nvcc's 48 KiB; a launch or a declaration past them throws.
// - Warp operations (__shfl*_sync, __ballot_sync, __any/__all_sync, __syncwarp and the MMA
//   emulation of sf_mma.cuh) are exchanges through a per-warp buffer guarded by a warp barrier:
//   every lane named in the mask must reach the same operation, as on sm_70+.  Only __syncwarp
//   and __syncthreads order memory: the instrumented trace build (csrc/harness/sf_race.h)
//   reports shared-memory accesses of two threads that only a shuffle (or nothing) separates,
//   which the run order above cannot show (a lane's reads before a shuffle always run before
//   another lane's writes after it here, not on the GPU).
// - Barrier misuse is an error, not a hang: if some threads wait at a barrier that the others
//   can no longer reach (they returned, or wait at another warp operation), the launch throws
//   std::runtime_error naming the block and the barrier.
// - Atomics are real host atomics (blocks run concurrently on several host threads).
// - Under AddressSanitizer (the asan build flavour) the bytes of the dynamic shared-memory buffer
//   past the launch's size are poisoned, so a kernel reading or writing past its dynamic shared
//   memory is reported, and every fiber switch is announced to ASan (its stack checks and
//   unwinding need to know which stack runs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SF_SIMT_ASAN 1
#else
#define SF_SIMT_ASAN 0
#endif

// ---------------------------------------------------------------------------------------------
// CUDA keywords.  The CUDA headers define most of them to nothing under a host compiler;
// shared memory must become per-block (= per host thread) storage the harness can count.
// ---------------------------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __launch_bounds__
#undef __constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
// Static shared memory is SF_STATIC_SHARED (sf_common.cuh), which the harness counts.
#define __shared__ static_assert(false, "declare static shared memory with SF_STATIC_SHARED(T, name, count)");
#define __constant__ static const
#define __launch_bounds__(...)

namespace sf {
namespace simt {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
// Shared memory a block may use, static plus dynamic (cudaDevAttrMaxSharedMemoryPerBlockOptin).
struct ArchLimit {
  const char* arch;
  size_t smem;
};
constexpr ArchLimit kArchLimits[] = {{"sm_80", 163 * 1024}, {"sm_86", 99 * 1024}, {"sm_89", 99 * 1024},
                                     {"sm_90", 227 * 1024}};
// Static shared memory of a kernel (nvcc rejects more).
constexpr size_t kMaxStaticSmem = 48 * 1024;
// Bytes each lane may contribute to one warp exchange (the MMA emulation needs 24).
constexpr size_t kExchangeSlot = 64;
constexpr size_t kFiberStack = 256 * 1024;

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  dim3 tid;
  int linear = 0;
  int warp = 0;
  int lane = 0;
  unsigned exchanges = 0;  // warp exchanges done: selects the buffer (double buffering)
  enum State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone } state = kReady;
  char* stack = nullptr;
  void* asan_fake_stack = nullptr;  // ASan's fake stack of this fiber while switched out
};

struct Warp {
  int lanes = 0;             // lanes that exist (the last warp of a block may be partial)
  unsigned exists = 0;       // bitmask of those lanes
  unsigned mask = 0;         // mask of the warp barrier being gathered (0: none)
  int arrived = 0;
  bool fence = false;        // the barrier being gathered is a __syncwarp
  unsigned syncs = 0;        // __syncwarp()s completed by the whole warp (orders memory)
  alignas(16) unsigned char buf[2][kWarpSize][kExchangeSlot];
};

// A static shared array in use by the running block.
struct StaticShared {
  unsigned char* begin;
  size_t bytes;
};

void run_fiber_body();

// One per host thread: runs blocks one after another.
struct BlockRunner {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Fiber*> ready, next;
  std::vector<unsigned char> dynamic_smem;
  size_t dynamic_bytes = 0;                  // the launch's dynamic shared memory
  std::vector<StaticShared> statics;         // the block's static shared arrays so far
  size_t static_bytes = 0;
  size_t smem_limit = 0;                     // static + dynamic (the target architecture's)
  const char* arch = "";
  unsigned barriers = 0;                     // __syncthreads()s the block completed
  unsigned long long block_serial = 0;       // distinct per block run on this host thread
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;     // the host thread's stack (ASan's fiber switches)
  size_t scheduler_stack_bytes = 0;
  void* scheduler_fake_stack = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_ctx;
#endif
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  int nthreads = 0;
  int at_block_barrier = 0;
  std::string error;

  ~BlockRunner() {
    for (Fiber& f : fibers) std::free(f.stack);
  }
};

inline thread_local BlockRunner* tls_runner = nullptr;
// Set while the harness's own code runs inside a kernel: the instrumented build's memory checks
// (sf_race.h) skip those accesses, and do not re-enter themselves through the library calls they
// make (g++ does not inline instrumented code into uninstrumented functions).
inline thread_local bool tls_internal = false;

inline BlockRunner& runner() { return *tls_runner; }
inline Fiber& fiber() { return *tls_runner->current; }

// ---------------------------------------------------------------------------------------------
// Context switch.  x86-64: saves the callee-saved registers on the old stack and swaps stack
// pointers (a few ns; ucontext's swapcontext makes a sigprocmask system call per switch).
// ---------------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void sf_simt_switch(void** save_sp, void* next_sp);
asm(R"(
    .text
    .weak sf_simt_switch
    .hidden sf_simt_switch
    .type sf_simt_switch, @function
sf_simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sf_simt_switch, .-sf_simt_switch
)");

void fiber_started();

inline void fiber_entry() {
  fiber_started();
  run_fiber_body();  // never returns
}

inline void prepare_fiber(Fiber& f) {
  // Stack top aligned to 16; `ret` into fiber_entry leaves rsp = top - 8, as after a call.
  auto top = reinterpret_cast<uintptr_t>(f.stack + kFiberStack) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<void**>(top);
  slot[-1] = nullptr;                                             // fake return address
  slot[-2] = reinterpret_cast<void*>(&fiber_entry);               // popped by ret
  for (int i = 3; i <= 8; ++i) slot[-i] = nullptr;                // rbp rbx r12-r15
  f.sp = &slot[-8];
}

inline void context_to_fiber(BlockRunner& r, Fiber& f) { sf_simt_switch(&r.scheduler_sp, f.sp); }
inline void context_to_scheduler(BlockRunner& r, Fiber& f) { sf_simt_switch(&f.sp, r.scheduler_sp); }
#else
void fiber_started();

inline void fiber_entry() {
  fiber_started();
  run_fiber_body();  // never returns
}

inline void prepare_fiber(Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kFiberStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_entry, 0);
}
inline void context_to_fiber(BlockRunner& r, Fiber& f) { swapcontext(&r.scheduler_ctx, &f.ctx); }
inline void context_to_scheduler(BlockRunner& r, Fiber& f) { swapcontext(&f.ctx, &r.scheduler_ctx); }
#endif

// The switches, announced to ASan in the asan build: it checks stack accesses against the bounds
// of the running stack and unpoisons it at [[noreturn]] calls and exceptions.  A fiber that ends
// (kDone) has its fake stack freed (nullptr).  Its stack memory is reused by a fiber of the next
// block, whose frames may lie where an abandoned frame (a fiber stopped by fail(), or left at a
// barrier by a failed launch) left poisoned redzones: prepare_fiber unpoisons it.
inline void switch_to_fiber(BlockRunner& r, Fiber& f) {
#if SF_SIMT_ASAN
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, f.stack, kFiberStack);
#endif
  context_to_fiber(r, f);
#if SF_SIMT_ASAN
  __sanitizer_finish_switch_fiber(r.scheduler_fake_stack, nullptr, nullptr);
#endif
}
inline void switch_to_scheduler(BlockRunner& r, Fiber& f) {
#if SF_SIMT_ASAN
  __sanitizer_start_switch_fiber(f.state == Fiber::kDone ? nullptr : &f.asan_fake_stack, r.scheduler_stack,
                                 r.scheduler_stack_bytes);
#endif
  context_to_scheduler(r, f);
#if SF_SIMT_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &r.scheduler_stack, &r.scheduler_stack_bytes);
#endif
}
// First code of a fiber, on its own stack: learns the scheduler's stack (to switch back to).
inline void fiber_started() {
#if SF_SIMT_ASAN
  BlockRunner& r = *tls_runner;
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack, &r.scheduler_stack_bytes);
#endif
}

// Stop the current fiber for good with an error; the launch throws it.
[[noreturn]] inline void fail(const std::string& msg) {
  BlockRunner& r = runner();
  Fiber& f = fiber();
  if (r.error.empty()) {
    r.error = "block (" + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + "," +
              std::to_string(r.block_idx.z) + ") thread (" + std::to_string(f.tid.x) + "," +
              std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + "): " + msg;
  }
  f.state = Fiber::kDone;
  switch_to_scheduler(r, f);
  __builtin_unreachable();
}

inline void run_fiber_body() {
  BlockRunner& r = runner();
  (*r.body)();
  Fiber& f = fiber();
  f.state = Fiber::kDone;
  switch_to_scheduler(r, f);
  __builtin_unreachable();
}

// __syncthreads(): wait until every thread of the block is here.
inline void block_barrier() {
  BlockRunner& r = runner();
  Fiber& f = fiber();
  f.state = Fiber::kAtBlockBarrier;
  if (++r.at_block_barrier == r.nthreads) {
    r.at_block_barrier = 0;
    ++r.barriers;
    for (int t = 0; t < r.nthreads; ++t) {
      r.fibers[t].state = Fiber::kReady;
      r.next.push_back(&r.fibers[t]);
    }
  }
  switch_to_scheduler(r, f);
}

// Warp barrier over the lanes of `mask` (that exist); every one of them must pass the same mask.
// `fence`: a __syncwarp (orders the lanes' memory accesses); every lane must reach the same kind.
inline void warp_barrier(unsigned mask, bool fence) {
  BlockRunner& r = runner();
  Fiber& f = fiber();
  Warp& w = r.warps[f.warp];
  unsigned members = mask & w.exists;
  if (!(members >> f.lane & 1u)) fail("warp operation with a mask that excludes the calling lane");
  if (w.mask == 0) {
    w.mask = mask;
    w.fence = fence;
  } else if (w.mask != mask) {
    fail("lanes of one warp reached warp operations with different masks");
  } else if (w.fence != fence) {
    fail("lanes of one warp reached different warp operations (__syncwarp and a shuffle)");
  }
  f.state = Fiber::kAtWarpBarrier;
  if (++w.arrived == __builtin_popcount(members)) {
    w.mask = 0;
    w.arrived = 0;
    if (fence) ++w.syncs;
    int base = f.warp * kWarpSize;
    for (int l = 0; l < w.lanes; ++l) {
      if (members >> l & 1u) {
        Fiber& g = r.fibers[base + l];
        g.state = Fiber::kReady;
        r.next.push_back(&g);
      }
    }
  }
  switch_to_scheduler(r, f);
}

// Every lane of `mask` contributes `bytes` bytes; returns the warp's buffer: lane l's bytes at
// [l * kExchangeSlot].  Valid until this lane's next-but-one exchange (two buffers alternate; a
// lane cannot start the exchange after next before every lane has left this one).
inline const unsigned char* warp_exchange(unsigned mask, const void* data, size_t bytes, bool fence = false) {
  Fiber& f = fiber();
  Warp& w = runner().warps[f.warp];
  unsigned char (*buf)[kExchangeSlot] = w.buf[f.exchanges++ & 1u];
  std::memcpy(buf[f.lane], data, bytes);
  warp_barrier(mask, fence);
  return &buf[0][0];
}

inline int lane_id() { return fiber().lane; }

inline unsigned long long mix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline unsigned long long env_u64(const char* name, unsigned long long fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

inline std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// The target architecture (SF_SIMT_ARCH, default sm_90) and its shared-memory limit.
inline const ArchLimit& arch_limit() {
  const char* v = std::getenv("SF_SIMT_ARCH");
  const std::string arch = v && *v ? v : "sm_90";
  for (const ArchLimit& a : kArchLimits)
    if (arch == a.arch) return a;
  throw std::runtime_error("SIMT harness: SF_SIMT_ARCH=" + arch + " (expected sm_80, sm_86, sm_89 or sm_90)");
}

inline std::string smem_use(const BlockRunner& r) {
  return std::to_string(r.static_bytes + r.dynamic_bytes) + " bytes of shared memory (" +
         std::to_string(r.static_bytes) + " static + " + std::to_string(r.dynamic_bytes) + " dynamic)";
}

inline void setup_runner(BlockRunner& r, dim3 grid, dim3 block, size_t smem) {
  r.grid_dim = grid;
  r.block_dim = block;
  r.nthreads = int(block.x * block.y * block.z);
  if (int(r.fibers.size()) < r.nthreads) {
    size_t old = r.fibers.size();
    r.fibers.resize(r.nthreads);  // Fibers own raw stacks: moving them keeps the pointers
    for (size_t i = old; i < r.fibers.size(); ++i) {
      r.fibers[i].stack = static_cast<char*>(std::malloc(kFiberStack));
      if (!r.fibers[i].stack) throw std::runtime_error("SIMT harness: out of memory for fiber stacks");
    }
  }
  int nwarps = (r.nthreads + kWarpSize - 1) / kWarpSize;
  r.warps.assign(nwarps, Warp{});
  for (int w = 0; w < nwarps; ++w) {
    int lanes = std::min(kWarpSize, r.nthreads - w * kWarpSize);
    r.warps[w].lanes = lanes;
    r.warps[w].exists = lanes == kWarpSize ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
  }
#if SF_SIMT_ASAN
  ASAN_UNPOISON_MEMORY_REGION(r.dynamic_smem.data(), r.dynamic_smem.capacity());
#endif
  r.dynamic_smem.resize(std::max<size_t>(smem, 16));
  r.dynamic_bytes = smem;
#if SF_SIMT_ASAN
  // Past the launch's dynamic shared memory: a kernel's access there is an ASan finding.
  ASAN_POISON_MEMORY_REGION(r.dynamic_smem.data() + smem, r.dynamic_smem.capacity() - smem);
#endif
  const ArchLimit& a = arch_limit();
  r.smem_limit = a.smem;
  r.arch = a.arch;
}

inline void run_block(BlockRunner& r, dim3 bidx, unsigned long long seed) {
  r.block_idx = bidx;
  r.error.clear();
  r.at_block_barrier = 0;
  r.barriers = 0;
  ++r.block_serial;
  r.statics.clear();
  r.static_bytes = 0;
  std::memset(r.dynamic_smem.data(), 0xFF, r.dynamic_bytes);
  r.ready.clear();
  r.next.clear();
  for (int t = 0; t < r.nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.tid = dim3(t % r.block_dim.x, (t / r.block_dim.x) % r.block_dim.y, t / (r.block_dim.x * r.block_dim.y));
    f.linear = t;
    f.warp = t / kWarpSize;
    f.lane = t % kWarpSize;
    f.exchanges = 0;
    f.state = Fiber::kReady;
#if SF_SIMT_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kFiberStack);
#endif
    prepare_fiber(f);
    r.ready.push_back(&f);
  }
  for (Warp& w : r.warps) w.mask = 0, w.arrived = 0, w.fence = false, w.syncs = 0;
  unsigned long long block_linear = bidx.x + (unsigned long long)r.grid_dim.x * (bidx.y + (unsigned long long)r.grid_dim.y * bidx.z);
  unsigned long long state = mix64(seed * 0x2545F4914F6CDD1Dull + block_linear);
  while (!r.ready.empty()) {
    // Fisher-Yates with the block's generator: the order of this round.
    for (size_t i = r.ready.size() - 1; i > 0; --i) {
      state = mix64(state);
      std::swap(r.ready[i], r.ready[state % (i + 1)]);
    }
    for (Fiber* f : r.ready) {
      r.current = f;
      switch_to_fiber(r, *f);
      if (!r.error.empty()) throw std::runtime_error(r.error);
    }
    r.ready.swap(r.next);
    r.next.clear();
  }
  r.current = nullptr;
  int done = 0, at_block = 0, at_warp = 0;
  for (int t = 0; t < r.nthreads; ++t) {
    done += r.fibers[t].state == Fiber::kDone;
    at_block += r.fibers[t].state == Fiber::kAtBlockBarrier;
    at_warp += r.fibers[t].state == Fiber::kAtWarpBarrier;
  }
  if (done != r.nthreads) {
    throw std::runtime_error("block " + dim_str(bidx) + ": deadlock: " + std::to_string(at_block) +
                             " threads wait at __syncthreads(), " + std::to_string(at_warp) +
                             " at a warp operation, " + std::to_string(done) +
                             " returned (every thread of the block, or every lane of the mask, "
                             "must reach the same barrier)");
  }
}

// Runs `body` (the kernel call with its arguments bound) for every thread of the grid.
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreadsPerBlock)
    throw std::runtime_error("SIMT launch: block " + dim_str(block) + " must have 1..1024 threads");
  if (grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("SIMT launch: grid " + dim_str(grid) + ": y and z must be <= 65535");
  const ArchLimit& arch = arch_limit();
  if (smem > arch.smem)
    throw std::runtime_error("SIMT launch: " + std::to_string(smem) + " bytes of dynamic shared memory (" +
                             arch.arch + " gives a block at most " + std::to_string(arch.smem) + ", SF_SIMT_ARCH)");
  unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
  if (nblocks == 0) return;
  unsigned long long seed = env_u64("SF_SIMT_SEED", 0);
  unsigned long long want = env_u64("SF_SIMT_THREADS", std::max(1u, std::thread::hardware_concurrency()));
  unsigned workers = unsigned(std::max<unsigned long long>(1, std::min(want, nblocks)));

  std::atomic<unsigned long long> next_block{0};
  std::mutex error_mutex;
  std::string first_error;
  auto work = [&]() {
    thread_local std::unique_ptr<BlockRunner> mine;
    if (!mine) mine = std::make_unique<BlockRunner>();
    BlockRunner* saved = tls_runner;  // a launch from inside a kernel is not supported; keep state sane
    tls_runner = mine.get();
    try {
      setup_runner(*mine, grid, block, smem);
      mine->body = &body;
      for (unsigned long long b; (b = next_block.fetch_add(1)) < nblocks;) {
        dim3 bidx(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / ((unsigned long long)grid.x * grid.y)));
        run_block(*mine, bidx, seed);
      }
    } catch (const std::exception& e) {
      next_block.store(nblocks);
      std::lock_guard<std::mutex> lock(error_mutex);
      if (first_error.empty()) first_error = e.what();
    }
    tls_runner = saved;
  };
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < workers; ++i) threads.emplace_back(work);
  work();
  for (std::thread& t : threads) t.join();
  if (!first_error.empty()) throw std::runtime_error("SIMT harness: " + first_error);
}

template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(runner().dynamic_smem.data());
}

// A thread reached the declaration of a static shared array (SF_STATIC_SHARED): the first one
// of the block counts it against the limits and poisons it (as dynamic shared memory).
__attribute__((no_sanitize_thread)) inline void note_static_shared(void* p, size_t bytes) {
  BlockRunner& r = runner();
  unsigned char* begin = static_cast<unsigned char*>(p);
  for (const StaticShared& s : r.statics)
    if (s.begin == begin) return;
  tls_internal = true;
  r.statics.push_back({begin, bytes});
  tls_internal = false;
  r.static_bytes += bytes;
  if (r.static_bytes > kMaxStaticSmem)
    fail(std::to_string(r.static_bytes) + " bytes of static shared memory (nvcc allows " +
         std::to_string(kMaxStaticSmem) + ")");
  if (r.static_bytes + r.dynamic_bytes > r.smem_limit)
    fail(smem_use(r) + ": " + r.arch + " gives a block at most " + std::to_string(r.smem_limit) + " (SF_SIMT_ARCH)");
  std::memset(begin, 0xFF, bytes);
}

// ---------------------------------------------------------------------------------------------
// Warp primitives
// ---------------------------------------------------------------------------------------------
template <typename T>
inline T shuffle_from(unsigned mask, T value, int src, bool keep_own) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type larger than 8 bytes");
  const unsigned char* buf = warp_exchange(mask, &value, sizeof(T));
  const Warp& w = runner().warps[fiber().warp];
  if (keep_own || src < 0 || src >= w.lanes) return value;  // out of range: the lane keeps its value
  T out;
  std::memcpy(&out, buf + src * kExchangeSlot, sizeof(T));
  return out;
}

inline void check_width(int width) {
  if (width < 1 || width > kWarpSize || (width & (width - 1))) fail("shuffle width must be a power of 2 <= 32");
}

}  // namespace simt
}  // namespace sf

#include "sf_simt_device.h"
