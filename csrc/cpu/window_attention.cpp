// Swin (shifted-)window attention on the CPU, forward and backward (SPEC.md section 1):
//   out = dropout(softmax(scale q k^T + bias[rel(i, j)] + mask)) v   per (window, head).
// One engine, two ways to reach the tokens:
//   window mode  (window_attention): q, k, v (B_, h, N, d) with any strides but a unit last one
//                (timm's permuted views of one qkv tensor are read in place);
//   image mode   (shifted_window_attention, zero-copy): the (B, H, W, 3 h d) qkv image; a window
//                token is a pixel found by the pad / roll arithmetic of window_process, or a pad
//                token, which carries qkv_bias; the output goes straight to the (B, H, W, h d) image.
// A task is one (window, head).  Its tiles live in per-thread scratch, in fp32 (fp64 for double):
//   S^T (N x Np, keys as rows, queries in vector lanes) = K (Q scale)^T, so the row max and sum of
//   the softmax are plain vector operations down the rows, then O = P V with P read as
//   broadcast scalars.  Np = N rounded up to the vector width; padded query lanes hold zero q.
// The bias is gathered once per call into (h, N, Np) from the table; the shift mask is computed
// from the tokens' region ids (0 inside a region, mask_value across); an explicit (nW, N, N) mask
// is transposed once per call.  Forward saves the row logsumexp (fp32; fp64 for double); backward
// recomputes P per task (nothing N x N per window reaches memory) and takes
//   dV = P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(P dP)),  dQ = scale dS K,  dK = dS^T (scale Q)
// (rowsum(P dP) = rowsum(dO O), from the tiles: O itself, maybe rounded to a half type, is not read).
// Table gradient: the windows are split into chunks fixed by the shape (not by the thread count);
// a task (chunk, head) sums dS over its windows, folds the sum onto the table rows, and the chunks'
// partials are added in chunk order: bitwise reproducible for any torch.set_num_threads.  The
// zero-copy qkv_bias gradient (what reaches pad tokens) is reduced the same way.
// Dropout: keep(element) = philox(seed, ((b_ h + head) N + i) N + j) >= p, as on the GPU.
// The kernels are in window_attention_kernels.h; this file holds the ops' bindings.
#include "window_attention_kernels.h"

// ---------------------------------------------------------------- bindings --
namespace {

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_small(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& ref) {
  if (!t) return;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t->scalar_type() == acc_type(ref), name, " must be ", acc_type(ref), " (the compute type), got ",
              t->scalar_type());
}

template <typename T>
Logits<T> make_logits(const Problem& p, const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& mask) {
  return Logits<T>(p, int(round_up(p.n, kLanes<T>)), table ? table->data_ptr<T>() : nullptr,
                   mask ? mask->data_ptr<T>() : nullptr);
}

// The bias table's shape check and the scalars, shared by both modes once the geometry is set.
void set_logit_terms(Problem& p, const std::optional<at::Tensor>& table, double scale, double mask_value,
                     double dropout_p, int64_t seed) {
  if (table) {
    TORCH_CHECK(table->dim() == 2 && table->size(0) == p.table_rows() && table->size(1) == p.heads,
                "bias_table must be (", p.table_rows(), ", ", p.heads, "), got ", table->sizes());
  }
  p.scale = scale;
  p.mask_value = mask_value;
  p.dropout_p = dropout_p;
  p.seed = uint64_t(seed);
}

Problem window_problem(const at::Tensor& q, const std::optional<at::Tensor>& table,
                       const std::optional<at::Tensor>& mask, int64_t wh, int64_t ww, int64_t grid_h, int64_t grid_w,
                       int64_t shift_h, int64_t shift_w, double scale, double mask_value, double dropout_p,
                       int64_t seed) {
  Problem p;
  p.batch = q.size(0);
  p.heads = int(q.size(1));
  p.n = int(q.size(2));
  p.d = int(q.size(3));
  p.wh = int(wh);
  p.ww = int(ww);
  TORCH_CHECK(p.n == p.wh * p.ww, "q has N=", p.n, " tokens, expected window ", wh, "x", ww);
  p.grid_h = int(grid_h);
  p.grid_w = int(grid_w);
  p.shift_h = int(shift_h);
  p.shift_w = int(shift_w);
  TORCH_CHECK(!(mask && grid_h > 0), "pass either an explicit mask or a shift geometry, not both");
  if (grid_h > 0) TORCH_CHECK(p.batch % (grid_h * grid_w) == 0, "the grid does not divide the windows");
  p.mask_windows = mask ? int(mask->size(0)) : 0;
  if (mask) {
    TORCH_CHECK(mask->dim() == 3 && mask->size(1) == p.n && mask->size(2) == p.n && p.batch % mask->size(0) == 0,
                "mask must be (nW, N, N) with nW dividing the windows, got ", mask->sizes());
  }
  set_logit_terms(p, table, scale, mask_value, dropout_p, seed);
  return p;
}

template <typename S>
WindowTokens<S> window_tokens(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, S* out) {
  WindowTokens<S> w;
  w.q = reinterpret_cast<const S*>(q.data_ptr());
  w.k = reinterpret_cast<const S*>(k.data_ptr());
  w.v = reinterpret_cast<const S*>(v.data_ptr());
  for (int i = 0; i < 3; ++i) {
    w.qs[i] = q.stride(i);
    w.ks[i] = k.stride(i);
    w.vs[i] = v.stride(i);
  }
  w.out = out;
  w.n = int(q.size(2));
  w.d = int(q.size(3));
  w.heads = int(q.size(1));
  return w;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  SF_CPU_CHECK_INPUT(q, 4);
  SF_CPU_CHECK_INPUT(k, 4);
  SF_CPU_CHECK_INPUT(v, 4);
  SF_CPU_CHECK_SAME_DTYPE(k, q);
  SF_CPU_CHECK_SAME_DTYPE(v, q);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k and v must have one shape");
  SF_CPU_CHECK_CONTIGUOUS_LAST_DIM(q);
  SF_CPU_CHECK_CONTIGUOUS_LAST_DIM(k);
  SF_CPU_CHECK_CONTIGUOUS_LAST_DIM(v);
}

std::tuple<at::Tensor, at::Tensor> window_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& table,
                                                            const std::optional<at::Tensor>& mask, int64_t wh,
                                                            int64_t ww, int64_t grid_h, int64_t grid_w,
                                                            int64_t shift_h, int64_t shift_w, double scale,
                                                            double mask_value, double dropout_p, int64_t seed) {
  check_qkv(q, k, v);
  check_small(table, "bias_table", q);
  check_small(mask, "mask", q);
  const Problem p = window_problem(q, table, mask, wh, ww, grid_h, grid_w, shift_h, shift_w, scale, mask_value,
                                   dropout_p, seed);
  at::Tensor out = pooled_empty({p.batch, p.heads, p.n, p.d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({p.batch, p.heads, p.n}, q.options().dtype(acc_type(q)));
  SF_CPU_DISPATCH(q.scalar_type(), "window_attention", [&] {
    using T = acc_t<scalar_t>;
    const auto lg = make_logits<T>(p, table, mask);
    forward<scalar_t>(p, window_tokens<scalar_t>(q, k, v, reinterpret_cast<scalar_t*>(out.data_ptr())), lg,
                      lse.data_ptr<T>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> window_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& mask, int64_t wh,
    int64_t ww, int64_t grid_h, int64_t grid_w, int64_t shift_h, int64_t shift_w, double scale, double mask_value,
    double dropout_p, int64_t seed, bool need_dq, bool need_dkv, bool need_table) {
  check_qkv(q, k, v);
  check_small(table, "bias_table", q);
  check_small(mask, "mask", q);
  SF_CPU_CHECK_INPUT(dout, 4);
  SF_CPU_CHECK_CONTIGUOUS(dout);
  SF_CPU_CHECK_CONTIGUOUS(lse);
  SF_CPU_CHECK_SAME_DTYPE(dout, q);
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have q's shape");
  TORCH_CHECK(lse.scalar_type() == acc_type(q), "lse must be ", acc_type(q));
  const Problem p = window_problem(q, table, mask, wh, ww, grid_h, grid_w, shift_h, shift_w, scale, mask_value,
                                   dropout_p, seed);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  // Gradients not needed are left unwritten (never touched: their pages are never faulted in).
  at::Tensor dq = pooled_empty(q.sizes(), opts), dk = pooled_empty(q.sizes(), opts), dv = pooled_empty(q.sizes(), opts);
  std::optional<at::Tensor> dtable;
  const bool want_table = table && need_table;
  SF_CPU_DISPATCH(q.scalar_type(), "window_attention", [&] {
    using T = acc_t<scalar_t>;
    const auto lg = make_logits<T>(p, table, mask);
    const int64_t chunks = (p.batch + windows_per_chunk(p.batch, p.heads) - 1) / windows_per_chunk(p.batch, p.heads);
    at::Tensor partials;
    if (want_table) partials = at::empty({chunks, p.heads, p.table_rows()}, lse.options());
    WindowGrads<scalar_t> grads{reinterpret_cast<scalar_t*>(dq.data_ptr()), reinterpret_cast<scalar_t*>(dk.data_ptr()),
                                reinterpret_cast<scalar_t*>(dv.data_ptr()),
                                reinterpret_cast<const scalar_t*>(dout.data_ptr()), p.n, p.d, p.heads};
    backward<scalar_t>(p, window_tokens<scalar_t>(q, k, v, nullptr), grads, lg, lse.data_ptr<T>(),
                       Needs{need_dq, need_dkv}, want_table ? partials.data_ptr<T>() : nullptr, nullptr);
    if (want_table) {
      // partials (chunks, h, rows) -> (rows, h)
      at::Tensor sum = at::empty({p.heads, p.table_rows()}, lse.options());
      sum_chunks(partials.data_ptr<T>(), chunks, int64_t(p.heads) * p.table_rows(), sum.data_ptr<T>());
      dtable = sum.t().contiguous();
    }
  });
  return {dq, dk, dv, dtable};
}

// ------------------------------------------------------------ image mode --
// shift_h, shift_w: the op's shifts (the mask's), not the geometry's roll (timm's is mod the image).
Problem image_problem(int64_t B, const sf::WindowGeometry& g, int64_t heads, int64_t d,
                      const std::optional<at::Tensor>& table, int64_t shift_h, int64_t shift_w, double scale,
                      double mask_value, double dropout_p, int64_t seed) {
  Problem p;
  p.batch = B * g.nW;
  p.heads = int(heads);
  p.n = g.Wh * g.Ww;
  p.d = int(d);
  p.wh = g.Wh;
  p.ww = g.Ww;
  const bool shifted = shift_h > 0 || shift_w > 0;
  p.grid_h = shifted ? g.Hp / g.Wh : 0;
  p.grid_w = shifted ? g.nWw : 0;
  p.shift_h = int(shift_h);
  p.shift_w = int(shift_w);
  p.mask_windows = 0;
  set_logit_terms(p, table, scale, mask_value, dropout_p, seed);
  return p;
}

std::tuple<at::Tensor, at::Tensor> shifted_window_attention_forward(
    const at::Tensor& qkv, const std::optional<at::Tensor>& table, const at::Tensor& pad_row, int64_t heads,
    int64_t wh, int64_t ww, int64_t shift_h, int64_t shift_w, bool pad_then_roll, double scale, double mask_value,
    double dropout_p, int64_t seed) {
  SF_CPU_CHECK_INPUT(qkv, 4);
  SF_CPU_CHECK_CONTIGUOUS(qkv);
  SF_CPU_CHECK_CONTIGUOUS(pad_row);
  SF_CPU_CHECK_SAME_DTYPE(pad_row, qkv);
  check_small(table, "bias_table", qkv);
  TORCH_CHECK(qkv.size(3) % (3 * heads) == 0, "qkv's last dim must be 3 * heads * head_dim");
  TORCH_CHECK(pad_row.numel() == qkv.size(3), "pad_row must have qkv's channel count");
  const int64_t d = qkv.size(3) / (3 * heads);
  const sf::WindowGeometry g =
      window_geometry("shifted_window_attention", qkv.size(1), qkv.size(2), wh, ww, shift_h, shift_w, pad_then_roll);
  const Problem p =
      image_problem(qkv.size(0), g, heads, d, table, shift_h, shift_w, scale, mask_value, dropout_p, seed);
  at::Tensor out = pooled_empty({qkv.size(0), qkv.size(1), qkv.size(2), heads * d}, qkv.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.n}, qkv.options().dtype(acc_type(qkv)));
  SF_CPU_DISPATCH(qkv.scalar_type(), "shifted_window_attention", [&] {
    using T = acc_t<scalar_t>;
    const auto lg = make_logits<T>(p, table, std::nullopt);
    ImageTokens<scalar_t> tokens{reinterpret_cast<const scalar_t*>(qkv.data_ptr()),
                                 reinterpret_cast<const scalar_t*>(pad_row.data_ptr()),
                                 reinterpret_cast<scalar_t*>(out.data_ptr()), g, int(heads), int(d)};
    forward<scalar_t>(p, tokens, lg, lse.data_ptr<T>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> shifted_window_attention_backward(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& lse, const std::optional<at::Tensor>& table,
    const at::Tensor& pad_row, int64_t heads, int64_t wh, int64_t ww,
    int64_t shift_h, int64_t shift_w, bool pad_then_roll, double scale, double mask_value, double dropout_p,
    int64_t seed, bool need_table, bool need_dpad) {
  SF_CPU_CHECK_INPUT(qkv, 4);
  for (const at::Tensor* t : {&dout, &qkv, &lse, &pad_row}) TORCH_CHECK(t->is_contiguous(), "inputs must be contiguous");
  SF_CPU_CHECK_SAME_DTYPE(dout, qkv);
  SF_CPU_CHECK_SAME_DTYPE(pad_row, qkv);
  check_small(table, "bias_table", qkv);
  const int64_t d = qkv.size(3) / (3 * heads);
  const sf::WindowGeometry g =
      window_geometry("shifted_window_attention", qkv.size(1), qkv.size(2), wh, ww, shift_h, shift_w, pad_then_roll);
  const Problem p =
      image_problem(qkv.size(0), g, heads, d, table, shift_h, shift_w, scale, mask_value, dropout_p, seed);
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == qkv.size(0) && dout.size(1) == qkv.size(1) &&
                  dout.size(2) == qkv.size(2) && dout.size(3) == heads * d,
              "dout must be (B, H, W, h d)");
  TORCH_CHECK(lse.numel() == p.batch * p.heads * p.n, "lse must have one value per window row");
  at::Tensor dqkv = pooled_empty(qkv.sizes(), qkv.options());
  std::optional<at::Tensor> dtable, dpad;
  const bool want_table = table && need_table;
  SF_CPU_DISPATCH(qkv.scalar_type(), "shifted_window_attention", [&] {
    using T = acc_t<scalar_t>;
    const auto lg = make_logits<T>(p, table, std::nullopt);
    const int64_t per_chunk = windows_per_chunk(p.batch, p.heads);
    const int64_t chunks = (p.batch + per_chunk - 1) / per_chunk;
    at::Tensor table_partials, pad_partials;
    if (want_table) table_partials = at::empty({chunks, p.heads, p.table_rows()}, lse.options());
    if (need_dpad) pad_partials = at::empty({chunks, 3 * heads * d}, lse.options());
    ImageTokens<scalar_t> tokens{reinterpret_cast<const scalar_t*>(qkv.data_ptr()),
                                 reinterpret_cast<const scalar_t*>(pad_row.data_ptr()), nullptr, g, int(heads),
                                 int(d)};
    const at::Tensor zeros = at::zeros({d}, qkv.options());
    ImageGrads<scalar_t> grads{reinterpret_cast<scalar_t*>(dqkv.data_ptr()),
                               reinterpret_cast<const scalar_t*>(dout.data_ptr()),
                               reinterpret_cast<const scalar_t*>(zeros.data_ptr()), g, int(heads), int(d)};
    backward<scalar_t>(p, tokens, grads, lg, lse.data_ptr<T>(), Needs{},
                       want_table ? table_partials.data_ptr<T>() : nullptr,
                       need_dpad ? pad_partials.data_ptr<T>() : nullptr);
    if (want_table) {
      at::Tensor sum = at::empty({p.heads, p.table_rows()}, lse.options());
      sum_chunks(table_partials.data_ptr<T>(), chunks, int64_t(p.heads) * p.table_rows(), sum.data_ptr<T>());
      dtable = sum.t().contiguous();
    }
    if (need_dpad) {
      dpad = at::empty({3 * heads * d}, lse.options());
      sum_chunks(pad_partials.data_ptr<T>(), chunks, 3 * heads * d, dpad->data_ptr<T>());
    }
  });
  return {dqkv, dtable, dpad};
}

}  // namespace

SF_CPU_LIBRARY(m) {
  m.def("window_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? mask, int wh, int ww, "
        "int grid_h, int grid_w, int shift_h, int shift_w, float scale, float mask_value, float dropout_p, "
        "int seed) -> (Tensor, Tensor)");
  m.def("window_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, "
        "Tensor? table, Tensor? mask, int wh, int ww, int grid_h, int grid_w, int shift_h, int shift_w, "
        "float scale, float mask_value, float dropout_p, int seed, bool need_dq, bool need_dkv, bool need_table) "
        "-> (Tensor, Tensor, Tensor, Tensor?)");
  m.def("shifted_window_attention_forward(Tensor qkv, Tensor? table, Tensor pad_row, int heads, int wh, int ww, "
        "int shift_h, int shift_w, bool pad_then_roll, float scale, float mask_value, float dropout_p, int seed) "
        "-> (Tensor, Tensor)");
  m.def("shifted_window_attention_backward(Tensor dout, Tensor qkv, Tensor lse, Tensor? table, "
        "Tensor pad_row, int heads, int wh, int ww, int shift_h, int shift_w, bool pad_then_roll, float scale, "
        "float mask_value, float dropout_p, int seed, bool need_table, bool need_dpad) -> (Tensor, Tensor?, Tensor?)");
}

SF_CPU_LIBRARY_IMPL(m) {
  m.impl("window_attention_forward", &window_attention_forward);
  m.impl("window_attention_backward", &window_attention_backward);
  m.impl("shifted_window_attention_forward", &shifted_window_attention_forward);
  m.impl("shifted_window_attention_backward", &shifted_window_attention_backward);
}
