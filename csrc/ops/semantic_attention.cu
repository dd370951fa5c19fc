// SeMask semantic attention, forward and backward (SPEC.md section 2).
//
//   out = softmax(Sq Sk^T) Yv      (one head, no scale)
//
// sq, sk: (B_, N, K) with K the number of classes (the inner dimension of the
// logits, 150 on ADE20K, 19 on Cityscapes); yv, out: (B_, N, C), C up to 1536.
//
// fp16 / bf16 run every product, forward and backward, on tensor cores (the
// "tensor cores" sections below); fp32 runs the FFMA path, so it stays exact.
// Layout of the FFMA path (fp32 accumulation):
//   * query tiles of BM = 16 rows (4 per warp), key tiles of BN = 32 keys (one
//     per lane) so row max / sum are warp shuffles;
//   * the class dimension K is staged whole in shared memory, padded to
//     KP = 32 * ceil(K / 32) with zeros (a lane owns K-columns lane + 32u);
//   * C is tiled over blocks: a forward block owns CT = 32 * CPL output columns
//     and recomputes the (cheap, K-deep) logits of its query tile.
// Forward keeps an online softmax over key tiles and saves the fp32 row
// logsumexp; N x N never reaches global memory.  Backward (deterministic, no
// atomics), one launch of two kinds of blocks: dSq per query tile, and dYv per
// (key tile, C tile of dYv); the key tile's block of C tile 0 also computes dSk,
// taking its dYv tile's dO chunks from those it stages for dP.  The blocks computing
// dP = dO Yv^T (over C in chunks of CC columns) compute delta_i = rowsum(dO_i * O_i)
// of the query rows they use, so no block depends on another and Sq, Sk, Yv, dO are
// read by a single kernel for all three gradients.  Only the gradients autograd needs
// are computed: the grid holds dSq blocks only for dSq, the dYv blocks of C tiles past
// the first only for dYv; without dSk no block computes dP for the keys, without dYv
// the key blocks store no dYv (the tensor-core ones do not accumulate it either).
//
// Files: the kernels, with the score policy (the K-inner products as they are), are in
// csrc/include/sf_semantic_attention_fwd.cuh and _bwd.cuh, built on the attention engine
// (csrc/include/sf_attention.cuh: online softmax, P V, backward recomputation); this file
// holds the launch plan and the bindings.
// Units: the backward launcher of each (dtype, class tile KP) the op declares (INSTANCES in
// semask_fast/backends/cuda/semantic_attention.py) is compiled by a generated unit of its own
// (SF_INSTANCE_UNIT: this file without its bindings, then SF_LAUNCHERS), in parallel; the unit of
// the bindings compiles the forward (forward_any_columns, a few small kernels), declares the backward
// launchers extern and dispatches over the generated list (sf_semantic_attention_instances.h), which
// also gives the class limit (semask_fast/_build.py).

#include "sf_common.cuh"
#include "sf_semantic_attention_bwd.cuh"

namespace sf_semantic_attention {

// ---------------------------------------------------------------- launchers --
using sf::ceil_div;

template <typename T, int CPL>
void forward(const Params& p, T* out, float* lse, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores, C tiles of 64 or 128 columns.
    auto launch = [&](auto kernel, int ct) {
      const size_t smem = fwd_mma_smem_bytes(p.k, ct);
      SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
      SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * ceil_div(p.c, ct)), ceil_div(p.n, MBM)), dim3(kMmaWarps * 32),
                smem, stream, p, out, lse);
    };
    if (p.c > 64) launch(semantic_attention_fwd_mma_kernel<T, 16>, 128);
    else launch(semantic_attention_fwd_mma_kernel<T, 8>, 64);
  } else {
    const size_t smem = sizeof(float) * fwd_smem_floats(p.kp, 32 * CPL);
    auto kernel = semantic_attention_fwd_kernel<T, CPL>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * ceil_div(p.c, 32 * CPL)), ceil_div(p.n, BM)), dim3(kThreads),
              smem, stream, p, out, lse);
  }
  SF_CHECK_LAUNCH();
}

// The backward in one launch (dSq blocks and dSk / dYv blocks side by side).  dsq, dsk or dyv may
// be null: not wanted (autograd's needs_input_grad), the blocks serving only it not launched.
template <typename T, int KPL>
void backward(const Params& p, const T* out, const T* dout, const float* lse, T* dsq, T* dsk, T* dyv,
              cudaStream_t stream) {
  if (!dsq && !dsk && !dyv) return;  // an empty grid is no launch
  if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores, the accumulators cover KT = kp = 32 * KPL columns.
    const size_t smem = dqk_mma_smem_bytes(p.kp);
    auto kernel = semantic_attention_bwd_mma_kernel<T, 32 * KPL>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * mma_bwd_slots(p.c, dsq, dsk, dyv)), ceil_div(p.n, MBM)),
              dim3(kMmaWarps * 32), smem, stream, p, out, dout, lse, dsq, dsk, dyv);
  } else {
    const size_t smem = sizeof(float) * dk_smem_floats(p.kp);
    auto kernel = semantic_attention_bwd_kernel<T, KPL>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * bwd_blocks_per_entry(p.n, p.c, dsq, dsk, dyv))),
              dim3(kThreads), smem, stream, p, out, dout, lse, dsq, dsk, dyv);
  }
  SF_CHECK_LAUNCH();
}

template <int I, typename F>
void with_int(int value, F&& f) {
  // value in 1..I: calls f(std::integral_constant<int, value>).
  if constexpr (I >= 1) {
    if (value == I) return f(std::integral_constant<int, I>{});
    with_int<I - 1>(value, f);
  }
}

// Output columns per lane: C tiles of up to 128 columns.
inline int cols_per_lane(int c) { return c >= 128 ? 4 : (c + 31) / 32; }

// The forward of a dtype, its C tile chosen from C: compiled by the bindings' unit, instantiated here
// for every dtype, outside the bindings' host-only section (nvcc's device passes must see the
// kernels it launches).
template <typename T>
void forward_any_columns(const Params& p, T* out, float* lse, cudaStream_t stream) {
  with_int<4>(cols_per_lane(p.c), [&](auto cpl) { forward<T, decltype(cpl)::value>(p, out, lse, stream); });
}

#ifndef SF_INSTANCE_UNIT
template void forward_any_columns<float>(const Params&, float*, float*, cudaStream_t);
template void forward_any_columns<__half>(const Params&, __half*, float*, cudaStream_t);
template void forward_any_columns<__nv_bfloat16>(const Params&, __nv_bfloat16*, float*, cudaStream_t);
#endif

}  // namespace sf_semantic_attention

// The backward launcher of one instance (KP = 32 * KPL classes): `prefix` empty, its explicit
// instantiation (a generated unit); extern, its declaration (the bindings).
#define SF_LAUNCHERS(prefix, T, KP)                                                                        \
  namespace sf_semantic_attention {                                                                        \
  static_assert((KP) % 32 == 0, "class tiles are multiples of 32");                                        \
  prefix template void backward<T, (KP) / 32>(const Params&, const T*, const T*, const float*, T*, T*, T*, \
                                              cudaStream_t);                                               \
  }

// Host code only: not in the generated units, nor in nvcc's device passes (which would parse the torch
// headers once per GPU architecture for nothing).
#if !defined(SF_INSTANCE_UNIT) && !defined(__CUDA_ARCH__)
// ----------------------------------------------------------------- bindings --
#include "sf_torch.h"
#include "sf_semantic_attention_instances.h"

#define SF_EXTERN_LAUNCHERS(T, scalar_type, KP) SF_LAUNCHERS(extern, T, KP)
SF_SEMANTIC_ATTENTION_INSTANCES(SF_EXTERN_LAUNCHERS)

#include <tuple>
#include <type_traits>

namespace sf_semantic_attention {

// sq, sk, yv may be strided in the batch and row dims (column views of one fused projection);
// their rows must be contiguous.
#define SF_CHECK_ROWS(t)       \
  SF_CHECK_DEVICE(t);          \
  SF_CHECK_DIM(t, 3);          \
  TORCH_CHECK((t).size(2) == 1 || (t).stride(2) == 1, "semantic_attention: " #t " must have a contiguous last dim " \
              "(batch and row strides are free), got strides ", (t).strides())

Params make_params(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& yv) {
  SF_CHECK_ROWS(sq);
  SF_CHECK_ROWS(sk);
  SF_CHECK_ROWS(yv);
  SF_CHECK_FLOAT(sq);
  SF_CHECK_SAME_DTYPE(sk, sq);
  SF_CHECK_SAME_DTYPE(yv, sq);
  TORCH_CHECK(sk.sizes() == sq.sizes(), "semantic_attention: sk must have sq's shape");
  TORCH_CHECK(yv.size(0) == sq.size(0) && yv.size(1) == sq.size(1), "semantic_attention: yv must be (B_, N, C)");
  TORCH_CHECK(sq.size(2) >= 1 && sq.size(2) <= SF_SEMANTIC_ATTENTION_MAX_CLASSES, "semantic_attention: K must be "
              "in 1..", SF_SEMANTIC_ATTENTION_MAX_CLASSES, ", got ", sq.size(2));
  Params p{};
  p.sq = sq.data_ptr();
  p.sk = sk.data_ptr();
  p.yv = yv.data_ptr();
  p.batch = sq.size(0);
  p.n = static_cast<int>(sq.size(1));
  p.k = static_cast<int>(sq.size(2));
  p.c = static_cast<int>(yv.size(2));
  p.kp = (p.k + 31) / 32 * 32;
  p.sq_b = sq.stride(0);
  p.sq_r = sq.stride(1);
  p.sk_b = sk.stride(0);
  p.sk_r = sk.stride(1);
  p.yv_b = yv.stride(0);
  p.yv_r = yv.stride(1);
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& yv) {
  const Params p = make_params(sq, sk, yv);
  SF_DEVICE_GUARD(sq);
  at::Tensor out = at::empty(yv.sizes(), yv.options());  // contiguous whatever yv's strides
  at::Tensor lse = at::empty({sq.size(0), sq.size(1)}, sq.options().dtype(at::kFloat));
  SF_DISPATCH_FLOAT(sq.scalar_type(), "semantic_attention", [&] {
    forward_any_columns<scalar_t>(p, sf::data_ptr<scalar_t>(out), lse.data_ptr<float>(), sf::current_stream());
  });
  return {out, lse};
}

// need_dsq, need_dsk, need_dyv: autograd's needs_input_grad; a gradient not needed is returned
// unwritten (the caller drops it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& sq,
                                                           const at::Tensor& sk, const at::Tensor& yv,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           bool need_dsq, bool need_dsk, bool need_dyv) {
  const Params p = make_params(sq, sk, yv);
  SF_DEVICE_GUARD(sq);
  SF_CHECK_INPUT(dout, 3);
  SF_CHECK_INPUT(out, 3);
  SF_CHECK_INPUT(lse, 2);
  SF_CHECK_SAME_DTYPE(dout, sq);
  SF_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK(dout.sizes() == yv.sizes() && out.sizes() == yv.sizes(), "semantic_attention: dout/out must match yv");
  // Contiguous gradients whatever the inputs' strides (the kernels write rows of k / c elements).
  at::Tensor dsq = at::empty(sq.sizes(), sq.options()), dsk = at::empty(sk.sizes(), sk.options());
  at::Tensor dyv = at::empty(yv.sizes(), yv.options());
  // The class tile: K padded to KP = 32 * ceil(K / 32), the smallest tile of the list.
  SF_DISPATCH_INSTANCE(SF_SEMANTIC_ATTENTION_INSTANCES, sq.scalar_type(), p.kp, "semantic_attention",
                       [&](auto tag, auto kp) {
    using T = decltype(tag);
    TORCH_CHECK(decltype(kp)::value == p.kp, "semantic_attention: no class tile of ", p.kp, " (a gap in the list)");
    backward<T, decltype(kp)::value / 32>(p, sf::data_ptr<T>(out), sf::data_ptr<T>(dout), lse.data_ptr<float>(),
                                          need_dsq ? sf::data_ptr<T>(dsq) : nullptr,
                                          need_dsk ? sf::data_ptr<T>(dsk) : nullptr,
                                          need_dyv ? sf::data_ptr<T>(dyv) : nullptr, sf::current_stream());
  });
  return {dsq, dsk, dyv};
}

}  // namespace sf_semantic_attention

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("semantic_attention_forward(Tensor sq, Tensor sk, Tensor yv) -> (Tensor, Tensor)");
  m.def("semantic_attention_backward(Tensor dout, Tensor sq, Tensor sk, Tensor yv, Tensor out, Tensor lse, "
        "bool need_dsq=True, bool need_dsk=True, bool need_dyv=True) -> (Tensor, Tensor, Tensor)");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("semantic_attention_forward", &sf_semantic_attention::forward_op);
  m.impl("semantic_attention_backward", &sf_semantic_attention::backward_op);
}

#endif  // the bindings
