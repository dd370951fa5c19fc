// SegViT ATM cross-attention, forward and backward (SPEC.md section 3).
//
//   S_h = (q_h k_h^T) * scale;  out_h = dropout(softmax(S_h)) v_h;  M = sum_h S_h / h
//
// q: (B, h, Nq, d); k, v: (B, h, Nk, d); out (B, h, Nq, d); M (B, Nq, Nk) in q's
// dtype, taken before softmax and dropout (as the official code).  q, k, v (and the
// gradients dO, dM) are read in place with any batch / head / row strides (64-bit offsets),
// the last dim contiguous; out, M and the gradients dq, dk, dv are written contiguous.
//
// Forward: block (query tile of BM = 16 rows, key range, batch item) handles EVERY head of
// that tile and range in two passes over the range (as the Triton kernel): pass 1, key tiles
// outer / heads inner, completes the head sum M of each key tile's logits (exact, written
// once) and every head's row max / sum of exponentials; pass 2, heads outer / key tiles inner,
// accumulates P v with the final statistics (no rescaling).  S is computed twice, k read twice
// in the block.  With one key range (the whole of Nk) the block writes out and the row
// logsumexp, no workspace; with several it writes per-head fp32 partials (output normalised
// over the range, range logsumexp) and a combine kernel merges the ranges in order
// (deterministic).  The range count comes from the caller (semask_fast/backends/cuda/
// atm_attention.py: plan_splits, a roofline model).
// fp16 / bf16 products (forward: S = q k^T, P v; backward: S, dP = dO v^T, P^T dO, dS^T q,
// dS k) run on tensor cores (sf_mma.cuh, fp32 accumulation); fp32 stays on FFMA.
// (B, h, Nq, Nk) never exists in memory.
// Backward (deterministic, no atomics), per head as flash attention:
//   delta_i = rowsum(dO_i * O_i);  dS = P * (f dP' - delta) + dM / h;
//   dK, dV: a block per key tile loops over query tiles; dQ: a block per
//   query tile loops over key tiles.
// Dropout: sf_dropout.cuh with element index ((b * h + head) * Nq + i) * Nk + j, evaluated in
// forward and backward.
//
// Files: the kernels, with the score policy (scale; dM / h in backward), are in
// csrc/include/sf_atm_attention_fwd.cuh and _bwd.cuh, built on the attention engine
// (csrc/include/sf_attention.cuh: online softmax, P V, backward recomputation); this file
// holds the launch plan and the bindings.
// Units: the launchers of each (dtype, head_dim tile) the op declares (INSTANCES in
// semask_fast/backends/cuda/atm_attention.py) are compiled by a generated unit of their own
// (SF_INSTANCE_UNIT: this file without its bindings, then SF_LAUNCHERS), in parallel; the bindings
// declare them extern and dispatch over the generated list (sf_atm_attention_instances.h), which
// also gives the head_dim limit (semask_fast/_build.py).

#include "sf_common.cuh"
#include "sf_atm_attention_bwd.cuh"

namespace sf_atm_attention {

// ---------------------------------------------------------------- launchers --
using sf::ceil_div;

template <typename T, int DP>
void forward(const Params& p, const FwdDest<T>& dst, T* mask_logits, cudaStream_t stream) {
  SF_CHECK(p.batch <= 65535 && p.splits <= 65535, "atm_attention: batch and split count must be at most 65535");
  const size_t smem = fwd_smem_bytes<T, DP>(p.heads);
  const dim3 grid(ceil_div(p.nq, BM), static_cast<unsigned>(p.splits), static_cast<unsigned>(p.batch));
  if constexpr (std::is_same_v<T, float>) {
    auto kernel = atm_attention_fwd_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, grid, dim3(fwd_warps<T, DP>() * 32), smem, stream, p, dst, mask_logits);
  } else {
    auto kernel = atm_attention_fwd_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, grid, dim3(fwd_warps<T, DP>() * 32), smem, stream, p, dst, mask_logits);
  }
  if (p.splits > 1) {
    const int64_t rows = p.batch * p.heads * p.nq;
    SF_LAUNCH(atm_attention_combine_kernel<T>, dim3(ceil_div(rows, kWarps)), dim3(kThreads), 0, stream, dst.part_o,
              dst.part_lse, p.splits, rows, p.d, dst.out, dst.lse);
  }
  SF_CHECK_LAUNCH();
}

template <typename T, int DP>
// dq, or dk with dv, may be null: not wanted (autograd's needs_input_grad), its kernel not launched.
void backward(const Params& p, const T* out, const T* dmask, const float* lse, float* delta, T* dq, T* dk, T* dv,
              cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.nq;
  SF_LAUNCH(sf::attention_delta_kernel<T>, dim3(ceil_div(rows, kWarps)), dim3(kThreads), 0, stream, p.dout, out, delta,
            p.batch, p.heads, p.nq, p.d);
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  if constexpr (std::is_same_v<T, float>) {
    const size_t smem_kv = sizeof(float) * sf::FfmaBwdSmem<DP, true>::kFloats;
    auto kv = atm_attention_dkv_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(bh, ceil_div(p.nk, BN)), dim3(kThreads), smem_kv, stream, p, dmask, lse, delta, dk, dv);
    const size_t smem_q = sizeof(float) * sf::FfmaBwdSmem<DP, false>::kFloats;
    auto qk = atm_attention_dq_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq) SF_LAUNCH(qk, dim3(bh, ceil_div(p.nq, BM)), dim3(kThreads), smem_q, stream, p, dmask, lse, delta, dq);
  } else {
    const size_t smem_kv = dkv_mma_smem_bytes<DP>();
    auto kv = atm_attention_dkv_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(bh, ceil_div(p.nk, MBM)), dim3(kThreads), smem_kv, stream, p, dmask, lse, delta, dk, dv);
    const size_t smem_q = dq_mma_smem_bytes<DP>();
    auto qk = atm_attention_dq_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq) SF_LAUNCH(qk, dim3(bh, ceil_div(p.nq, BM)), dim3(kThreads), smem_q, stream, p, dmask, lse, delta, dq);
  }
  SF_CHECK_LAUNCH();
}

}  // namespace sf_atm_attention

// The launchers of one instance: `prefix` empty, their explicit instantiation (a generated unit);
// extern, their declaration (the bindings).
#define SF_LAUNCHERS(prefix, T, DP)                                                                             \
  namespace sf_atm_attention {                                                                                  \
  prefix template void forward<T, DP>(const Params&, const FwdDest<T>&, T*, cudaStream_t);                       \
  prefix template void backward<T, DP>(const Params&, const T*, const T*, const float*, float*, T*, T*, T*,        \
                                       cudaStream_t);                                                            \
  }

// Host code only: not in the generated units, nor in nvcc's device passes (which would parse the torch
// headers once per GPU architecture for nothing).
#if !defined(SF_INSTANCE_UNIT) && !defined(__CUDA_ARCH__)
// ----------------------------------------------------------------- bindings --
#include "sf_torch.h"
#include "sf_atm_attention_instances.h"

#define SF_EXTERN_LAUNCHERS(T, scalar_type, DP) SF_LAUNCHERS(extern, T, DP)
SF_ATM_ATTENTION_INSTANCES(SF_EXTERN_LAUNCHERS)

#include <ATen/ops/empty_like.h>

#include <tuple>
#include <type_traits>

namespace sf_atm_attention {

// f(T{}, head_dim tile) for the dtype and the smallest tile that holds head_dim d.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t d, F&& f) {
  SF_DISPATCH_INSTANCE(SF_ATM_ATTENTION_INSTANCES, dtype, d, "atm_attention", f);
}

// [bytes of shared memory a forward block needs for the dtype, head_dim and heads (every head's
// row statistics, the warps' tiles), bytes CUDA device `device` gives a block]: the one owner of
// this limit (Python falls back with the reason where the need exceeds the device's).
std::vector<int64_t> shared_memory(at::ScalarType dtype, int64_t head_dim, int64_t heads, int64_t device) {
  TORCH_CHECK(head_dim >= 1 && head_dim <= SF_ATM_ATTENTION_MAX_HEAD_DIM && heads >= 1, "atm_attention: head_dim must "
              "be in 1..", SF_ATM_ATTENTION_MAX_HEAD_DIM, " and heads >= 1, got ", head_dim, " and ", heads);
  int64_t need = 0;
  dispatch(dtype, head_dim,
           [&](auto tag, auto dp) { need = fwd_smem_bytes<decltype(tag), decltype(dp)::value>(heads); });
  return {need, sf::shared_memory_per_block(device)};
}

// Inputs are read in place with any strides but the last (q, k, v, dO: (B, h, n, d); dM: (B, Nq,
// Nk)), e.g. permuted views of one fused projection; the host copies only a non-unit last stride.
#define SF_CHECK_ROWS(t, n)                                                                                        \
  SF_CHECK_DEVICE(t);                                                                                              \
  SF_CHECK_DIM(t, n);                                                                                              \
  TORCH_CHECK((t).size((n) - 1) == 1 || (t).stride((n) - 1) == 1, "atm_attention: " #t " must have a contiguous " \
              "last dim (other strides are free), got strides ", (t).strides())

inline Rows rows_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// stage_tile's 16-byte chunks need whole chunks per row and 16-byte aligned rows: the base and
// every stride of a dim with more than one index a 16-byte multiple (a view with a storage
// offset, or a slice of odd width, may not be).
inline bool chunk_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim)
    if (t.size(dim) > 1 && (t.stride(dim) * t.element_size()) % 16 != 0) return false;
  return true;
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double dropout_p,
                   const at::Tensor& seed) {
  SF_CHECK_ROWS(q, 4);
  SF_CHECK_ROWS(k, 4);
  SF_CHECK_ROWS(v, 4);
  SF_CHECK_FLOAT(q);
  SF_CHECK_SAME_DTYPE(k, q);
  SF_CHECK_SAME_DTYPE(v, q);
  TORCH_CHECK(v.sizes() == k.sizes(), "atm_attention: v must have k's shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "atm_attention: k must be (B, h, Nk, d) matching q");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= SF_ATM_ATTENTION_MAX_HEAD_DIM, "atm_attention: head_dim must be in 1..",
              SF_ATM_ATTENTION_MAX_HEAD_DIM, ", got ", q.size(3));
  Params p{};
  p.q = rows_of(q);
  p.k = rows_of(k);
  p.v = rows_of(v);
  p.batch = q.size(0);
  p.heads = static_cast<int>(q.size(1));
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.d = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;
  p.inv_heads = 1.f / static_cast<float>(p.heads);
  p.seed = sf::seed_ptr(seed, q);
  p.vec = (q.size(3) * q.element_size()) % 16 == 0 && chunk_aligned(q) && chunk_aligned(k) && chunk_aligned(v);
  return p;
}

// `splits` key ranges of ceil(tiles / splits) key tiles each; the caller picks a count that
// leaves no range empty (semask_fast/backends/cuda/atm_attention.py: plan_splits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, double dropout_p,
                                                          const at::Tensor& seed, int64_t splits) {
  Params p = make_params(q, k, v, scale, dropout_p, seed);
  const int64_t tiles = sf::ceil_div(p.nk, BN);
  TORCH_CHECK(splits >= 1 && splits <= tiles, "atm_attention: splits must be in 1..", tiles, ", got ", splits);
  const int64_t per_split = sf::ceil_div(tiles, splits);
  TORCH_CHECK(sf::ceil_div(tiles, per_split) == splits, "atm_attention: ", splits, " splits of ", tiles,
              " key tiles leave a split empty");
  p.splits = static_cast<int>(splits);
  p.split_keys = static_cast<int>(per_split * BN);
  SF_DEVICE_GUARD(q);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous whatever q's strides
  at::Tensor mask_logits = at::empty({q.size(0), q.size(2), k.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  at::Tensor part_o, part_lse;
  if (splits > 1) {
    const int64_t rows = q.size(0) * q.size(1) * q.size(2);
    part_o = at::empty({splits, rows, q.size(3)}, lse.options());
    part_lse = at::empty({splits, rows}, lse.options());
  }
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dp) {
    using T = decltype(tag);
    const FwdDest<T> dst{sf::data_ptr<T>(out), lse.data_ptr<float>(),
                         splits > 1 ? part_o.data_ptr<float>() : nullptr,
                         splits > 1 ? part_lse.data_ptr<float>() : nullptr};
    forward<T, decltype(dp)::value>(p, dst, sf::data_ptr<T>(mask_logits), sf::current_stream());
  });
  return {out, mask_logits, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& dmask,
                                                           const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& out,
                                                           const at::Tensor& lse, double scale, double dropout_p,
                                                           const at::Tensor& seed, bool need_dq, bool need_dkv) {
  Params p = make_params(q, k, v, scale, dropout_p, seed);
  SF_DEVICE_GUARD(q);
  SF_CHECK_ROWS(dout, 4);
  SF_CHECK_ROWS(dmask, 3);
  SF_CHECK_INPUT(out, 4);
  SF_CHECK_INPUT(lse, 3);
  SF_CHECK_SAME_DTYPE(dout, q);
  SF_CHECK_SAME_DTYPE(dmask, q);
  SF_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "atm_attention: dout/out must match q");
  TORCH_CHECK(dmask.size(0) == q.size(0) && dmask.size(1) == q.size(2) && dmask.size(2) == k.size(2),
              "atm_attention: dmask must be (B, Nq, Nk)");
  p.dout = rows_of(dout);
  p.dmask_b = dmask.stride(0);
  p.dmask_r = dmask.stride(1);
  p.vec = p.vec && chunk_aligned(dout);
  // Contiguous gradients whatever the inputs' strides.
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty_like(lse);
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dp) {
    using T = decltype(tag);
    // Gradients autograd does not need are returned unwritten (the caller drops them).
    backward<T, decltype(dp)::value>(p, sf::data_ptr<T>(out), sf::data_ptr<T>(dmask), lse.data_ptr<float>(),
                                     delta.data_ptr<float>(), need_dq ? sf::data_ptr<T>(dq) : nullptr,
                                     need_dkv ? sf::data_ptr<T>(dk) : nullptr, need_dkv ? sf::data_ptr<T>(dv) : nullptr,
                                     sf::current_stream());
  });
  return {dq, dk, dv};
}

}  // namespace sf_atm_attention

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("atm_attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, Tensor seed, int splits) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("atm_attention_backward(Tensor dout, Tensor dmask_logits, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale, float dropout_p, Tensor seed, bool need_dq, bool need_dkv) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("atm_attention_shared_memory(ScalarType dtype, int head_dim, int heads, int device) -> int[]",
        &sf_atm_attention::shared_memory);
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("atm_attention_forward", &sf_atm_attention::forward_op);
  m.impl("atm_attention_backward", &sf_atm_attention::backward_op);
}

#endif  // the bindings
