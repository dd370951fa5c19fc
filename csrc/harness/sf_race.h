// Shared-memory race detector of the SIMT harness (the instrumented "trace" build).
//
// The harness runs a block's threads between two barriers in a shuffled order, so a missing
// __syncthreads() shows up as wrong values.  It cannot show a race that a warp operation hides:
// every lane reaches a shuffle before any lane passes it, so a lane's read before a shuffle always
// runs here before another lane's write after it; on the GPU a shuffle orders no memory access.
// This file checks the CUDA memory model for shared memory instead: every load and store of the
// instrumented translation unit (sf_trace.h's callbacks) that falls in the running block's
// shared memory (SF_DYNAMIC_SHARED and SF_STATIC_SHARED) is checked against a shadow of the last
// write and the reads since, per 2-byte granule.  Two accesses of different threads, one a
// write, conflict unless a __syncthreads() completed between them, or a __syncwarp() of their
// warp if both threads are in the same warp.  A conflict stops the launch with an error naming
// the threads and the byte.  Atomics are not checked (they may race by design).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sf {
namespace race {

struct Granule {
  unsigned long long serial = 0;  // block_serial of the block that last touched it (else: empty)
  int16_t writer = -1, reader[2] = {-1, -1};
  uint32_t wb = 0, ww = 0, rb[2] = {0, 0}, rw[2] = {0, 0};  // block barriers and warp syncs then
};

// The shadow of one shared-memory range of this host thread (the dynamic buffer, a static array).
struct Shadow {
  const unsigned char* begin = nullptr;
  size_t bytes = 0;
  std::vector<Granule> granules;
};

inline thread_local std::vector<Shadow> t_shadows;

__attribute__((no_sanitize_thread)) inline Shadow& shadow_of(const unsigned char* begin, size_t bytes) {
  for (Shadow& s : t_shadows)
    if (s.begin == begin) {
      if (s.bytes != bytes) {
        s.bytes = bytes;
        s.granules.assign((bytes + 1) / 2, Granule{});
      }
      return s;
    }
  t_shadows.push_back(Shadow{begin, bytes, std::vector<Granule>((bytes + 1) / 2)});
  return t_shadows.back();
}

// Whether an access of thread `prev` (with the block's barrier count `b` and its warp's sync count
// `w` at the time) happens before the current thread's access.
__attribute__((no_sanitize_thread)) inline bool ordered(const simt::BlockRunner& r, int prev, uint32_t b, uint32_t w,
                                                        int cur) {
  if (prev == cur || b != r.barriers) return true;
  return prev / simt::kWarpSize == cur / simt::kWarpSize && w != r.warps[cur / simt::kWarpSize].syncs;
}

[[noreturn]] __attribute__((no_sanitize_thread)) inline void report(const char* what, size_t offset, bool write,
                                                                    int other, bool other_wrote) {
  const std::string msg = std::string("shared-memory race: this thread ") + (write ? "writes" : "reads") + " byte " +
                          std::to_string(offset) + " of " + what + ", which thread " + std::to_string(other) +
                          (other_wrote ? " wrote" : " read") +
                          " with no __syncthreads() or __syncwarp() of both threads in between (a shuffle or "
                          "an mma does not order memory)";
  simt::tls_internal = false;  // fail() does not return here
  simt::fail(msg);
}

__attribute__((no_sanitize_thread)) inline void check(const char* what, const unsigned char* begin, size_t bytes,
                                                      const unsigned char* a, long n, bool write) {
  simt::BlockRunner& r = simt::runner();
  const int cur = simt::fiber().linear;
  const uint32_t b = r.barriers, w = r.warps[cur / simt::kWarpSize].syncs;
  Shadow& sh = shadow_of(begin, bytes);
  const size_t first = size_t(a - begin), last = std::min(bytes, first + size_t(n)) - 1;
  for (size_t gi = first / 2; gi <= last / 2; ++gi) {
    Granule& g = sh.granules[gi];
    if (g.serial != r.block_serial) g = Granule{}, g.serial = r.block_serial;
    if (g.writer >= 0 && !ordered(r, g.writer, g.wb, g.ww, cur)) report(what, gi * 2, write, g.writer, true);
    if (write) {
      for (int k = 0; k < 2; ++k)
        if (g.reader[k] >= 0 && !ordered(r, g.reader[k], g.rb[k], g.rw[k], cur))
          report(what, gi * 2, write, g.reader[k], false);
      g.writer = int16_t(cur), g.wb = b, g.ww = w;
      g.reader[0] = g.reader[1] = -1;
      continue;
    }
    // Keep up to two readers, one of them other than any later writer: a read before the block's
    // last barrier is ordered before everything to come, so it leaves its slot.
    int slot = -1;
    for (int k = 0; k < 2; ++k) {
      if (g.reader[k] >= 0 && g.rb[k] != b) g.reader[k] = -1;
      if (g.reader[k] == cur) slot = k;
    }
    if (slot < 0) slot = g.reader[0] < 0 ? 0 : 1;
    g.reader[slot] = int16_t(cur), g.rb[slot] = b, g.rw[slot] = w;
  }
}

// Called for every plain load and store of the instrumented translation unit.
__attribute__((no_sanitize_thread)) inline void on_access(const void* p, long n, bool write) {
  simt::BlockRunner* r = simt::tls_runner;
  if (r == nullptr || r->current == nullptr || n <= 0 || simt::tls_internal) return;  // not the kernel's access
  simt::tls_internal = true;
  const unsigned char* a = static_cast<const unsigned char*>(p);
  const unsigned char* dyn = r->dynamic_smem.data();
  if (a >= dyn && a < dyn + r->dynamic_bytes) {
    check("dynamic shared memory", dyn, r->dynamic_bytes, a, n, write);
  } else {
    for (const simt::StaticShared& s : r->statics)
      if (a >= s.begin && a < s.begin + s.bytes) {
        check("a static shared array", s.begin, s.bytes, a, n, write);
        break;
      }
  }
  simt::tls_internal = false;
}

}  // namespace race
}  // namespace sf
