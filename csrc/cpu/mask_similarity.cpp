// mask_similarity on the CPU: Segmenter's masks S = (P / |P|) (C / |C|)^T, optionally LayerNorm
// over the K classes (`mask_norm`), forward and backward (SPEC.md section 4,
// reference.mask_similarity).  P: (B, Np, D) patches, C: (B, K, D) classes, out: (B, Np, K).  No
// epsilon in the norms, as the official code.
//
// The three products run through panel_product: register blocks of kPanel (6) rows broadcast
// from A times kStripVecs vectors (64 fp32 columns on AVX-512) of a contiguous B operand whose
// depth block stays in L1.  Operands are laid out so that no dimension of the Segmenter shapes is
// padded to whole vectors: the forward computes S^T = C^ P^T (classes in packed panels of 6, K =
// 150 = 25 panels; patches in lanes), dP = G C and dC = G^T P (D in lanes).  One core (Xeon,
// AVX-512), B=8, Np=1024, K=150, D=768: the packed forward product runs at ~218 GFLOP/s, MKL's
// bmm (P C^T) at ~189, the former product with classes in lanes (padded to 160) at ~160.  MKL
// (at::bmm) is not used: slower here, and its G^T P differs in the last bits between 1 and 2
// threads (it splits the Np reduction); these kernels are bitwise the same for any
// torch.set_num_threads (every sum has one order; the thread count only changes the split).
//
// Forward, a task per batch (or per part of its chunks when B < threads): the classes packed in
// panels scaled by 1 / |C_k|; per chunk of kChunk patches and depth block, the patches transposed
// into L1 (their squared norms summed on the way), S^T accumulated in a K x kChunk tile while the
// next chunk is prefetched from DRAM; then S^T scaled by 1 / |P_n|, transposed back to rows, the
// LayerNorm per row and the stores.  The cosines S (in the compute type; the output itself when
// there is no LayerNorm and the output is fp32 / fp64) and both inverse norms are kept for
// backward, which then runs no forward product.
//
// Backward, with G = rp dS rc (rp, rc the inverse norms, dS the gradient of the cosines):
//   dP = rp (dS C^) - P rp^2 rowdot,   rowdot_n = sum_k dS_nk S_nk   (C^ = C rc)
//   dC = rc (dS^T P^) - C rc^2 coldot, coldot_k = sum_n dS_nk S_nk   (P^ = P rp)
// i.e. dP = G C - ..., dC = G^T P - ..., products on the raw P and C.  One pass, a task per batch
// (and group of D strips when B < threads): per block of kChunk rows, dS through the LayerNorm,
// G, rowdot, the block's column sums (coldot, dw, db); the block's dP rows (G's rows broadcast in
// place, C packed in strips); dC += G^T P (G^T packed in panels of classes, P's rows of the block,
// in L2, packed a strip at a time).  So P comes from DRAM once, with the next block's rows
// prefetched during this block's products.  Blocks run in order within a task: dC's sum over the
// patches and coldot's over the blocks have one order; dw and db add the blocks' partials in
// order after the pass.

#include "sf_cpu.h"
#include "sf_cpu_matrix.h"

namespace {

using sf::cpu::acc_t;
using sf::cpu::kLanes;
using sf::cpu::Vec;

constexpr int kPanel = 6;                                  // rows of a register block
constexpr int kStripVecs = SF_CPU_ACC_REGS / kPanel;       // its vectors: 4 on AVX-512, 2 otherwise
template <typename T>
constexpr int kStrip = kStripVecs * kLanes<T>;             // its columns (64 fp32 on AVX-512)
constexpr int kChunk = 64;                                 // patches per forward / phase-1 task
constexpr int kDepth = 128;                                // depth block: the B panel stays in L1

template <typename T>
int64_t padded(int64_t n) {
  return sf::cpu::round_up(n, kLanes<T>);
}

// c (panels * kPanel rows x vecs vectors, row stride ldc) = [c +] A B over `depth`: A's rows in
// panels of kPanel, a[p * a_panel + r * a_rs + d * a_ks] (packed panels: a_rs = 1, a_ks = kPanel);
// B rows of vectors, b[d * ldb + v * L].  The B columns of one register block stay in L1 while
// the panels stream past them.  next: the next task's prefetches, issued one per depth step.
template <typename T>
void panel_product(int panels, int vecs, int depth, const T* a, int64_t a_panel, int64_t a_rs, int64_t a_ks,
                   const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate, sf::cpu::NextTaskPrefetch* next) {
  using Fn = sf::cpu::BlockProductFn<T>;
  static constexpr auto kernels = []<int... V>(std::integer_sequence<int, V...>) {
    return std::array<Fn, 2 * sizeof...(V)>{&sf::cpu::block_product<T, kPanel, V + 1, true>...,
                                            &sf::cpu::block_product<T, kPanel, V + 1, false>...};
  }(std::make_integer_sequence<int, kStripVecs>{});
  constexpr int L = kLanes<T>;
  for (int v0 = 0; v0 < vecs; v0 += kStripVecs) {
    const Fn kernel = kernels[(a_rs == 1 ? 0 : kStripVecs) + std::min(kStripVecs, vecs - v0) - 1];
    for (int p = 0; p < panels; ++p) {
      T* cp = c + int64_t(p) * kPanel * ldc + v0 * L;
      kernel(depth, a + p * a_panel, a_rs, a_ks, b + v0 * L, ldb, cp, ldc, accumulate ? cp : nullptr, next, nullptr);
    }
  }
}

// sum_i x[i] y[i] over n elements (vectors into four independent sums, as one chain would wait on
// each FMA's latency; then the tail in order).
template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L)
    for (int u = 0; u < 4; ++u) acc[u] += sf::cpu::vload(x + i + u * L) * sf::cpu::vload(y + i + u * L);
  for (; i + L <= n; i += L) acc[0] += sf::cpu::vload(x + i) * sf::cpu::vload(y + i);
  T s = sf::cpu::hsum<T>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// Sum of a padded row (n a multiple of the lanes).
template <typename T>
T vsum(const T* x, int64_t n) {
  Vec<T> acc{};
  for (int64_t i = 0; i < n; i += kLanes<T>) acc += sf::cpu::vload(x + i);
  return sf::cpu::hsum<T>(acc);
}

// 1 / |row| of n values (converted to the compute type through `buf` when stored narrower).
template <typename S, typename T>
T inverse_norm(const S* row, int64_t n, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    return T(1) / std::sqrt(dot(row, row, n));
  } else {
    sf::cpu::load_row(buf, row, n);
    return T(1) / std::sqrt(dot(buf, buf, n));
  }
}

// dst[c * ld + r] = src[r * lds + c] for r < rows, c < cols, zero for rows <= r < round_up(rows,
// L); and sq[r] += sum_c src[r * lds + c]^2 (the squared norms, patches in lanes, in a fixed order:
// four partial sums of every fourth column of each vector block).  Whole vectors of columns are
// transposed in registers (sf::cpu::transpose's interleaving, without its scale), the tail one by
// one.
template <typename T>
void transpose_squares(const T* src, int64_t lds, int rows, int cols, T* dst, int64_t ld, T* sq) {
  constexpr int L = kLanes<T>;
  constexpr auto seq = std::make_index_sequence<L>{};
  using sf::cpu::vload;
  const int whole = cols / L * L;
  for (int r0 = 0; r0 < rows; r0 += L) {
    const int nr = std::min(L, rows - r0);
    Vec<T> acc[4] = {};
    for (int c0 = 0; c0 < whole; c0 += L) {
      Vec<T> x[L], t[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) x[i] = i < nr ? vload(src + (r0 + i) * lds + c0) : Vec<T>{};
#pragma GCC unroll 4
      for (int round = 1; round < L; round *= 2) {
#pragma GCC unroll 8
        for (int k = 0; k < L / 2; ++k) {
          t[2 * k] = sf::cpu::interleave_lo<T>(x[k], x[k + L / 2], seq);
          t[2 * k + 1] = sf::cpu::interleave_hi<T>(x[k], x[k + L / 2], seq);
        }
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) x[i] = t[i];
      }
#pragma GCC unroll 16
      for (int c = 0; c < L; ++c) {
        sf::cpu::vstore(dst + (c0 + c) * ld + r0, x[c]);
        acc[c % 4] += x[c] * x[c];
      }
    }
    T* sqb = sq + r0;
    sf::cpu::vstore(sqb, vload(sqb) + ((acc[0] + acc[1]) + (acc[2] + acc[3])));
    for (int c = whole; c < cols; ++c) {
      for (int i = 0; i < nr; ++i) {
        const T x = src[(r0 + i) * lds + c];
        dst[c * ld + r0 + i] = x;
        sqb[i] += x * x;
      }
      std::fill(dst + c * ld + r0 + nr, dst + c * ld + r0 + L, T(0));
    }
  }
}

// An optional LayerNorm parameter (K,) in the compute type, padded to Kpad; all `absent` when it
// is not given (1 for the gain, 0 for the shift).
template <typename T>
std::vector<T> padded_param(const std::optional<at::Tensor>& t, int64_t K, int64_t Kpad, T absent, const char* name) {
  std::vector<T> v(size_t(Kpad), absent);
  if (!t.has_value()) return v;
  const at::ScalarType want = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(t->scalar_type() == want, name, " must be ", want, " for these inputs, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == K && t->is_contiguous(), name, " must be a contiguous (", K,
              ",) tensor, got ", t->sizes());
  std::copy_n(t->data_ptr<T>(), K, v.data());
  return v;
}

// LayerNorm statistics of a row of K scores stored in Kpad with zeros after K.  Leaves the row's
// padding at the mean, so that (s - mean) is zero there.
template <typename T>
void layer_norm_stats(T* row, int64_t K, int64_t Kpad, T eps, T& mean, T& rstd) {
  mean = vsum(row, Kpad) / T(K);
  for (int64_t k = K; k < Kpad; ++k) row[k] = mean;
  const Vec<T> m = sf::cpu::vsplat<T>(mean);
  Vec<T> acc{};
  for (int64_t k = 0; k < Kpad; k += kLanes<T>) {
    const Vec<T> d = sf::cpu::vload(row + k) - m;
    acc += d * d;
  }
  rstd = T(1) / std::sqrt(sf::cpu::hsum<T>(acc) / T(K) + eps);
}

// dst[i] = tile[i] - src[i] * f over n values (src in the storage type S), rounded to S.  Rows
// that start on a vector boundary go out with non-temporal stores: these gradients are written
// once, and a plain store would first read every line of them from memory.
template <typename S, typename T>
void store_difference(S* __restrict__ dst, const T* __restrict__ tile, const S* __restrict__ src, T f, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<S, T>) {
    if (reinterpret_cast<uintptr_t>(dst) % SF_CPU_VEC_BYTES == 0) {
      const Vec<T> fv = sf::cpu::vsplat<T>(f);
      for (; i + kLanes<T> <= n; i += kLanes<T>)
        sf::cpu::stream_vec(dst + i, sf::cpu::vload(tile + i) - sf::cpu::vload(src + i) * fv);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<S>(tile[i] - static_cast<T>(src[i]) * f);
}

// rows x cols of src (row stride lds, storage type) -> dst (row stride ld, compute type), columns
// from cols to round_up(cols, L) zero.
template <typename S, typename T>
void pack_rows(T* __restrict__ dst, int64_t ld, const S* __restrict__ src, int64_t lds, int64_t rows, int64_t cols) {
  const int64_t cols_zeroed = padded<T>(cols);
  for (int64_t r = 0; r < rows; ++r) {
    sf::cpu::load_row(dst + r * ld, src + r * lds, cols);
    std::fill(dst + r * ld + cols, dst + r * ld + cols_zeroed, T(0));
  }
}

void check_inputs(const at::Tensor& P, const at::Tensor& C) {
  SF_CPU_CHECK_INPUT(P, 3);
  SF_CPU_CHECK_INPUT(C, 3);
  SF_CPU_CHECK_CONTIGUOUS(P);
  SF_CPU_CHECK_CONTIGUOUS(C);
  SF_CPU_CHECK_SAME_DTYPE(C, P);
  TORCH_CHECK(C.size(0) == P.size(0) && C.size(2) == P.size(2), "classes must have shape (B, K, D) = (", P.size(0),
              ", K, ", P.size(2), ") to match patches, got ", C.sizes());
  TORCH_CHECK(P.size(1) < (int64_t(1) << 31) && C.size(1) < (int64_t(1) << 31) && P.size(2) < (int64_t(1) << 31),
              "Np, K and D must each be < 2^31");
}

// Tasks per batch: enough for every thread (B of them may be fewer than the threads), at most
// `most`.  Only the split of the work changes with the thread count, never the order of a sum.
int64_t parts_per_batch(int64_t B, int64_t most) {
  return std::clamp<int64_t>((at::get_num_threads() + B - 1) / B, 1, std::max<int64_t>(most, 1));
}

// C[b] rc in panels of kPanel classes: ct[panel][d][j] = C[b][panel * kPanel + j][d] rc_j, zero
// for classes past K; rc (K) gets the inverse norms.
template <typename S, typename T>
void pack_class_panels(T* ct, T* rc, const S* c, int64_t K, int64_t D, T* buf) {
  const int panels = int((K + kPanel - 1) / kPanel);
  for (int pn = 0; pn < panels; ++pn) {
    const int64_t k0 = int64_t(pn) * kPanel;
    const int n = int(std::min<int64_t>(kPanel, K - k0));
    const S* rows = c + k0 * D;
    T r[kPanel] = {};
    for (int j = 0; j < n; ++j) r[j] = rc[k0 + j] = inverse_norm(rows + j * D, D, buf);
    T* dst = ct + pn * D * kPanel;
    for (int64_t d = 0; d < D; ++d)
      for (int j = 0; j < kPanel; ++j) dst[d * kPanel + j] = j < n ? static_cast<T>(rows[j * D + d]) * r[j] : T(0);
  }
}

// Forward.  Returns (out, scores, rinv_p, rinv_c): scores (B, Np, K) in the compute type, or an
// empty tensor when out holds them (no LayerNorm and out in the compute type); rinv_p (B, Np) and
// rinv_c (B, K) the inverse norms, in the compute type.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& P, const at::Tensor& C,
                                                                        const std::optional<at::Tensor>& weight,
                                                                        const std::optional<at::Tensor>& bias,
                                                                        bool norm, double eps) {
  using T = acc_t<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, T>;
  constexpr int L = kLanes<T>;
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2), Kpad = padded<T>(K);
  const int panels = int((K + kPanel - 1) / kPanel);
  TORCH_CHECK(norm || !(weight.has_value() || bias.has_value()), "norm_weight / norm_bias given but norm=False");
  // The LayerNorm's affine map y = shat * gain + shift.
  const std::vector<T> gain = padded_param<T>(weight, K, Kpad, T(1), "norm_weight");
  const std::vector<T> shift = padded_param<T>(bias, K, Kpad, T(0), "norm_bias");
  const auto acc_options = P.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor out = sf::cpu::pooled_empty({B, Np, K}, P.options());
  const bool scores_in_out = kSameType && !norm;
  at::Tensor scores = scores_in_out ? at::empty({0}, acc_options) : sf::cpu::pooled_empty({B, Np, K}, acc_options);
  at::Tensor rinv_p = at::empty({B, Np}, acc_options), rinv_c = at::empty({B, K}, acc_options);
  if (out.numel() == 0) return {out, scores, rinv_p, rinv_c};
  const scalar_t* p = P.data_ptr<scalar_t>();
  const scalar_t* c = C.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  T* s_all = scores_in_out ? nullptr : scores.data_ptr<T>();
  T* rp_all = rinv_p.data_ptr<T>();
  T* rc_all = rinv_c.data_ptr<T>();

  // A task: a batch's chunks in groups (every task packs its batch's classes, thread-local).
  const int64_t chunks = (Np + kChunk - 1) / kChunk;
  const int64_t parts = parts_per_batch(B, chunks), part_chunks = (chunks + parts - 1) / parts;
  const int64_t panel_size = D * kPanel;
  sf::cpu::parallel_for(B * parts, 1, [&](int64_t t0, int64_t t1) {
    T* ct = sf::cpu::scratch<T>(0, size_t(panels * panel_size));      // the classes, packed
    T* pt = sf::cpu::scratch<T>(1, size_t(kDepth * kChunk));          // a depth block of patches, transposed
    T* st = sf::cpu::scratch<T>(2, size_t(panels * kPanel * kChunk)); // S^T of the chunk
    T* tile = sf::cpu::scratch<T>(3, size_t(L * Kpad));               // L rows of S, padded
    T* buf = sf::cpu::scratch<T>(4, size_t(std::max<int64_t>(D, kChunk * kDepth)));  // fp32 staging
    T* rc_other = sf::cpu::scratch<T>(5, size_t(K));  // a batch's rc from its other tasks: not stored
    alignas(64) T rp[kChunk];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / parts, first = (t % parts) * part_chunks, last = std::min(chunks, first + part_chunks);
      pack_class_panels(ct, t % parts == 0 ? rc_all + b * K : rc_other, c + b * K * D, K, D, buf);
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t n0 = chunk * kChunk;
        const int rows = int(std::min<int64_t>(kChunk, Np - n0)), vecs = int(padded<T>(rows) / L);
        const scalar_t* pb = p + (b * Np + n0) * D;
        // The next chunk's patches come from DRAM: fetched into L2 during this chunk's product.
        sf::cpu::NextTaskPrefetch next;
        if (chunk + 1 < last)
          next.add(pb + kChunk * D, 1, 0, std::min<int64_t>(kChunk, Np - n0 - kChunk) * D * sizeof(scalar_t));
        std::fill_n(rp, kChunk, T(0));  // squared norms first
        if (D == 0) std::fill_n(st, panels * kPanel * kChunk, T(0));
        for (int64_t d0 = 0; d0 < D; d0 += kDepth) {
          // The chunk is transposed one depth block at a time, into L1 (a transpose storing to L2
          // is store-bound), with the squared norms of its rows summed on the way.
          const int depth = int(std::min<int64_t>(kDepth, D - d0));
          if constexpr (kSameType) {
            transpose_squares(pb + d0, D, rows, depth, pt, kChunk, rp);
          } else {
            for (int r = 0; r < rows; ++r) sf::cpu::load_row(buf + r * depth, pb + r * D + d0, depth);
            transpose_squares(buf, depth, rows, depth, pt, kChunk, rp);
          }
          panel_product<T>(panels, vecs, depth, ct + d0 * kPanel, panel_size, 1, kPanel, pt, kChunk, st, kChunk, d0 > 0,
                           &next);
        }
        for (int r = 0; r < rows; ++r) {
          rp[r] = T(1) / std::sqrt(rp[r]);
          rp_all[b * Np + n0 + r] = rp[r];
        }
        // Cosines: S^T rp (patches in lanes), back to rows of K (zero from K to Kpad) a vector of
        // patches at a time (the rows stay in L1), then per row the LayerNorm and the stores.
        for (int v = 0; v < vecs; ++v) {
          const Vec<T> rpv = sf::cpu::vload(rp + v * L);
          for (int64_t k = 0; k < K; ++k) {
            T* x = st + k * kChunk + v * L;
            sf::cpu::vstore(x, sf::cpu::vload(x) * rpv);
          }
          sf::cpu::transpose(st + v * L, kChunk, int(K), L, tile, Kpad);
          for (int r = 0; r < std::min(L, rows - v * L); ++r) {
            T* row = tile + r * Kpad;
            const int64_t orow = (b * Np + n0 + v * L + r) * K;
            if (s_all) std::copy_n(row, K, s_all + orow);
            if (norm) {
              T mean, rstd;
              layer_norm_stats(row, K, Kpad, T(eps), mean, rstd);
              const Vec<T> m = sf::cpu::vsplat<T>(mean), rs = sf::cpu::vsplat<T>(rstd);
              for (int64_t k = 0; k < Kpad; k += L) {
                const Vec<T> y = (sf::cpu::vload(row + k) - m) * rs;
                sf::cpu::vstore(row + k, y * sf::cpu::vload(gain.data() + k) + sf::cpu::vload(shift.data() + k));
              }
            }
            sf::cpu::store_row(o + orow, row, K);
          }
        }
      }
    }
  });
  return {out, scores, rinv_p, rinv_c};
}

// The per-row constants of the backward's row step.
template <typename T>
struct RowTerms {
  const T* gain;   // LayerNorm gain, padded to Kpad
  const T* valid;  // 1 for real classes, 0 for padding
  int64_t K, Kpad;
  bool norm;
  T eps;
};
// Rows of Kpad values the row step works in (per thread).
template <typename T>
struct RowScratch {
  T *s, *dy, *ds, *dh;
};

// One patch row of the backward: dS (the cosines' gradient, through the LayerNorm with norm),
// g = rp dS rc (Kpad values, zero past K), colsum += dS S and the LayerNorm partials dw += dy shat,
// db += dy (when given); returns rowdot = sum_k dS S.  s_row: the row's cosines, dy_row: its
// output gradient, rc: the classes' inverse norms padded with zeros.
template <typename S, typename T>
T row_gradient(const T* s_row, const S* dy_row, T rp, const T* rc, const RowTerms<T>& t, const RowScratch<T>& w,
               T* colsum, T* dw_part, T* db_part, T* g) {
  constexpr int L = kLanes<T>;
  using sf::cpu::vload;
  using sf::cpu::vstore;
  const int64_t K = t.K, Kpad = t.Kpad;
  T *s = w.s, *dy = w.dy, *ds = w.ds, *dh = w.dh;
  std::copy_n(s_row, K, s);
  std::fill_n(s + K, Kpad - K, T(0));
  sf::cpu::load_row(dy, dy_row, K);
  std::fill_n(dy + K, Kpad - K, T(0));
  const T* dsr = dy;  // dS = dy without the LayerNorm
  if (t.norm) {
    // dS = rstd (dh - mean(dh) - shat mean(dh shat)), shat = (s - mean) rstd, dh = dy gain.
    T mean, rstd;
    layer_norm_stats(s, K, Kpad, t.eps, mean, rstd);  // s's padding now holds the mean
    const Vec<T> m = sf::cpu::vsplat<T>(mean), rs = sf::cpu::vsplat<T>(rstd);
    Vec<T> sum_dh{}, sum_dh_shat{};
    for (int64_t k = 0; k < Kpad; k += L) {
      const Vec<T> shat = (vload(s + k) - m) * rs, y = vload(dy + k), h = y * vload(t.gain + k);
      vstore(ds + k, shat);
      vstore(dh + k, h);
      if (dw_part) {
        vstore(dw_part + k, vload(dw_part + k) + y * shat);
        vstore(db_part + k, vload(db_part + k) + y);
      }
      sum_dh += h;
      sum_dh_shat += h * shat;
    }
    const Vec<T> a1 = sf::cpu::vsplat<T>(sf::cpu::hsum<T>(sum_dh) / T(K));
    const Vec<T> a2 = sf::cpu::vsplat<T>(sf::cpu::hsum<T>(sum_dh_shat) / T(K));
    for (int64_t k = 0; k < Kpad; k += L)
      vstore(ds + k, rs * (vload(dh + k) - a1 - vload(ds + k) * a2) * vload(t.valid + k));
    dsr = ds;
  }
  // dsr is zero past K, so the mean left in s's padding does not enter these sums.
  Vec<T> dot_acc{};
  const Vec<T> rpv = sf::cpu::vsplat<T>(rp);
  for (int64_t k = 0; k < Kpad; k += L) {
    const Vec<T> d = vload(dsr + k), sv = vload(s + k);
    dot_acc += d * sv;
    vstore(colsum + k, vload(colsum + k) + d * sv);
    vstore(g + k, rpv * d * vload(rc + k));
  }
  return sf::cpu::hsum<T>(dot_acc);
}

// The backward's outputs: dP, dC in the inputs' type, dw and db (with norm) zeroed in the compute
// type T.  Empty inputs get zero gradients here (the caller returns them as they are).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_outputs(const at::Tensor& P, const at::Tensor& C,
                                                                            bool norm) {
  const auto acc_options = P.options().dtype(c10::CppTypeToScalarType<T>::value);
  // P and C are contiguous (the Python side makes them so): so are their gradients.
  at::Tensor dP = sf::cpu::pooled_empty(P.sizes(), P.options()), dC = sf::cpu::pooled_empty(C.sizes(), C.options());
  at::Tensor dw = norm ? at::zeros({C.size(1)}, acc_options) : at::Tensor();
  at::Tensor db = norm ? at::zeros({C.size(1)}, acc_options) : at::Tensor();
  if (P.numel() == 0 || C.numel() == 0) {
    dP.zero_();
    dC.zero_();
  }
  return {dP, dC, dw, db};
}

// dw and db = the row blocks' partials ((dw, db) x Kpad each, `parts` of them) added in order.
template <typename T>
void sum_layer_norm_partials(const std::vector<T>& partials, int64_t parts, int64_t K, int64_t Kpad, at::Tensor& dw,
                             at::Tensor& db) {
  T* dwp = dw.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
  for (int64_t j = 0; j < parts; ++j) {
    const T* part = partials.data() + j * 2 * Kpad;
    for (int64_t k = 0; k < K; ++k) {
      dwp[k] += part[k];
      dbp[k] += part[Kpad + k];
    }
  }
}

// Backward (see the file comment).  scores: the forward's cosines (B, Np, K) in the compute type;
// rinv_p, rinv_c: its inverse norms.  Returns dP, dC and, with norm, dw and db in the compute
// type (empty tensors otherwise).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& P, const at::Tensor& C, const at::Tensor& scores,
    const at::Tensor& rinv_p, const at::Tensor& rinv_c, const std::optional<at::Tensor>& weight, bool norm,
    double eps, bool need_dp, bool need_dc) {
  using T = acc_t<scalar_t>;
  constexpr int L = kLanes<T>;
  constexpr int W = kStrip<T>;
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2);
  const int64_t Kpad = padded<T>(K);
  const int panels = int((K + kPanel - 1) / kPanel);
  const int64_t strips = (D + W - 1) / W;
  const std::vector<T> gain = padded_param<T>(weight, K, Kpad, T(1), "norm_weight");
  at::Tensor dP, dC, dw, db;
  std::tie(dP, dC, dw, db) = backward_outputs<T>(P, C, norm);
  if (P.numel() == 0 || C.numel() == 0) return {dP, dC, dw, db};
  const scalar_t* p = P.data_ptr<scalar_t>();
  const scalar_t* c = C.data_ptr<scalar_t>();
  const scalar_t* dy_all = grad.data_ptr<scalar_t>();
  const T* s_all = scores.data_ptr<T>();
  const T* rp_all = rinv_p.data_ptr<T>();
  const T* rc_all = rinv_c.data_ptr<T>();
  scalar_t* dp = dP.data_ptr<scalar_t>();
  scalar_t* dc = dC.data_ptr<scalar_t>();

  // Per row block: column partials of dw and db (summed over all blocks in order at the end).
  const int64_t blocks = (Np + kChunk - 1) / kChunk;
  std::vector<T> ln_partials(norm ? size_t(B * blocks * 2 * Kpad) : 0);
  // Padded per-class vectors: rc (zero padding) and 1 / 0 for real / padding classes.
  std::vector<T> rc_pad(size_t(B * Kpad), T(0)), valid(size_t(Kpad), T(0));
  for (int64_t b = 0; b < B; ++b) std::copy_n(rc_all + b * K, K, rc_pad.data() + b * Kpad);
  std::fill_n(valid.data(), K, T(1));
  using sf::cpu::vload;
  using sf::cpu::vstore;

  // A task: one batch and a group of strips of D (groups only when there are fewer batches than
  // threads; each recomputes the batch's G).  Its row blocks run in order, so that dC's sum over
  // the patches and coldot's over the blocks have one order whatever the split.
  const int64_t groups = parts_per_batch(B, strips), group_strips = (strips + groups - 1) / groups;
  const int64_t strip_size = K * W, tile_size = int64_t(panels) * kPanel * W;
  constexpr int kRowPanels = (kChunk + kPanel - 1) / kPanel;
  sf::cpu::parallel_for(B * groups, 1, [&](int64_t t0, int64_t t1) {
    // Rows padded to Kpad with zeros: s (cosines), dy, ds (their gradient), dh (dy gain).
    T* s = sf::cpu::scratch<T>(0, size_t(Kpad));
    T* dy = sf::cpu::scratch<T>(1, size_t(Kpad));
    T* ds = sf::cpu::scratch<T>(2, size_t(Kpad));
    T* dh = sf::cpu::scratch<T>(3, size_t(Kpad));
    T* colsum = sf::cpu::scratch<T>(4, size_t(2 * Kpad));  // the block's column sums, then coldot
    T* coldot = colsum + Kpad;
    T* g = sf::cpu::scratch<T>(5, size_t(kRowPanels * kPanel * Kpad));  // the block's rows of G (A of dP)
    // A strip of the block's dP rows; G^T in panels of classes gt[panel][r][j] (A of dC).
    T* tile = sf::cpu::scratch<T>(6, size_t(kRowPanels * kPanel * W + panels * kPanel * kChunk));
    T* gt = tile + kRowPanels * kPanel * W;
    // The group's strips of C (B of dP), their dC tiles, a strip of the block's P rows (B of dC).
    T* cs = sf::cpu::scratch<T>(7, size_t(group_strips * (strip_size + tile_size) + kChunk * W));
    T* dct = cs + group_strips * strip_size;
    T* pk = dct + group_strips * tile_size;
    T rowdot[kChunk];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / groups, s0 = (t % groups) * group_strips, s1 = std::min(strips, s0 + group_strips);
      const int64_t c0 = s0 * W, width = std::min(D, s1 * W) - c0;
      const bool first_group = t % groups == 0;
      const T* rc = rc_pad.data() + b * Kpad;
      const scalar_t* pb = p + b * Np * D;
      // C in strips of W columns of D, the B operand of dP: cs[strip][k][0, W), zero past D.
      if (need_dp)
        for (int64_t sn = s0; sn < s1; ++sn)
          pack_rows(cs + (sn - s0) * strip_size, W, c + b * K * D + sn * W, D, K, std::min<int64_t>(W, D - sn * W));
      std::fill_n(coldot, Kpad, T(0));
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t n0 = blk * kChunk;
        const int rows = int(std::min<int64_t>(kChunk, Np - n0));
        // The next block's rows come from DRAM: fetched into L2 during this block's products.
        sf::cpu::NextTaskPrefetch next;
        if (blk + 1 < blocks) {
          const int64_t nn = b * Np + n0 + kChunk, next_rows = std::min<int64_t>(kChunk, Np - n0 - kChunk);
          next.add(p + nn * D + c0, next_rows, D * sizeof(scalar_t), width * sizeof(scalar_t));
          next.add(dy_all + nn * K, 1, 0, next_rows * K * sizeof(scalar_t));
          next.add(s_all + nn * K, 1, 0, next_rows * K * sizeof(T));
        }
        T* dw_part = norm && first_group ? ln_partials.data() + (b * blocks + blk) * 2 * Kpad : nullptr;
        T* db_part = dw_part ? dw_part + Kpad : nullptr;
        if (dw_part) std::fill_n(dw_part, 2 * Kpad, T(0));
        std::fill_n(colsum, Kpad, T(0));
        for (int r = 0; r < rows; ++r) {
          const int64_t n = b * Np + n0 + r;
          rowdot[r] = row_gradient(s_all + n * K, dy_all + n * K, rp_all[n], rc, RowTerms<T>{gain.data(), valid.data(),
                                   K, Kpad, norm, T(eps)}, RowScratch<T>{s, dy, ds, dh}, colsum, dw_part, db_part,
                                   g + r * Kpad);
        }
        // coldot: the blocks' column sums added in block order.
        for (int64_t k = 0; k < Kpad; k += L) vstore(coldot + k, vload(coldot + k) + vload(colsum + k));
        if (need_dp) {
          // dP rows = G C - P rp^2 rowdot, G's rows read in place (packing them in panels cost more
          // than the strided broadcasts do); rows past the block are zero.
          const int row_panels = (rows + kPanel - 1) / kPanel;
          std::fill(g + rows * Kpad, g + row_panels * kPanel * Kpad, T(0));
          for (int64_t sn = s0; sn < s1; ++sn) {
            const int64_t d0 = sn * W, cols = std::min<int64_t>(W, D - d0);
            panel_product<T>(row_panels, int(padded<T>(cols) / L), int(K), g, kPanel * Kpad, Kpad, 1,
                             cs + (sn - s0) * strip_size, W, tile, W, false, &next);
            for (int r = 0; r < rows; ++r) {
              const int64_t n = b * Np + n0 + r;
              const T rpn = rp_all[n];
              store_difference(dp + n * D + d0, tile + r * W, p + n * D + d0, rpn * rpn * rowdot[r], cols);
            }
          }
        }
        if (need_dc) {
          // dC += G^T P over the block's rows: G^T in panels of classes, P a strip at a time.
          const int full = int(K / kPanel);
          for (int pn = 0; pn < panels; ++pn) {
            T* dst = gt + int64_t(pn) * kChunk * kPanel;
            const T* src = g + pn * kPanel;
            if (pn < full) {
              for (int r = 0; r < rows; ++r)
                for (int j = 0; j < kPanel; ++j) dst[r * kPanel + j] = src[r * Kpad + j];
            } else {
              for (int r = 0; r < rows; ++r)
                for (int j = 0; j < kPanel; ++j) dst[r * kPanel + j] = pn * kPanel + j < K ? src[r * Kpad + j] : T(0);
            }
          }
          for (int64_t sn = s0; sn < s1; ++sn) {
            const int64_t d0 = sn * W, cols = std::min<int64_t>(W, D - d0);
            pack_rows(pk, W, pb + n0 * D + d0, D, rows, cols);
            panel_product<T>(panels, int(padded<T>(cols) / L), rows, gt, kChunk * kPanel, 1, kPanel, pk, W,
                             dct + (sn - s0) * tile_size, W, blk > 0, &next);
          }
        }
      }
      // dC = G^T P - C rc^2 coldot.
      for (int64_t sn = s0; need_dc && sn < s1; ++sn) {
        const int64_t d0 = sn * W, cols = std::min<int64_t>(W, D - d0);
        for (int64_t k = 0; k < K; ++k) {
          const T rck = rc_all[b * K + k];
          store_difference(dc + (b * K + k) * D + d0, dct + (sn - s0) * tile_size + k * W, c + (b * K + k) * D + d0,
                           rck * rck * coldot[k], cols);
        }
      }
    }
    sf::cpu::stream_fence();
  });

  if (norm) sum_layer_norm_partials(ln_partials, B * blocks, K, Kpad, dw, db);
  return {dP, dC, dw, db};
}

// ---------------------------------------------- bf16 / fp16 on the matrix unit --
// Inputs of a reduced type where sf_cpu_matrix.h serves it: the three products on the matrix unit
// on the raw operands (S = rp (P C^T) rc, dP = G C - ..., dC = G^T P - ..., as above), everything
// else in fp32 as on the vector path (the same row step), with the same residuals.  G is rounded to
// the input type for its products (as PyTorch's reduced-precision autograd rounds every gradient).
namespace reduced {

using namespace sf::cpu::matrix;
namespace matrix = sf::cpu::matrix;
using T = float;

template <typename S>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& P, const at::Tensor& C,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, bool norm,
                                                                   double eps) {
  constexpr int L = kLanes<T>;
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2), Kpad = padded<T>(K);
  const int64_t lk = tile_ld(K), kd = even(D), cls_size = packed_size(D, K);
  TORCH_CHECK(norm || !(weight.has_value() || bias.has_value()), "norm_weight / norm_bias given but norm=False");
  const std::vector<T> gain = padded_param<T>(weight, K, Kpad, T(1), "norm_weight");
  const std::vector<T> shift = padded_param<T>(bias, K, Kpad, T(0), "norm_bias");
  const auto acc_options = P.options().dtype(at::kFloat);
  at::Tensor out = sf::cpu::pooled_empty({B, Np, K}, P.options());
  at::Tensor scores = sf::cpu::pooled_empty({B, Np, K}, acc_options);
  at::Tensor rinv_p = at::empty({B, Np}, acc_options), rinv_c = at::empty({B, K}, acc_options);
  if (out.numel() == 0) return {out, scores, rinv_p, rinv_c};
  const S* p = P.data_ptr<S>();
  const S* c = C.data_ptr<S>();
  S* o = out.data_ptr<S>();
  T* s_all = scores.data_ptr<T>();
  T* rp_all = rinv_p.data_ptr<T>();
  T* rc_all = rinv_c.data_ptr<T>();
  // The classes of each batch, packed as C^T (D x K), and their inverse norms: a pass before.
  at::Tensor packed = sf::cpu::pooled_empty({B, cls_size}, P.options());
  S* packed_all = packed.data_ptr<S>();
  sf::cpu::parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
    T* buf = sf::cpu::scratch<T>(0, size_t(D));
    for (int64_t b = b0; b < b1; ++b) {
      pack_transposed(packed_all + b * cls_size, c + b * K * D, D, K, D);
      for (int64_t k = 0; k < K; ++k) rc_all[b * K + k] = inverse_norm(c + (b * K + k) * D, D, buf);
    }
  });
  const int64_t chunks = (Np + kChunk - 1) / kChunk;
  sf::cpu::parallel_for(B * chunks, 1, [&](int64_t t0, int64_t t1) {
    Session session;
    T* tile = sf::cpu::scratch<T>(0, size_t(kChunk * lk));
    T* rc = sf::cpu::scratch<T>(1, size_t(Kpad));
    T* buf = sf::cpu::scratch<T>(2, size_t(std::max(D, Kpad)));
    S* stage = D % 2 ? sf::cpu::scratch<S>(0, size_t(kChunk * kd)) : nullptr;
    int64_t rc_batch = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, n0 = (t % chunks) * kChunk;
      const int rows = int(std::min<int64_t>(kChunk, Np - n0));
      if (b != rc_batch) {
        std::copy_n(rc_all + b * K, K, rc);
        std::fill(rc + K, rc + Kpad, T(0));
        rc_batch = b;
      }
      const S* pb = p + (b * Np + n0) * D;
      const S* a = pb;
      if (stage) {
        for (int r = 0; r < rows; ++r) {
          std::copy_n(pb + r * D, D, stage + r * kd);
          stage[r * kd + D] = S(0);
        }
        a = stage;
      }
      product(rows, K, D, a, stage ? kd : D, packed_all + b * cls_size, tile, lk, false);
      for (int r = 0; r < rows; ++r) {
        const T rp = inverse_norm(pb + r * D, D, buf);
        rp_all[b * Np + n0 + r] = rp;
        T* row = tile + r * lk;
        const Vec<T> rpv = sf::cpu::vsplat<T>(rp);
        for (int64_t k = 0; k < Kpad; k += L) sf::cpu::vstore(row + k, sf::cpu::vload(row + k) * rpv * sf::cpu::vload(rc + k));
        const int64_t orow = (b * Np + n0 + r) * K;
        std::copy_n(row, K, s_all + orow);
        if (norm) {
          T mean, rstd;
          layer_norm_stats(row, K, Kpad, T(eps), mean, rstd);
          const Vec<T> m = sf::cpu::vsplat<T>(mean), rs = sf::cpu::vsplat<T>(rstd);
          for (int64_t k = 0; k < Kpad; k += L) {
            const Vec<T> y = (sf::cpu::vload(row + k) - m) * rs;
            sf::cpu::vstore(row + k, y * sf::cpu::vload(gain.data() + k) + sf::cpu::vload(shift.data() + k));
          }
        }
        sf::cpu::store_row(o + orow, row, K);
      }
    }
  });
  return {out, scores, rinv_p, rinv_c};
}

template <typename S>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& P, const at::Tensor& C, const at::Tensor& scores,
    const at::Tensor& rinv_p, const at::Tensor& rinv_c, const std::optional<at::Tensor>& weight, bool norm,
    double eps, bool need_dp, bool need_dc) {
  constexpr int L = kLanes<T>;
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2), Kpad = padded<T>(K);
  const int64_t ld = tile_ld(D), kk = even(K), mm = even(kChunk), wm = sf::cpu::round_up(kChunk, L);
  const std::vector<T> gain = padded_param<T>(weight, K, Kpad, T(1), "norm_weight");
  at::Tensor dP, dC, dw, db;
  std::tie(dP, dC, dw, db) = backward_outputs<T>(P, C, norm);
  if (P.numel() == 0 || C.numel() == 0) return {dP, dC, dw, db};
  const S* p = P.data_ptr<S>();
  const S* c = C.data_ptr<S>();
  const S* dy_all = grad.data_ptr<S>();
  const T* s_all = scores.data_ptr<T>();
  const T* rp_all = rinv_p.data_ptr<T>();
  const T* rc_all = rinv_c.data_ptr<T>();
  S* dp = dP.data_ptr<S>();
  S* dc = dC.data_ptr<S>();
  const int64_t blocks = (Np + kChunk - 1) / kChunk;
  std::vector<T> ln_partials(norm ? size_t(B * blocks * 2 * Kpad) : 0);
  std::vector<T> valid(size_t(Kpad), T(0));
  std::fill_n(valid.data(), K, T(1));
  const RowTerms<T> terms{gain.data(), valid.data(), K, Kpad, norm, T(eps)};
  // A task per batch: its blocks in order, so that dC's sum over the patches has one order.
  sf::cpu::parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
    Session session;
    const RowScratch<T> w{sf::cpu::scratch<T>(0, size_t(Kpad)), sf::cpu::scratch<T>(1, size_t(Kpad)),
                          sf::cpu::scratch<T>(2, size_t(Kpad)), sf::cpu::scratch<T>(3, size_t(Kpad))};
    T* colsum = sf::cpu::scratch<T>(4, size_t(2 * Kpad));
    T* coldot = colsum + Kpad;
    T* g = sf::cpu::scratch<T>(5, size_t(kChunk * Kpad + Kpad * wm + Kpad));  // G rows, then G^T
    T* gt = g + kChunk * Kpad;
    T* rc = gt + Kpad * wm;
    T* tile = sf::cpu::scratch<T>(6, size_t(kChunk * ld + K * ld));  // dP rows, the dC accumulator
    T* dct = tile + kChunk * ld;
    S* c_rows = sf::cpu::scratch<S>(0, size_t(packed_size(K, D)));  // C (K x D) packed: B of dP
    S* p_rows = sf::cpu::scratch<S>(1, size_t(packed_size(kChunk, D)));  // the block's P: B of dC
    S* g_s = sf::cpu::scratch<S>(2, size_t(std::max(kChunk * kk, K * mm)));  // G or G^T rounded: A
    T rowdot[kChunk];
    for (int64_t b = b0; b < b1; ++b) {
      std::copy_n(rc_all + b * K, K, rc);
      std::fill(rc + K, rc + Kpad, T(0));
      if (need_dp) matrix::pack_rows(c_rows, c + b * K * D, D, K, D);
      std::fill_n(coldot, Kpad, T(0));
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t n0 = blk * kChunk;
        const int rows = int(std::min<int64_t>(kChunk, Np - n0));
        T* dw_part = norm ? ln_partials.data() + (b * blocks + blk) * 2 * Kpad : nullptr;
        T* db_part = dw_part ? dw_part + Kpad : nullptr;
        if (dw_part) std::fill_n(dw_part, 2 * Kpad, T(0));
        std::fill_n(colsum, Kpad, T(0));
        for (int r = 0; r < rows; ++r) {
          const int64_t n = b * Np + n0 + r;
          rowdot[r] = row_gradient(s_all + n * K, dy_all + n * K, rp_all[n], rc, terms, w, colsum, dw_part, db_part,
                                   g + r * Kpad);
        }
        for (int64_t k = 0; k < Kpad; k += L)
          sf::cpu::vstore(coldot + k, sf::cpu::vload(coldot + k) + sf::cpu::vload(colsum + k));
        const S* pb = p + (b * Np + n0) * D;
        if (need_dp) {  // dP rows = G C - P rp^2 rowdot
          for (int r = 0; r < rows; ++r) sf::cpu::store_row(g_s + r * kk, g + r * Kpad, kk);
          product(rows, D, K, g_s, kk, c_rows, tile, ld, false);
          for (int r = 0; r < rows; ++r) {
            const int64_t n = b * Np + n0 + r;
            store_difference(dp + n * D, tile + r * ld, pb + r * D, rp_all[n] * rp_all[n] * rowdot[r], D);
          }
        }
        if (need_dc) {  // dC += G^T P over the block's rows
          sf::cpu::transpose(g, Kpad, rows, int(Kpad), gt, wm);
          for (int64_t k = 0; k < K; ++k) sf::cpu::store_row(g_s + k * even(rows), gt + k * wm, even(rows));
          matrix::pack_rows(p_rows, pb, D, rows, D);
          product(K, D, rows, g_s, even(rows), p_rows, dct, ld, blk > 0);
        }
      }
      // dC = G^T P - C rc^2 coldot.
      for (int64_t k = 0; need_dc && k < K; ++k) {
        const T rck = rc_all[b * K + k];
        store_difference(dc + (b * K + k) * D, dct + k * ld, c + (b * K + k) * D, rck * rck * coldot[k], D);
      }
    }
  });
  if (norm) sum_layer_norm_partials(ln_partials, B * blocks, K, Kpad, dw, db);
  return {dP, dC, dw, db};
}

}  // namespace reduced

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& P, const at::Tensor& C,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, bool norm,
                                                                   double eps) {
  check_inputs(P, C);
  if (sf::cpu::matrix::serves(P.scalar_type())) {
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> results;
    sf::cpu::matrix::dispatch(P.scalar_type(), [&](auto tag) {
      results = reduced::forward<decltype(tag)>(P, C, weight, bias, norm, eps);
    });
    return results;
  }
  return SF_CPU_DISPATCH(P.scalar_type(), "mask_similarity", [&] {
    return forward_impl<scalar_t>(P, C, weight, bias, norm, eps);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& P,
                                                                    const at::Tensor& C, const at::Tensor& scores,
                                                                    const at::Tensor& rinv_p,
                                                                    const at::Tensor& rinv_c,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    bool norm, double eps, bool need_dp,
                                                                    bool need_dc) {
  check_inputs(P, C);
  SF_CPU_CHECK_INPUT(grad, 3);
  SF_CPU_CHECK_CONTIGUOUS(grad);
  SF_CPU_CHECK_SAME_DTYPE(grad, P);
  TORCH_CHECK(grad.size(0) == P.size(0) && grad.size(1) == P.size(1) && grad.size(2) == C.size(1),
              "grad must have shape (B, Np, K) = (", P.size(0), ", ", P.size(1), ", ", C.size(1), "), got ",
              grad.sizes());
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1);
  const at::ScalarType acc_type = P.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scores.scalar_type() == acc_type && scores.is_contiguous() && scores.dim() == 3 &&
                  scores.size(0) == B && scores.size(1) == Np && scores.size(2) == K,
              "scores must be a contiguous (B, Np, K) tensor of the compute type");
  TORCH_CHECK(rinv_p.scalar_type() == acc_type && rinv_p.is_contiguous() && rinv_p.numel() == B * Np,
              "rinv_p must be a contiguous (B, Np) tensor of the compute type");
  TORCH_CHECK(rinv_c.scalar_type() == acc_type && rinv_c.is_contiguous() && rinv_c.numel() == B * K,
              "rinv_c must be a contiguous (B, K) tensor of the compute type");
  if (sf::cpu::matrix::serves(P.scalar_type())) {
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> results;
    sf::cpu::matrix::dispatch(P.scalar_type(), [&](auto tag) {
      results = reduced::backward<decltype(tag)>(grad, P, C, scores, rinv_p, rinv_c, weight, norm, eps, need_dp,
                                                 need_dc);
    });
    return results;
  }
  return SF_CPU_DISPATCH(P.scalar_type(), "mask_similarity", [&] {
    return backward_impl<scalar_t>(grad, P, C, scores, rinv_p, rinv_c, weight, norm, eps, need_dp, need_dc);
  });
}

}  // namespace

SF_CPU_LIBRARY(m) {
  m.def("mask_similarity_forward(Tensor patches, Tensor classes, Tensor? norm_weight, Tensor? norm_bias, "
        "bool norm, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mask_similarity_backward(Tensor grad, Tensor patches, Tensor classes, Tensor scores, Tensor rinv_p, "
        "Tensor rinv_c, Tensor? norm_weight, bool norm, float eps, bool need_dp, bool need_dc) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  SF_CPU_MATRIX_UNIT_QUERY(m, "mask_similarity");
}

SF_CPU_LIBRARY_IMPL(m) {
  m.impl("mask_similarity_forward", &forward);
  m.impl("mask_similarity_backward", &backward);
}
