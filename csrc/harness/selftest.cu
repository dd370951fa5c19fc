// Kernels that exercise the SIMT harness itself (tests/harness/test_simt.py); harness build only.
// Each is a small CUDA kernel whose right answer is known, plus deliberately broken variants the
// harness must catch.
#include "sf_common.cuh"
#include "sf_mma.cuh"

#include <thread>

namespace {

// out = x reversed within each block of blockDim.x elements, through shared memory.  With
// sync == false the barrier between the write and the read is missing.
__global__ void reverse_kernel(const float* __restrict__ x, float* __restrict__ out, bool sync) {
  SF_STATIC_SHARED(float, tile, 1024);
  const int t = threadIdx.x, n = blockDim.x;
  const int64_t base = int64_t(blockIdx.x) * n;
  tile[t] = x[base + t];
  if (sync) __syncthreads();
  out[base + t] = tile[n - 1 - t];
}

// Same through dynamic shared memory; `write` false reads memory nobody wrote (poisoned: NaN).
__global__ void reverse_dynamic_kernel(const float* __restrict__ x, float* __restrict__ out, bool sync, bool write) {
  SF_DYNAMIC_SHARED(float, tile);
  const int t = threadIdx.x, n = blockDim.x;
  const int64_t base = int64_t(blockIdx.x) * n;
  if (write) tile[t] = x[base + t];
  if (sync) __syncthreads();
  out[base + t] = tile[n - 1 - t];
}

// Per thread: 8 results of warp primitives on v = x[global thread].
__global__ void warp_ops_kernel(const int* __restrict__ x, int* __restrict__ out, int width) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int v = x[i];
  int* o = out + i * 8;
  o[0] = __shfl_xor_sync(0xFFFFFFFFu, v, 5, width);
  o[1] = __shfl_sync(0xFFFFFFFFu, v, 3, width);
  o[2] = __shfl_down_sync(0xFFFFFFFFu, v, 2, width);
  o[3] = __shfl_up_sync(0xFFFFFFFFu, v, 3, width);
  o[4] = int(__ballot_sync(0xFFFFFFFFu, v > 0));
  o[5] = __any_sync(0xFFFFFFFFu, v > 10);
  o[6] = __all_sync(0xFFFFFFFFu, v > -10);
  // Butterfly sum over the whole warp: every lane gets the total.
  int s = v;
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, m);
  o[7] = s;
}

// Sum of each block's elements: warp shuffles, then the per-warp partials through shared memory.
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  SF_STATIC_SHARED(float, partial, 32);
  const int t = threadIdx.x;
  float s = 0.f;
  for (int j = t; j < n; j += blockDim.x) s += x[int64_t(blockIdx.x) * n + j];
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, m);
  if ((t & 31) == 0) partial[t >> 5] = s;
  __syncthreads();
  if (t < 32) {
    s = t < int(blockDim.x >> 5) ? partial[t] : 0.f;
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, m);
    if (t == 0) out[blockIdx.x] = s;
  }
}

// out[i] += x[i], reps times: a non-atomic read-modify-write of global memory (the trace flavour
// must count the store as well as the load).
__global__ void accumulate_kernel(const float* __restrict__ x, float* __restrict__ out, int n, int reps) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  for (int r = 0; r < reps; ++r) out[i] += x[i];
}

// Every thread of every block adds into the same counters.
__global__ void atomics_kernel(float* f, double* d, int* i, unsigned long long* u) {
  atomicAdd(f, 1.0f);
  atomicAdd(d, 0.5);
  atomicAdd(i, 2);
  atomicAdd(u, 3ull);
}

// Thread 0 returns before the barrier the other threads wait at.
__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Records which host thread ran each block.
__global__ void host_thread_kernel(int64_t* out) {
  __syncthreads();  // some work per block, so that every host thread gets blocks
  if (threadIdx.x == 0) out[blockIdx.x] = int64_t(std::hash<std::thread::id>()(std::this_thread::get_id()) >> 1);
}

// One warp: a running maximum kept in shared memory (as a flash-attention row statistic).  Every
// lane reads it, the warp reduces with shuffles, lane 0 writes the new value.  Without `fence`
// (a __syncwarp before the write) the other lanes' reads are ordered before lane 0's write only
// by the shuffles: a race on the GPU, which the instrumented build must report.
__global__ void running_max_kernel(const float* __restrict__ x, float* __restrict__ out, bool fence) {
  SF_STATIC_SHARED(float, m, 1);
  const int lane = threadIdx.x;
  if (lane == 0) m[0] = x[0];
  __syncwarp();
  float v = fmaxf(m[0], x[lane]);
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  if (fence) __syncwarp();
  if (lane == 0) m[0] = v;
  __syncwarp();
  out[lane] = m[0];
}

// 16 KiB of static and `dynamic` bytes of dynamic shared memory, every byte written and read back.
__global__ void shared_memory_kernel(float* __restrict__ out, int dynamic) {
  SF_STATIC_SHARED(float, fixed, 4096);
  SF_DYNAMIC_SHARED(float, extra);
  const int t = threadIdx.x, n = dynamic / 4;
  for (int i = t; i < 4096; i += blockDim.x) fixed[i] = float(i);
  for (int i = t; i < n; i += blockDim.x) extra[i] = float(i);
  __syncthreads();
  float s = 0.f;
  for (int i = t; i < 4096; i += blockDim.x) s += fixed[i];
  for (int i = t; i < n; i += blockDim.x) s += extra[i];
  out[t] = s;
}

// One warp: d = A B (load_a_frag, load_b_frag), dt = A^T B' (load_a_frag_t, load_b_frag_t), and
// e = [A B | A B2] B3: the two accumulators re-used as the A operand (acc_to_a_frag).
// a: 16x16 row-major, b: 8x16 (n-major, B[k][n] = b[n*16+k]), bt: 16x8 k-major, b2 like b,
// b3: 16x8 k-major.  Outputs fp32: d (16x8), dt (16x8), e (16x8).
template <typename T>
__global__ void mma_kernel(const T* a, const T* b, const T* bt, const T* b2, const T* b3, float* d, float* dt,
                           float* e) {
  SF_STATIC_SHARED(T, sa, 16 * 16);
  SF_STATIC_SHARED(T, sb, 8 * 16);
  SF_STATIC_SHARED(T, sbt, 16 * 8);
  SF_STATIC_SHARED(T, sb2, 8 * 16);
  SF_STATIC_SHARED(T, sb3, 16 * 8);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) sa[i] = a[i];
  for (int i = lane; i < 128; i += 32) sb[i] = b[i], sbt[i] = bt[i], sb2[i] = b2[i], sb3[i] = b3[i];
  __syncthreads();
  uint32_t fa[4], fat[4], fb[2], fbt[2], fb2[2], fb3[2];
  sf::load_a_frag(fa, sa, 16, lane);
  sf::load_a_frag_t(fat, sa, 16, lane);
  sf::load_b_frag(fb, sb, 16, lane);
  sf::load_b_frag_t(fbt, sbt, 8, lane);
  sf::load_b_frag(fb2, sb2, 16, lane);
  sf::load_b_frag_t(fb3, sb3, 8, lane);
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  float c[4], ct[4], c2[4], ce[4];
  sf::mma_m16n8k16_f32<T>(c, fa, fb, zero);
  sf::mma_m16n8k16_f32<T>(ct, fat, fbt, zero);
  sf::mma_m16n8k16_f32<T>(c2, fa, fb2, zero);
  uint32_t fp[4];
  sf::acc_to_a_frag<T>(fp, c, c2);
  sf::mma_m16n8k16_f32<T>(ce, fp, fb3, zero);
  for (int i = 0; i < 4; ++i) {
    const int r = sf::acc_row(lane, i), col = sf::acc_col(lane, i);
    d[r * 8 + col] = c[i];
    dt[r * 8 + col] = ct[i];
    e[r * 8 + col] = ce[i];
  }
}

// Deliberate memory errors the asan build must report (tests/harness/test_asan.py); the other
// builds never run them.  fault 0: reads one float past the end of x; 1: writes one float past the
// launch's dynamic shared memory; 2: loads a float2 from an address aligned to 4 bytes only.
__global__ void fault_kernel(const float* __restrict__ x, float* __restrict__ out, int n, int fault) {
  SF_DYNAMIC_SHARED(float, tile);
  const int t = threadIdx.x;
  if (fault == 1) tile[n] = 0.f;
  float v = t < n ? x[t] : 0.f;
  if (fault == 0 && t == 0) v = x[n];
  if (fault == 2 && t == 0) {
    const float2 pair = *reinterpret_cast<const float2*>(x + 1);
    v = pair.x + pair.y;
  }
  if (t < n) out[t] = v;
}

}  // namespace

#include "sf_torch.h"

namespace {

at::Tensor reverse(const at::Tensor& x, int64_t block, bool sync, bool dynamic, bool write) {
  SF_CHECK_INPUT(x, 1);
  SF_CHECK_DTYPE(x, at::kFloat);
  TORCH_CHECK(block >= 1 && block <= 1024 && x.numel() % block == 0, "block must divide x.numel()");
  at::Tensor out = at::empty_like(x);
  const int grid = int(x.numel() / block);
  if (dynamic) {
    SF_LAUNCH(reverse_dynamic_kernel, grid, int(block), block * sizeof(float), nullptr, x.data_ptr<float>(),
              out.data_ptr<float>(), sync, write);
  } else {
    SF_LAUNCH(reverse_kernel, grid, int(block), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>(), sync);
  }
  return out;
}

at::Tensor warp_ops(const at::Tensor& x, int64_t block, int64_t width) {
  SF_CHECK_INPUT(x, 1);
  SF_CHECK_DTYPE(x, at::kInt);
  TORCH_CHECK(x.numel() % block == 0, "block must divide x.numel()");
  at::Tensor out = at::empty({x.numel(), 8}, x.options());
  SF_LAUNCH(warp_ops_kernel, int(x.numel() / block), int(block), 0, nullptr, x.data_ptr<int>(),
            out.data_ptr<int>(), int(width));
  return out;
}

at::Tensor block_sum(const at::Tensor& x, int64_t threads) {
  SF_CHECK_INPUT(x, 2);
  SF_CHECK_DTYPE(x, at::kFloat);
  at::Tensor out = at::empty({x.size(0)}, x.options());
  SF_LAUNCH(block_sum_kernel, int(x.size(0)), int(threads), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>(),
            int(x.size(1)));
  return out;
}

at::Tensor accumulate(const at::Tensor& x, int64_t reps) {
  SF_CHECK_INPUT(x, 1);
  SF_CHECK_DTYPE(x, at::kFloat);
  at::Tensor out = at::zeros({x.size(0)}, x.options());
  const int n = int(x.size(0));
  SF_LAUNCH(accumulate_kernel, (n + 63) / 64, 64, 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>(), n, int(reps));
  return out;
}

std::vector<at::Tensor> atomics(int64_t blocks, int64_t threads) {
  auto opts = at::TensorOptions().device(at::kCPU);
  at::Tensor f = at::zeros({1}, opts.dtype(at::kFloat)), d = at::zeros({1}, opts.dtype(at::kDouble));
  at::Tensor i = at::zeros({1}, opts.dtype(at::kInt)), u = at::zeros({1}, opts.dtype(at::kLong));
  SF_LAUNCH(atomics_kernel, int(blocks), int(threads), 0, nullptr, f.data_ptr<float>(), d.data_ptr<double>(),
            i.data_ptr<int>(), reinterpret_cast<unsigned long long*>(u.data_ptr<int64_t>()));
  return {f, d, i, u};
}

at::Tensor early_exit(int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::TensorOptions().dtype(at::kFloat));
  SF_LAUNCH(early_exit_kernel, 1, int(threads), 0, nullptr, out.data_ptr<float>());
  return out;
}

at::Tensor host_threads(int64_t blocks) {
  at::Tensor out = at::zeros({blocks}, at::TensorOptions().dtype(at::kLong));
  SF_LAUNCH(host_thread_kernel, int(blocks), 256, 0, nullptr, out.data_ptr<int64_t>());
  return out;
}

at::Tensor running_max(const at::Tensor& x, bool fence) {
  SF_CHECK_INPUT(x, 1);
  SF_CHECK_DTYPE(x, at::kFloat);
  TORCH_CHECK(x.numel() == 32, "running_max: x must have 32 elements");
  at::Tensor out = at::empty_like(x);
  SF_LAUNCH(running_max_kernel, 1, 32, 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>(), fence);
  return out;
}

at::Tensor fault(const at::Tensor& x, int64_t which) {
  SF_CHECK_INPUT(x, 1);
  SF_CHECK_DTYPE(x, at::kFloat);
  TORCH_CHECK(x.numel() >= 3 && x.numel() <= 1024 && x.storage_offset() == 0 && x.storage().nbytes() == x.nbytes(),
              "fault: x must be 3..1024 floats, its whole storage");
  at::Tensor out = at::empty_like(x);
  const int n = int(x.numel());
  SF_LAUNCH(fault_kernel, 1, n, n * sizeof(float), nullptr, x.data_ptr<float>(), out.data_ptr<float>(), n, int(which));
  return out;
}

// Per thread of one 128-thread block, the sum of its share of 0..4095 and 0..dynamic/4-1.
at::Tensor shared_memory(const at::Tensor& like, int64_t dynamic) {
  at::Tensor out = at::empty({128}, like.options().dtype(at::kFloat));
  SF_LAUNCH(shared_memory_kernel, 1, 128, dynamic, nullptr, out.data_ptr<float>(), int(dynamic));
  return out;
}

std::vector<at::Tensor> mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bt, const at::Tensor& b2,
                            const at::Tensor& b3) {
  for (const at::Tensor* t : {&a, &b, &bt, &b2, &b3}) {
    SF_CHECK_CONTIGUOUS(*t);
    SF_CHECK_SAME_DTYPE(*t, a);
    TORCH_CHECK(t->numel() == (t == &a ? 256 : 128), "mma: wrong operand size");
  }
  auto opts = a.options().dtype(at::kFloat);
  at::Tensor d = at::empty({16, 8}, opts), dt = at::empty({16, 8}, opts), e = at::empty({16, 8}, opts);
  TORCH_CHECK(a.scalar_type() != at::kFloat, "mma: fp16 or bf16 operands");
  SF_DISPATCH_FLOAT(a.scalar_type(), "mma", [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      SF_LAUNCH(mma_kernel<scalar_t>, 1, 32, 0, nullptr, sf::data_ptr<scalar_t>(a), sf::data_ptr<scalar_t>(b),
                sf::data_ptr<scalar_t>(bt), sf::data_ptr<scalar_t>(b2), sf::data_ptr<scalar_t>(b3),
                d.data_ptr<float>(), dt.data_ptr<float>(), e.data_ptr<float>());
    }
  });
  return {d, dt, e};
}

}  // namespace

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("selftest_reverse(Tensor x, int block, bool sync, bool dynamic, bool write=True) -> Tensor");
  m.def("selftest_warp_ops(Tensor x, int block, int width) -> Tensor");
  m.def("selftest_block_sum(Tensor x, int threads) -> Tensor");
  m.def("selftest_accumulate(Tensor x, int reps) -> Tensor");
  m.def("selftest_atomics(int blocks, int threads) -> Tensor[]");
  m.def("selftest_early_exit(int threads) -> Tensor");
  m.def("selftest_host_threads(int blocks) -> Tensor");
  m.def("selftest_running_max(Tensor x, bool fence) -> Tensor");
  m.def("selftest_shared_memory(Tensor like, int dynamic) -> Tensor");
  m.def("selftest_mma(Tensor a, Tensor b, Tensor bt, Tensor b2, Tensor b3) -> Tensor[]");
  m.def("selftest_fault(Tensor x, int fault) -> Tensor");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("selftest_reverse", &reverse);
  m.impl("selftest_warp_ops", &warp_ops);
  m.impl("selftest_block_sum", &block_sum);
  m.impl("selftest_accumulate", &accumulate);
  m.impl("selftest_mma", &mma);
  m.impl("selftest_running_max", &running_max);
  m.impl("selftest_shared_memory", &shared_memory);
  m.impl("selftest_fault", &fault);
}

// Ops without tensor inputs have no dispatch key to select an implementation by.
SF_TORCH_LIBRARY_IMPL_(SF_TORCH_NS, CompositeExplicitAutograd, m) {
  m.impl("selftest_atomics", &atomics);
  m.impl("selftest_early_exit", &early_exit);
  m.impl("selftest_host_threads", &host_threads);
}
