// Swin (shifted-)window attention, forward and backward (SPEC.md section 1).
//
//   out = dropout(softmax(scale * q k^T + bias + mask)) v     per window and head
//
// q, k, v, out: (B_, h, N, d), window index fastest inside B_.  q, k, v and dO are read in
// place with any window / head / row strides (64-bit offsets), the last dim contiguous (the timm
// drop-in passes permuted views of one fused projection); out and the gradients are written
// contiguous.
// The relative-position bias is gathered from the fp32 table with the official
// index computed in-kernel; the SW-MSA mask is either computed in-kernel from
// (grid, window, shift) with region ids (reference.shift_region_ids) or read
// from an explicit fp32 (nW, N, N) mask.  Nothing of size N x N per window is
// written to global memory: the forward keeps an online softmax over key tiles
// and saves the fp32 row logsumexp; the backward recomputes the probabilities.
//
// Layout of the work (FFMA path, fp32 accumulation for every dtype):
//   * a block is 4 warps; a query tile is BM = 16 rows, 4 rows per warp;
//   * a key tile is BN = 32 keys, one key per lane for the logits, so row
//     max / sum are warp shuffles, and P v is a shuffle-broadcast loop where a
//     lane owns head-dim columns lane, lane+32, ...;
//   * head_dim is padded to DP, the smallest head_dim tile that holds it (the INSTANCES below),
//     in shared memory (zeros).
// Backward, deterministic (no float atomics):
//   1. delta_i = rowsum(dO_i * O_i);
//   2. dK, dV: a block owns a key tile and loops over the query tiles;
//   3. dQ: a block owns a query tile of one head (tensor-core path: 64 of the
//      h * N rows of a window, heads packed) and loops over a chunk of
//      windows; it also sums dS[i, j] over the chunk's windows into its own
//      slice of a (chunks, h, N, N) fp32 buffer (the chunk's first window
//      writes every element, the others add: each element has exactly one
//      owner thread, so no clearing pass and no atomics);
//   4. table gradient: a block per (table row, head) sums the buffer's (i, j)
//      pairs with that index in a fixed order (fixed-shape tree reduction).
//   Windows of N <= 64 tokens and head_dim <= 64 (every Swin stage; fp16 / bf16 on
//   tensor cores, fp32 with FFMA) run 1., 2. and 3. as one fused kernel instead (a
//   block holds a whole (window, head): q, k, v, dO read once), which also folds dS
//   onto the table rows, so its partials are (chunks, h, table rows) and step 4 is a
//   plain sum over the chunks.
//   The result is bitwise reproducible run to run.  Only the gradients autograd needs are
//   computed: without dK, dV no dkv kernel runs (the fused kernel skips their products); without
//   dQ the dq kernels (run for the table gradient alone) and the fused kernel skip the dS K
//   product and its stores.
// Dropout: keep(element) = philox(seed, element index) >= p, with the element
// index ((b_ * h + head) * N + i) * N + j; forward and backward evaluate the
// same hash, so no mask is stored.
//
// Files: the kernels, with the score policy (scale, bias gather, shift or explicit mask), are in
// csrc/include/sf_window_attention_fwd.cuh and _bwd.cuh, built on the attention engine
// (csrc/include/sf_attention.cuh: online softmax, P V, backward recomputation); this file
// holds the launch plan and the bindings.
// Units: the launchers of each (dtype, head_dim tile) the op declares (INSTANCES in
// semask_fast/backends/cuda/window_attention.py) are compiled by a generated unit of their own
// (SF_INSTANCE_UNIT: this file without its bindings, then SF_LAUNCHERS), in parallel; the bindings
// declare them extern and dispatch over the generated list (sf_window_attention_instances.h), which
// also gives the head_dim limit (semask_fast/_build.py).

#include "sf_common.cuh"
#include "sf_window_attention_bwd.cuh"

namespace sf_window_attention {

// ---------------------------------------------------------------- launchers --
using sf::ceil_div;

template <typename T, int DP>
void forward(const Params& p, T* out, float* lse, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores.
    // Packed rows: a block's MBM rows touch at most (MBM - 1) / N + 2 segments, each with its table column.
    const int max_segments = (MBM - 1) / p.n + 2;
    const size_t smem = fwd_mma_smem_bytes_fixed<DP>() + sizeof(float) * (p.table ? max_segments * table_rows(p) : 0);
    auto kernel = window_attention_fwd_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(p.batch * p.heads * p.n, MBM))), dim3(kMmaWarps * 32), smem,
              stream, p, out, lse);
  } else {
    const size_t smem = sizeof(float) * (fwd_smem_floats_fixed<DP>() + (p.table ? table_rows(p) : 0));
    auto kernel = window_attention_fwd_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * p.heads), ceil_div(p.n, BM)), dim3(kThreads), smem, stream,
              p, out, lse);
  }
  SF_CHECK_LAUNCH();
}

// dq, or dk with dv, may be null: not wanted (autograd's needs_input_grad); a dkv kernel runs only
// for dk, dv, a dq kernel for dq or the table's partials (dsum).  fused: the caller's plan (checked
// against fused_backward_serves by backward_op).
template <typename T, int DP>
void backward(const Params& p, bool fused, const T* out, const float* lse, float* delta, T* dq, T* dk, T* dv,
              float* dsum, int64_t chunks, int64_t per_chunk, float* dtable, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.n;
  if (!fused)  // the fused kernel computes delta itself
    SF_LAUNCH(sf::attention_delta_kernel<T>, dim3(ceil_div(rows, kWarps)), dim3(kThreads), 0, stream, p.dout, out,
              delta, p.batch, p.heads, p.n, p.d);
  const size_t tsm = p.table ? table_rows(p) : 0;
  if (fused) {
    if constexpr (DP <= 64) {
      // dsum: the (chunks, h, table rows) folded partials.
      const size_t smem = fused_smem_bytes<T, DP>(p.table != nullptr, table_rows(p));
      auto kernel = window_attention_bwd_fused_kernel<T, DP>;
      SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
      SF_LAUNCH(kernel, dim3(static_cast<unsigned>(chunks), p.heads), dim3(kMmaWarps * 32), smem, stream, p, out,
                lse, dq, dk, dv, dsum, per_chunk);
      if (dtable)
        SF_LAUNCH(window_attention_table_fold_sum_kernel, dim3(ceil_div(static_cast<int64_t>(tsm) * p.heads, kThreads)),
                  dim3(kThreads), 0, stream, dsum, dtable, chunks, p.heads, table_rows(p));
    }
  } else if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores.
    // Packed keys: a block's MBM keys touch at most (MBM - 1) / N + 2 segments, each with its table column.
    const size_t smem_kv = bwd_mma_smem_bytes_fixed<DP>() + sizeof(float) * ((MBM - 1) / p.n + 2) * tsm;
    auto kv = window_attention_dkv_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(static_cast<unsigned>(ceil_div(p.batch * p.heads * p.n, MBM))), dim3(kMmaWarps * 32),
                smem_kv, stream, p, lse, delta, dk, dv);
    // Packed heads: MBM rows of a window touch at most min(h, (MBM - 1) / N + 2) heads.
    const int q_heads = (MBM - 1) / p.n + 2 < p.heads ? (MBM - 1) / p.n + 2 : p.heads;
    const size_t smem_q = bwd_mma_smem_bytes_fixed<DP>() + sizeof(float) * q_heads * tsm;
    auto qk = window_attention_dq_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq || dsum)
      SF_LAUNCH(qk, dim3(static_cast<unsigned>(chunks), ceil_div(static_cast<int64_t>(p.heads) * p.n, MBM)),
                dim3(kMmaWarps * 32), smem_q, stream, p, lse, delta, dq, dsum, per_chunk);
  } else {
    const size_t smem_kv = sizeof(float) * (sf::FfmaBwdSmem<DP, true>::kFloats + tsm);
    auto kv = window_attention_dkv_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(static_cast<unsigned>(p.batch * p.heads), ceil_div(p.n, BN)), dim3(kThreads), smem_kv, stream,
                p, lse, delta, dk, dv);
    const size_t smem_q = sizeof(float) * (sf::FfmaBwdSmem<DP, false>::kFloats + tsm);
    auto qk = dq ? window_attention_dq_kernel<T, DP, true> : window_attention_dq_kernel<T, DP, false>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq || dsum)
      SF_LAUNCH(qk, dim3(static_cast<unsigned>(chunks * p.heads), ceil_div(p.n, BM)), dim3(kThreads), smem_q, stream,
                p, lse, delta, dq, dsum, per_chunk);
  }
  if (dtable && !fused)
    SF_LAUNCH(window_attention_table_grad_kernel, dim3(table_rows(p), p.heads), dim3(kThreads), 0, stream, dsum,
              dtable, chunks, p.heads, p.n, p.wh, p.ww);
  SF_CHECK_LAUNCH();
}

}  // namespace sf_window_attention

// The launchers of one instance: `prefix` empty, their explicit instantiation (a generated unit);
// extern, their declaration (the bindings).
#define SF_LAUNCHERS(prefix, T, DP)                                                                               \
  namespace sf_window_attention {                                                                                 \
  prefix template void forward<T, DP>(const Params&, T*, float*, cudaStream_t);                                    \
  prefix template void backward<T, DP>(const Params&, bool, const T*, const float*, float*, T*, T*, T*, float*,      \
                                       int64_t, int64_t, float*, cudaStream_t);                                    \
  }

// Host code only: not in the generated units, nor in nvcc's device passes (which would parse the torch
// headers once per GPU architecture for nothing).
#if !defined(SF_INSTANCE_UNIT) && !defined(__CUDA_ARCH__)
// ----------------------------------------------------------------- bindings --
#include "sf_torch.h"
#include "sf_window_attention_instances.h"

#define SF_EXTERN_LAUNCHERS(T, scalar_type, DP) SF_LAUNCHERS(extern, T, DP)
SF_WINDOW_ATTENTION_INSTANCES(SF_EXTERN_LAUNCHERS)

#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

namespace sf_window_attention {

// f(T{}, head_dim tile) for q's dtype and the smallest tile that holds its head_dim.
template <typename F>
void dispatch(const at::Tensor& q, F&& f) {
  SF_DISPATCH_INSTANCE(SF_WINDOW_ATTENTION_INSTANCES, q.scalar_type(), q.size(3), "window_attention", f);
}

// Inputs are read in place with any strides but the last (q, k, v, dO: (B_, h, N, d)), e.g.
// permuted views of one fused projection; the host copies only a non-unit last stride.
#define SF_CHECK_ROWS(t)                                                                                      \
  SF_CHECK_DEVICE(t);                                                                                         \
  SF_CHECK_DIM(t, 4);                                                                                         \
  TORCH_CHECK((t).size(3) == 1 || (t).stride(3) == 1, "window_attention: " #t " must have a contiguous last " \
              "dim (other strides are free), got strides ", (t).strides())

inline Rows rows_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& mask, int64_t wh,
                   int64_t ww, int64_t grid_h, int64_t grid_w, int64_t shift_h, int64_t shift_w, double scale,
                   double mask_value, double dropout_p, const at::Tensor& seed) {
  SF_CHECK_ROWS(q);
  SF_CHECK_ROWS(k);
  SF_CHECK_ROWS(v);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "window_attention: k and v must have q's shape");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "window_attention: q, k, v must share a dtype");
  TORCH_CHECK(q.size(2) == wh * ww, "window_attention: N = ", q.size(2), " is not Wh*Ww = ", wh * ww);
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= SF_WINDOW_ATTENTION_MAX_HEAD_DIM, "window_attention: head_dim must be "
              "in 1..", SF_WINDOW_ATTENTION_MAX_HEAD_DIM, ", got ", q.size(3));
  Params p{};
  p.q = rows_of(q);
  p.k = rows_of(k);
  p.v = rows_of(v);
  p.batch = q.size(0);
  p.heads = static_cast<int>(q.size(1));
  p.n = static_cast<int>(q.size(2));
  p.d = static_cast<int>(q.size(3));
  p.wh = static_cast<int>(wh);
  p.ww = static_cast<int>(ww);
  p.nw = 1;
  p.nw_cols = 1;
  if (table) {
    SF_CHECK_INPUT(*table, 2);
    TORCH_CHECK(table->scalar_type() == at::kFloat, "window_attention: bias_table must be float32 here");
    TORCH_CHECK(table->size(0) == (2 * wh - 1) * (2 * ww - 1) && table->size(1) == q.size(1),
                "window_attention: bias_table must be ((2Wh-1)(2Ww-1), heads)");
    p.table = table->data_ptr<float>();
  }
  if (mask) {
    SF_CHECK_INPUT(*mask, 3);
    TORCH_CHECK(mask->scalar_type() == at::kFloat, "window_attention: mask must be float32 here");
    TORCH_CHECK(mask->size(1) == p.n && mask->size(2) == p.n && p.batch % mask->size(0) == 0,
                "window_attention: mask must be (nW, N, N) with nW dividing B_");
    TORCH_CHECK(shift_h == 0 && shift_w == 0, "window_attention: mask and shift are exclusive");
    p.mask = mask->data_ptr<float>();
    p.nw = static_cast<int>(mask->size(0));
  }
  if (shift_h || shift_w) {
    TORCH_CHECK(grid_h > 0 && grid_w > 0 && p.batch % (grid_h * grid_w) == 0,
                "window_attention: a shift needs a grid whose window count divides B_");
    p.shifted = 1;
    p.nw = static_cast<int>(grid_h * grid_w);
    p.nw_cols = static_cast<int>(grid_w);
    p.hp = static_cast<int>(grid_h * wh);
    p.wp = static_cast<int>(grid_w * ww);
    p.shift_h = static_cast<int>(shift_h);
    p.shift_w = static_cast<int>(shift_w);
  }
  p.scale = static_cast<float>(scale);
  p.mask_value = static_cast<float>(mask_value);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = sf::seed_ptr(seed, q);
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& table,
                                              const std::optional<at::Tensor>& mask, int64_t wh, int64_t ww,
                                              int64_t grid_h, int64_t grid_w, int64_t shift_h, int64_t shift_w,
                                              double scale, double mask_value, double dropout_p,
                                              const at::Tensor& seed) {
  const Params p = make_params(q, k, v, table, mask, wh, ww, grid_h, grid_w, shift_h, shift_w, scale, mask_value,
                               dropout_p, seed);
  SF_DEVICE_GUARD(q);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous whatever q's strides
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  dispatch(q, [&](auto tag, auto dp) {
    using T = decltype(tag);
    forward<T, decltype(dp)::value>(p, reinterpret_cast<T*>(out.data_ptr()), lse.data_ptr<float>(),
                                    sf::current_stream());
  });
  return {out, lse};
}

// need_dq, need_dkv, need_table: autograd's needs_input_grad; dq, dk, dv not needed are returned
// unwritten (the caller drops them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& mask, int64_t wh,
    int64_t ww, int64_t grid_h, int64_t grid_w, int64_t shift_h, int64_t shift_w, double scale, double mask_value,
    double dropout_p, const at::Tensor& seed, int64_t windows_per_chunk, bool fused, bool need_dq, bool need_dkv,
    bool need_table) {
  Params p = make_params(q, k, v, table, mask, wh, ww, grid_h, grid_w, shift_h, shift_w, scale, mask_value,
                         dropout_p, seed);
  SF_DEVICE_GUARD(q);
  SF_CHECK_ROWS(dout);
  TORCH_CHECK(windows_per_chunk >= 1, "window_attention: windows_per_chunk must be >= 1, got ", windows_per_chunk);
  SF_CHECK_INPUT(out, 4);
  SF_CHECK_INPUT(lse, 3);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "window_attention: dout/out must match q");
  SF_CHECK_SAME_DTYPE(dout, q);
  p.dout = rows_of(dout);
  // Contiguous gradients whatever the inputs' strides.
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  TORCH_CHECK(!fused || fused_backward_serves(p), "window_attention: the fused backward serves N <= ", FN,
              " tokens and head_dim <= 64, got N = ", p.n, ", head_dim = ", p.d);
  at::Tensor delta = fused ? at::Tensor() : at::empty_like(lse);  // the fused kernel keeps delta in shared memory
  // The table gradient goes through per-chunk partial sums of dS over chunks of
  // `windows_per_chunk` consecutive windows (the plan is the caller's: a function of the
  // shape, so the summation order is reproducible): (chunks, h, N, N), or (chunks, h, table
  // rows) already folded by the fused kernel.  The kernels write every element, so the
  // buffer is not cleared.
  const int64_t per_chunk = std::min(windows_per_chunk, p.batch);
  const int64_t chunks = (p.batch + per_chunk - 1) / per_chunk;
  // A table that needs no gradient (frozen) still biases the scores, but no partial is written
  // and neither reduction runs.
  const bool want_table = table && need_table;
  at::Tensor dsum, dtable;
  if (want_table) {
    if (fused)
      dsum = at::empty({chunks, p.heads, table_rows(p)}, q.options().dtype(at::kFloat));
    else
      dsum = at::empty({chunks, p.heads, p.n, p.n}, q.options().dtype(at::kFloat));
    dtable = at::empty_like(*table);
  } else {
    dtable = at::empty({0}, q.options().dtype(at::kFloat));
  }
  dispatch(q, [&](auto tag, auto dp) {
    using T = decltype(tag);
    backward<T, decltype(dp)::value>(
        p, fused, reinterpret_cast<const T*>(out.data_ptr()), lse.data_ptr<float>(),
        fused ? nullptr : delta.data_ptr<float>(),
        need_dq ? reinterpret_cast<T*>(dq.data_ptr()) : nullptr,
        need_dkv ? reinterpret_cast<T*>(dk.data_ptr()) : nullptr,
        need_dkv ? reinterpret_cast<T*>(dv.data_ptr()) : nullptr,
        want_table ? dsum.data_ptr<float>() : nullptr, chunks, per_chunk,
        want_table ? dtable.data_ptr<float>() : nullptr,
        sf::current_stream());
  });
  return {dq, dk, dv, dtable};
}

}  // namespace sf_window_attention

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("window_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? mask, int wh, int ww, "
        "int grid_h, int grid_w, int shift_h, int shift_w, float scale, float mask_value, float dropout_p, "
        "Tensor seed) -> (Tensor, Tensor)");
  m.def("window_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? bias_table, Tensor? mask, int wh, int ww, int grid_h, int grid_w, int shift_h, int shift_w, "
        "float scale, float mask_value, float dropout_p, Tensor seed, int windows_per_chunk, bool fused, bool need_dq, "
        "bool need_dkv, bool need_table) -> (Tensor, Tensor, Tensor, Tensor)");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("window_attention_forward", &sf_window_attention::forward_op);
  m.impl("window_attention_backward", &sf_window_attention::backward_op);
}

#endif  // the bindings
