// Torch bindings support for csrc/ops/*.cu: include after sf_common.cuh, at the end of the file.
//
// Only <torch/library.h> and ATen core headers (torch/extension.h costs minutes per translation
// unit on a small machine).  The same binding code serves both builds:
//   SF_TORCH_NS      semask_fast_cuda (nvcc build) | semask_fast_simt (harness build)
//   SF_DISPATCH_KEY  CUDA                          | CPU
// Usage:
//   SF_TORCH_LIBRARY_FRAGMENT(m) { m.def("window_partition_forward(Tensor x, ...) -> Tensor"); }
//   SF_TORCH_LIBRARY_IMPL(m) { m.impl("window_partition_forward", &window_partition_forward); }
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <type_traits>

#ifndef SF_SIMT
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#ifdef SF_TRACE_NS
#define SF_TORCH_NS SF_TRACE_NS  // the trace flavour: one namespace per source (semask_fast/_build.py)
#define SF_DISPATCH_KEY CPU
#define SF_DEVICE_TYPE c10::DeviceType::CPU
#elif defined(SF_SIMT)
#define SF_TORCH_NS semask_fast_simt
#define SF_DISPATCH_KEY CPU
#define SF_DEVICE_TYPE c10::DeviceType::CPU
#else
#define SF_TORCH_NS semask_fast_cuda
#define SF_DISPATCH_KEY CUDA
#define SF_DEVICE_TYPE c10::DeviceType::CUDA
#endif

// One level of indirection so SF_TORCH_NS / SF_DISPATCH_KEY expand before torch pastes them.
#define SF_TORCH_LIBRARY_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define SF_TORCH_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define SF_TORCH_LIBRARY_FRAGMENT(m) SF_TORCH_LIBRARY_FRAGMENT_(SF_TORCH_NS, m)
#define SF_TORCH_LIBRARY_IMPL(m) SF_TORCH_LIBRARY_IMPL_(SF_TORCH_NS, SF_DISPATCH_KEY, m)

// Input checks at the binding boundary; messages name the argument.
#define SF_CHECK_DEVICE(t) \
  TORCH_CHECK((t).device().type() == SF_DEVICE_TYPE, #t " must be on ", SF_DEVICE_TYPE, ", got ", (t).device())
#define SF_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define SF_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must have ", n, " dims, got ", (t).dim())
#define SF_CHECK_DTYPE(t, dt) TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", dt, ", got ", (t).scalar_type())
#define SF_CHECK_SAME_DTYPE(t, ref) \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), #t " has dtype ", (t).scalar_type(), " but " #ref " has ", (ref).scalar_type())
#define SF_CHECK_FLOAT(t)                                                                                   \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||                          \
                  (t).scalar_type() == at::kBFloat16,                                                       \
              #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())
// Device, contiguity and rank in one line: the usual requirement of a kernel argument.
#define SF_CHECK_INPUT(t, n) \
  SF_CHECK_DEVICE(t);        \
  SF_CHECK_CONTIGUOUS(t);    \
  SF_CHECK_DIM(t, n)

// Makes `t`'s device current for the kernels launched in this scope (no-op in the harness).
#ifdef SF_SIMT
#define SF_DEVICE_GUARD(t) ((void)(t))
#else
#define SF_DEVICE_GUARD(t) const c10::cuda::CUDAGuard sf_device_guard_((t).device())
#endif

// Runs the following lambda body with scalar_t = float, __half or __nv_bfloat16 (the CUDA
// types, so kernels and the harness see the same types) for the dtype of a tensor:
//   SF_DISPATCH_FLOAT(x.scalar_type(), "window_partition", [&] { launch<scalar_t>(...); });
#define SF_DISPATCH_FLOAT(dtype, name, ...)                                                     \
  [&] {                                                                                         \
    switch (dtype) {                                                                            \
      case at::kFloat: {                                                                        \
        using scalar_t = float;                                                                 \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kHalf: {                                                                         \
        using scalar_t = __half;                                                                \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case at::kBFloat16: {                                                                     \
        using scalar_t = __nv_bfloat16;                                                         \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      default:                                                                                  \
        TORCH_CHECK(false, name ": unsupported dtype ", dtype, " (float32, float16, bfloat16)"); \
    }                                                                                           \
  }()

// Runs the following lambda, f(T{}, std::integral_constant<int, TILE>{}), for the instance of
// `dtype` with the smallest TILE >= size among those of LIST, an X-macro list X(T, scalar type,
// TILE) with tiles ascending per dtype: SF_<OP>_INSTANCES of the op's generated header
// (semask_fast/_build.py, from the op's INSTANCES in semask_fast/backends/cuda/<op>.py).  Only
// the listed instances are named, so only their (extern) launchers are referenced:
//   SF_DISPATCH_INSTANCE(SF_ATM_ATTENTION_INSTANCES, q.scalar_type(), d, "atm_attention",
//                        [&](auto tag, auto tile) { forward<decltype(tag), decltype(tile)::value>(...); });
#define SF_DISPATCH_INSTANCE(LIST, dtype, size, name, ...)                                               \
  [&] {                                                                                                 \
    const at::ScalarType sf_dtype_ = (dtype);                                                           \
    const int64_t sf_size_ = (size);                                                                    \
    auto&& sf_body_ = __VA_ARGS__;                                                                      \
    bool sf_found_ = false;                                                                             \
    LIST(SF_DISPATCH_INSTANCE_CASE_)                                                                    \
    TORCH_CHECK(sf_found_, name ": no compiled instance for dtype ", sf_dtype_, " and size ", sf_size_); \
  }()
#define SF_DISPATCH_INSTANCE_CASE_(T, scalar_type, TILE)                 \
  if (!sf_found_ && sf_dtype_ == (scalar_type) && sf_size_ <= (TILE)) { \
    sf_found_ = true;                                                    \
    sf_body_(T{}, std::integral_constant<int, (TILE)>{});                \
  }

namespace sf {

// The stream kernels of this call launch on: torch's current CUDA stream, or none in the harness.
inline cudaStream_t current_stream() {
#ifdef SF_SIMT
  return nullptr;
#else
  return at::cuda::getCurrentCUDAStream().stream();
#endif
}

// Shared memory a block may use, static plus dynamic, on CUDA device `device`: the GPU's opt-in
// limit, or in the harness the target architecture's (SF_SIMT_ARCH; `device` is ignored).
// Kernels whose need grows with the shape check it here and export the need (scalar arguments
// only, so that selection under fake tensors can ask), and Python falls back with the reason.
inline int64_t shared_memory_per_block(int64_t device) {
#ifdef SF_SIMT
  (void)device;
  return int64_t(::sf::simt::arch_limit().smem);
#else
  int bytes = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, int(device));
  TORCH_CHECK(err == cudaSuccess, "cannot read the shared memory limit of cuda:", device, ": ",
              cudaGetErrorString(err));
  return bytes;
#endif
}

// The dropout seed a kernel reads from device memory: the 0-d int64 tensor the op drew on the
// inputs' device (a CUDA-graph replay refills it, so each replay gets a fresh mask).
inline const int64_t* seed_ptr(const at::Tensor& seed, const at::Tensor& like) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed must be a one-element int64 tensor, got ", seed.scalar_type(), " with ", seed.numel(), " elements");
  TORCH_CHECK(seed.device() == like.device(), "seed must be on ", like.device(), ", got ", seed.device());
  return seed.data_ptr<int64_t>();
}

// Typed data pointer with the CUDA element type (at::Half -> __half, at::BFloat16 -> __nv_bfloat16).
template <typename T>
inline T* data_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace sf
