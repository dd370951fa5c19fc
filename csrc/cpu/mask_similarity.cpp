// mask_similarity on the CPU: Segmenter's masks S = (P / |P|) (C / |C|)^T, optionally LayerNorm
// over the K classes (`mask_norm`), forward and backward (SPEC.md section 4,
// reference.mask_similarity).  P: (B, Np, D) patches, C: (B, K, D) classes, out: (B, Np, K).  No
// epsilon in the norms, as the official code.
//
// Forward: per batch, the classes are packed once as C^T scaled by 1 / |C_k| (D x Kpad, Kpad = K
// rounded up to whole vectors): the B operand of the shared product, classes in vector lanes.
// Per block of kRows patch rows: |P_n| from the rows (staged in fp32 for fp16 / bf16), one
// product P C^T into a kRows x Kpad tile, the row scale 1 / |P_n| and the LayerNorm on the tile
// (a row of K scores stays in L1), written out.  The cosines S (in the compute type; the output
// itself when there is no LayerNorm and the output is fp32 / fp64) and both inverse norms are
// kept for backward, so backward runs no forward GEMM again.
//
// Backward, with G = rp dS rc (rp, rc the inverse norms, dS the gradient of the cosines):
//   dP = rp (dS C^) - P rp^2 rowdot,   rowdot_n = sum_k dS_nk S_nk   (C^ = C rc)
//   dC = rc (dS^T P^) - C rc^2 coldot, coldot_k = sum_n dS_nk S_nk   (P^ = P rp)
// i.e. dP = G C - ..., dC = G^T P - ..., two products on the raw P and C.  Phase 1 (per block of
// rows): dS through the LayerNorm, G, rowdot, the block's column partials of coldot, dw, db, and
// the block's rows of dP; G also goes to memory transposed (the A operand of the next product).
// Phase 2 (per batch and kCols columns of D): dC, with coldot summed from the partials in block
// order.  Blocks are fixed (kRows rows), so every sum runs in an order independent of the thread
// count: results are bitwise the same for any torch.set_num_threads.
#include <ATen/ops/empty_like.h>

#include "sf_cpu.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

using sf::cpu::acc_t;
using sf::cpu::kLanes;
using sf::cpu::Vec;

constexpr int kRows = 64;    // patch rows per task (forward, backward phase 1)
constexpr int kDepth = 128;  // depth per product pass: the B operand's panel stays in L1
constexpr int kCols = 64;    // D columns per dC task (one register block wide)

template <typename T>
int64_t padded(int64_t n) {
  return sf::cpu::round_up(n, kLanes<T>);
}

// sum_i x[i] y[i] over n elements (vectors, then the tail in order).
template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  constexpr int L = kLanes<T>;
  Vec<T> acc{};
  int64_t i = 0;
  for (; i + L <= n; i += L) acc += sf::cpu::vload(x + i) * sf::cpu::vload(y + i);
  T s = sf::cpu::hsum<T>(acc);
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

// dst[i] = tile[i] - src[i] * f over n values, rounded to S.  Rows that start on a vector
// boundary go out with non-temporal stores: these gradients are written once, and a plain store
// would first read every line of them from memory (measured: faster here, unlike the windowed
// semantic attention, whose many small rows made the page faults of fresh outputs costlier).
template <typename S, typename T>
void store_difference(S* __restrict__ dst, const T* __restrict__ tile, const T* __restrict__ src, T f, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<S, T>) {
    if (reinterpret_cast<uintptr_t>(dst) % SF_CPU_VEC_BYTES == 0) {
      const Vec<T> fv = sf::cpu::vsplat<T>(f);
      for (; i + kLanes<T> <= n; i += kLanes<T>)
        sf::cpu::stream_vec(dst + i, sf::cpu::vload(tile + i) - sf::cpu::vload(src + i) * fv);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<S>(tile[i] - src[i] * f);
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
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2), Kpad = padded<T>(K);
  TORCH_CHECK(norm || !(weight.has_value() || bias.has_value()), "norm_weight / norm_bias given but norm=False");
  // The LayerNorm's affine map y = shat * gain + shift.
  const std::vector<T> gain = padded_param<T>(weight, K, Kpad, T(1), "norm_weight");
  const std::vector<T> shift = padded_param<T>(bias, K, Kpad, T(0), "norm_bias");
  const auto acc_options = P.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor out = at::empty({B, Np, K}, P.options());
  const bool scores_in_out = kSameType && !norm;
  at::Tensor scores = scores_in_out ? at::empty({0}, acc_options) : at::empty({B, Np, K}, acc_options);
  at::Tensor rinv_p = at::empty({B, Np}, acc_options), rinv_c = at::empty({B, K}, acc_options);
  if (out.numel() == 0) return {out, scores, rinv_p, rinv_c};
  const scalar_t* p = P.data_ptr<scalar_t>();
  const scalar_t* c = C.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  T* s_all = scores_in_out ? nullptr : scores.data_ptr<T>();
  T* rp_all = rinv_p.data_ptr<T>();
  T* rc_all = rinv_c.data_ptr<T>();

  // C^T rc per batch: ct[b][d][k], zero columns from K to Kpad; written one vector of classes at a
  // time (reads kLanes rows of C in step, writes whole vectors).
  std::vector<T> ct(size_t(B * D * Kpad));
  const int64_t class_vecs = Kpad / kLanes<T>;
  sf::cpu::parallel_for(B * class_vecs, 1, [&](int64_t t0, int64_t t1) {
    T* buf = sf::cpu::scratch<T>(0, size_t(D));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / class_vecs, k0 = (t % class_vecs) * kLanes<T>;
      T rc[kLanes<T>] = {};
      for (int j = 0; j < kLanes<T> && k0 + j < K; ++j) {
        rc[j] = inverse_norm(c + (b * K + k0 + j) * D, D, buf);
        rc_all[b * K + k0 + j] = rc[j];
      }
      T* ctb = ct.data() + b * D * Kpad + k0;
      for (int64_t d = 0; d < D; ++d) {
        T* dst = ctb + d * Kpad;
        for (int j = 0; j < kLanes<T>; ++j)
          dst[j] = k0 + j < K ? static_cast<T>(c[(b * K + k0 + j) * D + d]) * rc[j] : T(0);
      }
    }
  });

  const int64_t blocks = (Np + kRows - 1) / kRows;
  sf::cpu::parallel_for(B * blocks, 1, [&](int64_t t0, int64_t t1) {
    T* tile = sf::cpu::scratch<T>(0, size_t(kRows * Kpad));
    T* staged = kSameType ? nullptr : sf::cpu::scratch<T>(1, size_t(kRows * D));
    T rp[kRows];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, n0 = (t % blocks) * kRows;
      const int rows = int(std::min<int64_t>(kRows, Np - n0));
      const scalar_t* pb = p + (b * Np + n0) * D;
      const T* a;
      if constexpr (kSameType) {
        a = pb;
      } else {
        sf::cpu::load_row(staged, pb, rows * D);
        a = staged;
      }
      for (int r = 0; r < rows; ++r) {
        rp[r] = T(1) / std::sqrt(dot(a + r * D, a + r * D, D));
        rp_all[b * Np + n0 + r] = rp[r];
      }
      const T* ctb = ct.data() + b * D * Kpad;
      for (int64_t d0 = 0; d0 < D; d0 += kDepth) {
        const int depth = int(std::min<int64_t>(kDepth, D - d0));
        sf::cpu::product<T>(rows, int(Kpad), depth, a + d0, D, 1, ctb + d0 * Kpad, Kpad, tile, Kpad, d0 > 0);
      }
      for (int r = 0; r < rows; ++r) {
        T* row = tile + r * Kpad;
        const Vec<T> scale = sf::cpu::vsplat<T>(rp[r]);
        for (int64_t k = 0; k < Kpad; k += kLanes<T>) sf::cpu::vstore(row + k, sf::cpu::vload(row + k) * scale);
        const int64_t orow = (b * Np + n0 + r) * K;
        if (s_all) std::copy_n(row, K, s_all + orow);
        if (norm) {
          T mean, rstd;
          layer_norm_stats(row, K, Kpad, T(eps), mean, rstd);
          const Vec<T> m = sf::cpu::vsplat<T>(mean), rs = sf::cpu::vsplat<T>(rstd);
          for (int64_t k = 0; k < Kpad; k += kLanes<T>) {
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

// Backward (see the file comment).  scores: the forward's cosines (B, Np, K) in the compute type;
// rinv_p, rinv_c: its inverse norms.  Returns dP, dC and, with norm, dw and db in the compute
// type (empty tensors otherwise).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& P, const at::Tensor& C, const at::Tensor& scores,
    const at::Tensor& rinv_p, const at::Tensor& rinv_c, const std::optional<at::Tensor>& weight, bool norm,
    double eps, bool need_dp, bool need_dc) {
  using T = acc_t<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, T>;
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2);
  const int64_t Kpad = padded<T>(K), Dpad = padded<T>(D);
  const std::vector<T> gain = padded_param<T>(weight, K, Kpad, T(1), "norm_weight");
  const auto acc_options = P.options().dtype(c10::CppTypeToScalarType<T>::value);
  constexpr at::ScalarType acc_type = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(scores.scalar_type() == acc_type && scores.is_contiguous() && scores.dim() == 3 &&
                  scores.size(0) == B && scores.size(1) == Np && scores.size(2) == K,
              "scores must be a contiguous (B, Np, K) tensor of the compute type");
  TORCH_CHECK(rinv_p.scalar_type() == scores.scalar_type() && rinv_p.is_contiguous() && rinv_p.numel() == B * Np,
              "rinv_p must be a contiguous (B, Np) tensor of the compute type");
  TORCH_CHECK(rinv_c.scalar_type() == scores.scalar_type() && rinv_c.is_contiguous() && rinv_c.numel() == B * K,
              "rinv_c must be a contiguous (B, K) tensor of the compute type");
  at::Tensor dP = at::empty_like(P), dC = at::empty_like(C);
  at::Tensor dw = norm ? at::zeros({K}, acc_options) : at::Tensor();
  at::Tensor db = norm ? at::zeros({K}, acc_options) : at::Tensor();
  if (P.numel() == 0 || C.numel() == 0) {
    dP.zero_();
    dC.zero_();
    return {dP, dC, dw, db};
  }
  const scalar_t* p = P.data_ptr<scalar_t>();
  const scalar_t* c = C.data_ptr<scalar_t>();
  const scalar_t* dy_all = grad.data_ptr<scalar_t>();
  const T* s_all = scores.data_ptr<T>();
  const T* rp_all = rinv_p.data_ptr<T>();
  const T* rc_all = rinv_c.data_ptr<T>();
  scalar_t* dp = dP.data_ptr<scalar_t>();
  scalar_t* dc = dC.data_ptr<scalar_t>();

  // The B operands in the compute type, rows padded to whole vectors: the raw P and C when they
  // already are, else converted copies.
  const bool direct = kSameType && D == Dpad;
  std::vector<T> p_conv, c_conv;
  if (!direct) {
    p_conv.assign(size_t(B * Np * Dpad), T(0));
    c_conv.assign(size_t(B * K * Dpad), T(0));
    sf::cpu::parallel_for(B * (Np + K), 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (r < B * Np) {
          sf::cpu::load_row(p_conv.data() + r * Dpad, p + r * D, D);
        } else {
          sf::cpu::load_row(c_conv.data() + (r - B * Np) * Dpad, c + (r - B * Np) * D, D);
        }
      }
    });
  }
  const T* pm = direct ? reinterpret_cast<const T*>(p) : p_conv.data();
  const T* cm = direct ? reinterpret_cast<const T*>(c) : c_conv.data();

  const int64_t blocks = (Np + kRows - 1) / kRows;
  // G^T (B, K, Np): the A operand of the dC product, rows contiguous along its depth Np.  Per
  // row block: column partials of coldot, dw, db (Kpad each).
  std::vector<T> gt(need_dc ? size_t(B * K * Np) : 0);
  const int nparts = norm ? 3 : 1;
  std::vector<T> partials(size_t(B * blocks * nparts * Kpad));

  // Padded per-class vectors: rc (zero padding) and 1 / 0 for real / padding classes.
  std::vector<T> rc_pad(size_t(B * Kpad), T(0)), valid(size_t(Kpad), T(0));
  for (int64_t b = 0; b < B; ++b) std::copy_n(rc_all + b * K, K, rc_pad.data() + b * Kpad);
  std::fill_n(valid.data(), K, T(1));
  using sf::cpu::vload;
  using sf::cpu::vstore;

  sf::cpu::parallel_for(B * blocks, 1, [&](int64_t t0, int64_t t1) {
    // Rows padded to Kpad with zeros: s (cosines), dy, ds (their gradient), dh (dy gain).
    T* s = sf::cpu::scratch<T>(0, size_t(Kpad));
    T* dy = sf::cpu::scratch<T>(1, size_t(Kpad));
    T* ds = sf::cpu::scratch<T>(2, size_t(Kpad));
    T* dh = sf::cpu::scratch<T>(4, size_t(Kpad));
    T* tile = sf::cpu::scratch<T>(3, size_t(kRows * Dpad));
    T* g = sf::cpu::scratch<T>(5, size_t(kRows * Kpad));  // the block's rows of G
    T rowdot[kRows];
    std::fill_n(dy + K, Kpad - K, T(0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, n0 = (t % blocks) * kRows;
      const int rows = int(std::min<int64_t>(kRows, Np - n0));
      const T* rc = rc_pad.data() + b * Kpad;
      T* part = partials.data() + t * nparts * Kpad;
      T* coldot = part;
      T* dw_part = part + Kpad;
      T* db_part = part + 2 * Kpad;
      std::fill_n(part, nparts * Kpad, T(0));
      for (int r = 0; r < rows; ++r) {
        const int64_t n = b * Np + n0 + r;
        std::copy_n(s_all + n * K, K, s);
        std::fill_n(s + K, Kpad - K, T(0));
        sf::cpu::load_row(dy, dy_all + n * K, K);
        const T* dsr = dy;  // dS = dy without the LayerNorm
        if (norm) {
          // dS = rstd (dh - mean(dh) - shat mean(dh shat)), shat = (s - mean) rstd, dh = dy gain.
          T mean, rstd;
          layer_norm_stats(s, K, Kpad, T(eps), mean, rstd);  // s's padding now holds the mean
          const Vec<T> m = sf::cpu::vsplat<T>(mean), rs = sf::cpu::vsplat<T>(rstd);
          Vec<T> sum_dh{}, sum_dh_shat{};
          for (int64_t k = 0; k < Kpad; k += kLanes<T>) {
            const Vec<T> shat = (vload(s + k) - m) * rs, y = vload(dy + k), h = y * vload(gain.data() + k);
            vstore(ds + k, shat);
            vstore(dh + k, h);
            vstore(dw_part + k, vload(dw_part + k) + y * shat);
            vstore(db_part + k, vload(db_part + k) + y);
            sum_dh += h;
            sum_dh_shat += h * shat;
          }
          const Vec<T> a1 = sf::cpu::vsplat<T>(sf::cpu::hsum<T>(sum_dh) / T(K));
          const Vec<T> a2 = sf::cpu::vsplat<T>(sf::cpu::hsum<T>(sum_dh_shat) / T(K));
          for (int64_t k = 0; k < Kpad; k += kLanes<T>)
            vstore(ds + k, rs * (vload(dh + k) - a1 - vload(ds + k) * a2) * vload(valid.data() + k));
          dsr = ds;
        }
        // dsr is zero past K, so the mean left in s's padding does not enter these sums.
        Vec<T> dot_acc{};
        const Vec<T> rp = sf::cpu::vsplat<T>(rp_all[n]);
        for (int64_t k = 0; k < Kpad; k += kLanes<T>) {
          const Vec<T> d = vload(dsr + k), sv = vload(s + k);
          dot_acc += d * sv;
          vstore(coldot + k, vload(coldot + k) + d * sv);
          vstore(g + r * Kpad + k, rp * d * vload(rc + k));
        }
        rowdot[r] = sf::cpu::hsum<T>(dot_acc);
      }
      if (need_dc) {
        T* gtb = gt.data() + b * K * Np + n0;
        for (int64_t k = 0; k < K; ++k)
          for (int r = 0; r < rows; ++r) gtb[k * Np + r] = g[r * Kpad + k];
      }
      if (!need_dp) continue;
      // dP rows = G C - P rp^2 rowdot.
      sf::cpu::product<T>(rows, int(Dpad), int(K), g, Kpad, 1, cm + b * K * Dpad, Dpad, tile, Dpad);
      for (int r = 0; r < rows; ++r) {
        const int64_t n = b * Np + n0 + r;
        const T rp = rp_all[n];
        const T f = rp * rp * rowdot[r];
        store_difference(dp + n * D, tile + r * Dpad, pm + n * Dpad, f, D);
      }
    }
    sf::cpu::stream_fence();
  });

  // coldot per batch, dw and db, summed over the row blocks in order.
  std::vector<T> coldot(size_t(B * K), T(0));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < blocks; ++j) {
      const T* part = partials.data() + (b * blocks + j) * nparts * Kpad;
      for (int64_t k = 0; k < K; ++k) coldot[b * K + k] += part[k];
      if (norm) {
        T* dwp = dw.data_ptr<T>();
        T* dbp = db.data_ptr<T>();
        for (int64_t k = 0; k < K; ++k) {
          dwp[k] += part[Kpad + k];
          dbp[k] += part[2 * Kpad + k];
        }
      }
    }

  // dC = G^T P - C rc^2 coldot, per batch and kCols columns of D.
  const int64_t col_blocks = need_dc ? (Dpad + kCols - 1) / kCols : 0;
  sf::cpu::parallel_for(B * col_blocks, 1, [&](int64_t t0, int64_t t1) {
    T* tile = sf::cpu::scratch<T>(0, size_t(K * kCols));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / col_blocks, d0 = (t % col_blocks) * kCols;
      const int cols = int(std::min<int64_t>(kCols, Dpad - d0));
      for (int64_t n0 = 0; n0 < Np; n0 += kDepth) {
        const int depth = int(std::min<int64_t>(kDepth, Np - n0));
        sf::cpu::product<T>(int(K), cols, depth, gt.data() + b * K * Np + n0, Np, 1, pm + (b * Np + n0) * Dpad + d0,
                            Dpad, tile, kCols, n0 > 0);
      }
      const int64_t dcols = std::min<int64_t>(cols, D - d0);
      for (int64_t k = 0; k < K; ++k) {
        const T rc = rc_all[b * K + k];
        const T f = rc * rc * coldot[b * K + k];
        store_difference(dc + (b * K + k) * D + d0, tile + k * kCols, cm + (b * K + k) * Dpad + d0, f, dcols);
      }
    }
    sf::cpu::stream_fence();
  });
  return {dP, dC, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& P, const at::Tensor& C,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, bool norm,
                                                                   double eps) {
  check_inputs(P, C);
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
}

SF_CPU_LIBRARY_IMPL(m) {
  m.impl("mask_similarity_forward", &forward);
  m.impl("mask_similarity_backward", &backward);
}
