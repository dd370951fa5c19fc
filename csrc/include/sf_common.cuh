// The header every csrc/ops/*.cu includes first.
//
// One kernel source, two builds:
// - nvcc (the `cuda` extension): CUDA runtime, cuda_fp16/cuda_bf16, launches with <<<...>>>.
// - g++ -DSF_SIMT (the `simt` extension): the CPU SIMT harness (csrc/harness/sf_simt.h) runs the
//   same kernels on CPU memory with CUDA's semantics.
//
// Kernels write plain CUDA, with two harness-visible conventions:
// - launch with SF_LAUNCH(kernel, grid, block, smem_bytes, stream, args...);
// - dynamic shared memory is SF_DYNAMIC_SHARED(T, name); (not `extern __shared__ T name[]`);
// - static shared memory is SF_STATIC_SHARED(T, name, count); (16-byte aligned; the harness counts
//   it against the architecture's shared-memory limit, see sf_simt.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef SF_SIMT
#include "sf_simt.h"
#ifdef SF_TRACE
// The trace flavour counts each launch's global-memory traffic (csrc/harness/sf_trace.h).
#include "sf_trace.h"
#define SF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (::sf::trace::on_launch(), sf_simt_launch(kernel, dim3(grid), dim3(block), size_t(smem), ##__VA_ARGS__))
#else
#define SF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  sf_simt_launch(kernel, dim3(grid), dim3(block), size_t(smem), ##__VA_ARGS__)
#endif
#define SF_DYNAMIC_SHARED(T, name) T* name = ::sf::simt::dynamic_shared<T>()
#define SF_STATIC_SHARED(T, name, count)    \
  alignas(16) static thread_local T name[count]; \
  ::sf::simt::note_static_shared(name, sizeof(name))
// The harness has no launch errors to collect after the fact: a failing launch throws.
#define SF_CHECK_LAUNCH() ((void)0)
// Opt a kernel in to more than 48 KiB of dynamic shared memory (no limit to lift in the harness).
#define SF_ALLOW_DYNAMIC_SMEM(kernel, bytes) ((void)(kernel), (void)(bytes))
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<dim3(grid), dim3(block), size_t(smem), stream>>>(__VA_ARGS__)
#define SF_STATIC_SHARED(T, name, count) __shared__ __align__(16) T name[count]
#define SF_DYNAMIC_SHARED(T, name) \
  extern __shared__ __align__(16) unsigned char sf_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(sf_dynamic_smem_)
#define SF_ALLOW_DYNAMIC_SMEM(kernel, bytes)                                                          \
  do {                                                                                                \
    if ((bytes) > 48 * 1024) {                                                                        \
      cudaError_t sf_err_ = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                                 int(bytes));                                         \
      SF_CHECK(sf_err_ == cudaSuccess, "cannot give a kernel ", bytes, " bytes of shared memory: ",   \
               cudaGetErrorString(sf_err_));                                                          \
    }                                                                                                 \
  } while (0)
#define SF_CHECK_LAUNCH()                                                            \
  do {                                                                               \
    cudaError_t sf_err_ = cudaGetLastError();                                        \
    SF_CHECK(sf_err_ == cudaSuccess, "CUDA launch failed: ", cudaGetErrorString(sf_err_)); \
  } while (0)
#endif

#define SF_HOST_DEVICE __host__ __device__
#define SF_DEVICE_INLINE __device__ __forceinline__

namespace sf {

inline std::string to_message(const char* s) { return s; }
inline std::string to_message(const std::string& s) { return s; }
template <typename T>
inline std::string to_message(const T& v) {
  return std::to_string(v);
}

// Host-side checks in launchers and bindings: throw std::runtime_error with the message parts
// concatenated (torch turns it into a Python RuntimeError).
template <typename... Parts>
[[noreturn]] inline void fail_check(const char* cond, const char* file, int line, const Parts&... parts) {
  std::string msg;
  ((msg += to_message(parts)), ...);
  throw std::runtime_error(msg + " (check `" + cond + "` failed at " + file + ":" + std::to_string(line) + ")");
}

// Conversions between the storage types and fp32 (all compute is fp32).
SF_DEVICE_INLINE float to_float(float x) { return x; }
SF_DEVICE_INLINE float to_float(__half x) { return __half2float(x); }
SF_DEVICE_INLINE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
SF_DEVICE_INLINE T from_float(float x);
template <>
SF_DEVICE_INLINE float from_float<float>(float x) { return x; }
template <>
SF_DEVICE_INLINE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
SF_DEVICE_INLINE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

SF_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace sf

#define SF_CHECK(cond, ...)                                                \
  do {                                                                     \
    if (!(cond)) ::sf::fail_check(#cond, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
