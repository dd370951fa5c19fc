// Where the tokens of a (window, head) task are, for the kernels of window_attention_kernels.h: a
// window's rows by base and stride (window mode) or listed pixel by pixel (image mode, pad tokens
// included), for the inputs and for the gradients, and the prefetch of the next task's rows.
// Included by window_attention_kernels.h alone (the same anonymous namespace).
#pragma once

#include "sf_cpu.h"

namespace {

using namespace sf::cpu;

// f(t, pixel) for the tokens t of window row b_ (window wh x ww): pixel = the token's index in the
// (B, H, W) image, or -1 for a pad token.  The divisions run once per window, not per token (at
// six per token they cost half as much as the attention of a 7x7 window).
template <typename F>
inline void for_window_pixels(const sf::WindowGeometry& g, int64_t b_, F&& f) {
  const int64_t b = b_ / g.nW;
  const int w = int(b_ - b * g.nW), wy = w / g.nWw, wx = w - wy * g.nWw;
  int t = 0;
  for (int ty = 0; ty < g.Wh; ++ty)
    for (int tx = 0; tx < g.Ww; ++tx, ++t) {
      int y, x;
      f(t, sf::window_to_pixel(g, wy * g.Wh + ty, wx * g.Ww + tx, y, x) ? (b * g.H + y) * g.W + x : int64_t(-1));
    }
}

// n token rows of d contiguous elements: row t at base + t * ld (the window mode: a window's rows
// are equally spaced, and neither building nor checking n addresses is needed), or one listed
// address per row (the image mode: a window's pixels, pad tokens included).
template <typename P>
struct TokenRows {
  P* base = nullptr;
  int64_t ld = 0;
  std::vector<P*> listed;  // empty: strided
  P* operator[](int t) const { return listed.empty() ? base + t * ld : listed[t]; }
};

// Where a task's token rows are.  q/k/v rows: never null; out rows: null for a pad token (image
// mode), whose output is cropped away, or all null (no output).
template <typename S>
struct Rows {
  TokenRows<const S> q, k, v;
  TokenRows<S> out;
  Rows(int n, bool listed) {
    if (listed) q.listed.resize(n), k.listed.resize(n), v.listed.resize(n), out.listed.resize(n);
  }
};

template <typename S>
struct WindowTokens {
  const S *q, *k, *v;
  int64_t qs[3], ks[3], vs[3];  // strides of dims 0..2 (the last is 1)
  S* out;                       // (B_, h, N, d) contiguous, or nullptr (backward)
  int n, d, heads;
  static constexpr bool kListed = false;

  void rows(int64_t b, int head, Rows<S>& r) const {
    r.q = {q + b * qs[0] + head * qs[1], qs[2], {}};
    r.k = {k + b * ks[0] + head * ks[1], ks[2], {}};
    r.v = {v + b * vs[0] + head * vs[1], vs[2], {}};
    r.out = {out ? out + (b * heads + head) * n * d : nullptr, out ? d : 0, {}};
  }
};

template <typename S>
struct ImageTokens {
  const S* qkv;      // (B, H, W, 3 h d)
  const S* pad_row;  // (3 h d): qkv_bias in qkv's dtype, or zeros
  S* out;            // (B, H, W, h d), or nullptr
  sf::WindowGeometry g;
  int heads, d;
  static constexpr bool kListed = true;

  void rows(int64_t b_, int head, Rows<S>& r) const {
    const int64_t c = int64_t(heads) * d, hoff = int64_t(head) * d;
    for_window_pixels(g, b_, [&](int t, int64_t pixel) {
      const bool real = pixel >= 0;
      const S* base = real ? qkv + pixel * 3 * c : pad_row;
      r.q.listed[t] = base + hoff;
      r.k.listed[t] = base + c + hoff;
      r.v.listed[t] = base + 2 * c + hoff;
      r.out.listed[t] = real && out ? out + pixel * c + hoff : nullptr;
    });
  }
};

// -------------------------------------------------------------- gradients --
// Gradient rows of a task: dq/dk/dv of token t (nullptr for a pad token, whose gradient goes to
// the chunk's qkv_bias partial instead); the dout row of a pad token points to zeros.
template <typename S>
struct GradRows {
  TokenRows<S> dq, dk, dv;
  TokenRows<const S> dout;
  GradRows(int n, bool listed) {
    if (listed) dq.listed.resize(n), dk.listed.resize(n), dv.listed.resize(n), dout.listed.resize(n);
  }
};

template <typename S>
struct WindowGrads {
  S *dq, *dk, *dv;  // (B_, h, N, d) contiguous
  const S* dout;    // (B_, h, N, d) contiguous
  int n, d, heads;
  static constexpr bool kListed = false;
  void rows(int64_t b, int head, GradRows<S>& r) const {
    const int64_t off = (b * heads + head) * n * d;
    r.dq = {dq + off, d, {}};
    r.dk = {dk + off, d, {}};
    r.dv = {dv + off, d, {}};
    r.dout = {dout + off, d, {}};
  }
};

template <typename S>
struct ImageGrads {
  S* dqkv;         // (B, H, W, 3 h d)
  const S* dout;   // (B, H, W, h d)
  const S* zeros;  // (d): dout of a pad token
  sf::WindowGeometry g;
  int heads, d;
  static constexpr bool kListed = true;
  void rows(int64_t b_, int head, GradRows<S>& r) const {
    const int64_t c = int64_t(heads) * d, hoff = int64_t(head) * d;
    for_window_pixels(g, b_, [&](int t, int64_t pixel) {
      const bool real = pixel >= 0;
      r.dq.listed[t] = real ? dqkv + pixel * 3 * c + hoff : nullptr;
      r.dk.listed[t] = real ? dqkv + pixel * 3 * c + c + hoff : nullptr;
      r.dv.listed[t] = real ? dqkv + pixel * 3 * c + 2 * c + hoff : nullptr;
      r.dout.listed[t] = real ? dout + pixel * c + hoff : zeros;
    });
  }
};

// The next task's input rows, fetched by the current task's products (see NextTaskPrefetch).
template <typename S>
inline void prefetch_rows(const TokenRows<const S>& r, int n, int d, NextTaskPrefetch& next) {
  const int64_t row_bytes = int64_t(d) * sizeof(S);
  if (r.listed.empty()) next.add(r.base, n, r.ld * int64_t(sizeof(S)), row_bytes);
  else next.add_rows(r.listed.data(), n, row_bytes);
}
template <typename S>
inline void prefetch_rows(const Rows<S>& r, int n, int d, NextTaskPrefetch& next) {
  for (const auto* rows : {&r.q, &r.k, &r.v}) prefetch_rows(*rows, n, d, next);
}
template <typename S>
inline void prefetch_rows(const GradRows<S>& r, int n, int d, NextTaskPrefetch& next) {
  prefetch_rows(r.dout, n, d, next);
}

}  // namespace
