// Memory-traffic tracer for the SIMT harness: which bytes of which tensors a kernel reads and writes.
//
// The "trace" build flavour (semask_fast/_build.py) compiles an op source like the "simt" one plus
// g++'s ThreadSanitizer instrumentation (-fsanitize=thread), linked WITHOUT the TSan runtime: the
// compiler calls __tsan_read<N>/__tsan_write<N>(address) before every load and store of the
// translation unit and routes atomics through __tsan_atomic*.  This file supplies those functions
// (the atomics really are performed) and counts the accesses that fall inside registered regions:
//   * the tensors handed to trace_begin (the op's inputs), and
//   * every CPU tensor allocated while tracing (outputs and workspaces), through a wrapping
//     c10 CPU allocator.
// Shared memory (thread_local statics), fiber stacks and harness bookkeeping are not registered,
// so they are not counted: what remains is the global-memory traffic of the kernels.
//
// The same build checks shared memory for races (sf_race.h): plain loads and stores go to both.
//
// Per region it reports issued bytes (every access) and unique bytes per kernel launch (an address
// counts once per launch: the DRAM model, in which a launch's repeated reads hit in cache), the same
// two measures benchmarks/traffic.py takes from Triton's interpreter.  Tracing needs the blocks of a
// launch on one host thread (SF_SIMT_THREADS=1): the counters are not atomic.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "sf_race.h"

#define SF_NO_TRACE __attribute__((no_sanitize_thread, noinline))

namespace sf {
namespace trace {

constexpr int kMaxRegions = 1024;
constexpr uint8_t kRead = 1, kWritten = 2;

struct Region {
  uintptr_t begin = 0, end = 0;
  uint8_t* seen = nullptr;  // per byte: kRead | kWritten during the current launch
  int64_t read_issued = 0, written_issued = 0, read_unique = 0, written_unique = 0;
  bool allocated = false;   // allocated while tracing (an output or a workspace)
};

inline Region g_regions[kMaxRegions];
inline int g_count = 0;
inline bool g_on = false;
inline int64_t g_launches = 0;

SF_NO_TRACE inline void access(const void* p, long n, bool write) {
  if (!g_on) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (int i = g_count - 1; i >= 0; --i) {  // newest first: a freed range may be handed out again
    Region& r = g_regions[i];
    if (a < r.begin || a >= r.end) continue;
    const uintptr_t e = a + uintptr_t(n) < r.end ? a + uintptr_t(n) : r.end;
    const uint8_t bit = write ? kWritten : kRead;
    (write ? r.written_issued : r.read_issued) += int64_t(e - a);
    for (uintptr_t x = a; x < e; ++x) r.seen[x - r.begin] |= bit;
    return;
  }
}

// A plain (not atomic) load or store: counted, and checked for shared-memory races.
SF_NO_TRACE inline void plain_access(const void* p, long n, bool write) {
  race::on_access(p, n, write);
  access(p, n, write);
}

// Folds the unique bytes of the launch that just ended into the totals.
SF_NO_TRACE inline void end_launch() {
  for (int i = 0; i < g_count; ++i) {
    Region& r = g_regions[i];
    const uintptr_t size = r.end - r.begin;
    for (uintptr_t x = 0; x < size; ++x) {
      const uint8_t s = r.seen[x];
      if (!s) continue;
      r.read_unique += (s & kRead) ? 1 : 0;
      r.written_unique += (s & kWritten) ? 1 : 0;
      r.seen[x] = 0;
    }
  }
}

SF_NO_TRACE inline void add_region(const void* p, size_t bytes, bool allocated) {
  if (bytes == 0 || p == nullptr) return;
  TORCH_CHECK(g_count < kMaxRegions, "sf_trace: more than ", kMaxRegions, " regions");
  Region& r = g_regions[g_count++];
  r = Region{};
  r.begin = reinterpret_cast<uintptr_t>(p);
  r.end = r.begin + bytes;
  r.seen = static_cast<uint8_t*>(std::calloc(bytes, 1));
  TORCH_CHECK(r.seen != nullptr, "sf_trace: out of memory for a ", bytes, "-byte region map");
  r.allocated = allocated;
}

SF_NO_TRACE inline void clear_regions() {
  for (int i = 0; i < g_count; ++i) std::free(g_regions[i].seen);
  g_count = 0;
}

// Hands out the default CPU allocator's memory and registers it as a region.
struct TracingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base->allocate(n);
    if (g_on) add_region(p.get(), n, true);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { base->copy_data(dest, src, count); }
};

inline TracingAllocator g_allocator;
constexpr uint8_t kAllocatorPriority = 100;

inline void begin(const std::vector<at::Tensor>& inputs) {
  const char* threads = std::getenv("SF_SIMT_THREADS");
  TORCH_CHECK(threads && std::strcmp(threads, "1") == 0,
              "sf_trace: set SF_SIMT_THREADS=1 before tracing (the counters are per host thread)");
  TORCH_CHECK(!g_on, "sf_trace: trace_begin called twice");
  clear_regions();
  g_launches = 0;
  for (const at::Tensor& t : inputs) {
    if (!t.defined()) continue;
    TORCH_CHECK(t.device().is_cpu(), "sf_trace: regions must be CPU tensors");
    add_region(t.data_ptr(), size_t(t.nbytes()), false);
  }
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != &g_allocator) g_allocator.base = current;
  c10::SetCPUAllocator(&g_allocator, kAllocatorPriority);
  g_on = true;
}

// One row per region: begin, bytes, read_unique, written_unique, read_issued, written_issued,
// allocated (0/1); plus a last row (launches, 0, ...).
inline at::Tensor end() {
  TORCH_CHECK(g_on, "sf_trace: trace_end without trace_begin");
  end_launch();
  g_on = false;
  c10::SetCPUAllocator(g_allocator.base, kAllocatorPriority);
  at::Tensor out = at::empty({g_count + 1, 7}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int i = 0; i < g_count; ++i) {
    const Region& r = g_regions[i];
    const int64_t row[7] = {int64_t(r.begin), int64_t(r.end - r.begin), r.read_unique, r.written_unique,
                            r.read_issued, r.written_issued, r.allocated ? 1 : 0};
    std::memcpy(o + 7 * i, row, sizeof(row));
  }
  const int64_t last[7] = {g_launches, 0, 0, 0, 0, 0, 0};
  std::memcpy(o + 7 * g_count, last, sizeof(last));
  clear_regions();
  return out;
}

// Called by SF_LAUNCH before every launch: the previous launch's unique bytes are final.
SF_NO_TRACE inline void on_launch() {
  if (!g_on) return;
  end_launch();
  ++g_launches;
}

}  // namespace trace
}  // namespace sf

// The instrumentation's callbacks.  Hidden: each traced library counts its own kernels.
// weak: a library built from several translation units (semask_fast/_build.py's instance units)
// defines them in each.
#define SF_TRACE_EXPORT extern "C" __attribute__((visibility("hidden"), weak)) SF_NO_TRACE
#define SF_TRACE_ACCESS(n)                                                                                     \
  SF_TRACE_EXPORT void __tsan_read##n(void* p) { sf::trace::plain_access(p, n, false); }                      \
  SF_TRACE_EXPORT void __tsan_write##n(void* p) { sf::trace::plain_access(p, n, true); }                      \
  SF_TRACE_EXPORT void __tsan_unaligned_read##n(void* p) { sf::trace::plain_access(p, n, false); }            \
  SF_TRACE_EXPORT void __tsan_unaligned_write##n(void* p) { sf::trace::plain_access(p, n, true); }
SF_TRACE_ACCESS(1)
SF_TRACE_ACCESS(2)
SF_TRACE_ACCESS(4)
SF_TRACE_ACCESS(8)
SF_TRACE_ACCESS(16)
#undef SF_TRACE_ACCESS
SF_TRACE_EXPORT void __tsan_read_range(void* p, unsigned long n) { sf::trace::plain_access(p, long(n), false); }
SF_TRACE_EXPORT void __tsan_write_range(void* p, unsigned long n) { sf::trace::plain_access(p, long(n), true); }
SF_TRACE_EXPORT void __tsan_init() {}
SF_TRACE_EXPORT void __tsan_func_entry(void*) {}
SF_TRACE_EXPORT void __tsan_func_exit() {}
SF_TRACE_EXPORT void __tsan_vptr_update(void** p, void*) { sf::trace::access(p, sizeof(void*), true); }
SF_TRACE_EXPORT void __tsan_vptr_read(void** p) { sf::trace::access(p, sizeof(void*), false); }

// Atomics: performed (sequentially consistent: stronger than asked, always correct) and counted as a
// read and a write (a load: a read; a store: a write).
#define SF_TRACE_ATOMIC(bits, T)                                                                               \
  SF_TRACE_EXPORT T __tsan_atomic##bits##_load(const volatile void* a, int) {                                 \
    sf::trace::access(const_cast<void*>(a), sizeof(T), false);                                                \
    return __atomic_load_n(static_cast<const volatile T*>(a), __ATOMIC_SEQ_CST);                              \
  }                                                                                                          \
  SF_TRACE_EXPORT void __tsan_atomic##bits##_store(volatile void* a, T v, int) {                              \
    sf::trace::access(const_cast<void*>(a), sizeof(T), true);                                                 \
    __atomic_store_n(static_cast<volatile T*>(a), v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                                          \
  SF_TRACE_RMW(bits, T, exchange, __atomic_exchange_n)                                                       \
  SF_TRACE_RMW(bits, T, fetch_add, __atomic_fetch_add)                                                       \
  SF_TRACE_RMW(bits, T, fetch_sub, __atomic_fetch_sub)                                                       \
  SF_TRACE_RMW(bits, T, fetch_and, __atomic_fetch_and)                                                       \
  SF_TRACE_RMW(bits, T, fetch_or, __atomic_fetch_or)                                                         \
  SF_TRACE_RMW(bits, T, fetch_xor, __atomic_fetch_xor)                                                       \
  SF_TRACE_RMW(bits, T, fetch_nand, __atomic_fetch_nand)                                                     \
  SF_TRACE_EXPORT int __tsan_atomic##bits##_compare_exchange_strong(volatile void* a, void* c, T v, int, int) { \
    sf::trace::access(const_cast<void*>(a), sizeof(T), false);                                                \
    sf::trace::access(const_cast<void*>(a), sizeof(T), true);                                                 \
    return __atomic_compare_exchange_n(static_cast<volatile T*>(a), static_cast<T*>(c), v, false,              \
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                   \
  }                                                                                                          \
  SF_TRACE_EXPORT int __tsan_atomic##bits##_compare_exchange_weak(volatile void* a, void* c, T v, int, int) {   \
    return __tsan_atomic##bits##_compare_exchange_strong(a, c, v, 0, 0);                                      \
  }                                                                                                          \
  SF_TRACE_EXPORT T __tsan_atomic##bits##_compare_exchange_val(volatile void* a, T c, T v, int, int) {        \
    __tsan_atomic##bits##_compare_exchange_strong(a, &c, v, 0, 0);                                            \
    return c;                                                                                                \
  }
#define SF_TRACE_RMW(bits, T, name, builtin)                                                                  \
  SF_TRACE_EXPORT T __tsan_atomic##bits##_##name(volatile void* a, T v, int) {                                \
    sf::trace::access(const_cast<void*>(a), sizeof(T), false);                                                \
    sf::trace::access(const_cast<void*>(a), sizeof(T), true);                                                 \
    return builtin(static_cast<volatile T*>(a), v, __ATOMIC_SEQ_CST);                                         \
  }
SF_TRACE_ATOMIC(8, unsigned char)
SF_TRACE_ATOMIC(16, unsigned short)
SF_TRACE_ATOMIC(32, unsigned int)
SF_TRACE_ATOMIC(64, unsigned long)
#undef SF_TRACE_ATOMIC
#undef SF_TRACE_RMW
SF_TRACE_EXPORT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
SF_TRACE_EXPORT void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#undef SF_TRACE_EXPORT

// Catch-all kernels: trace_end has no tensor argument to dispatch on.  Registered by the unit with
// the op's bindings only (a generated instance unit defines SF_INSTANCE_UNIT).
#ifndef SF_INSTANCE_UNIT
TORCH_LIBRARY_FRAGMENT(SF_TRACE_NS, m) {
  m.def("trace_begin(Tensor[] inputs) -> ()", [](std::vector<at::Tensor> inputs) { sf::trace::begin(inputs); });
  m.def("trace_end() -> Tensor", []() { return sf::trace::end(); });
}
#endif
