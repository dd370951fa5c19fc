// window_partition / window_merge on the CPU, forward and backward: pad + roll + partition and its
// exact inverse as parallel row copies (SPEC.md section 1; the geometry, padding and roll in
// either order: csrc/common/sf_window_geometry.h, shared with csrc/ops/window_process.cu).
//
// Partition walks the rows of every window (one source image row each), merge the image rows
// (each crosses a few windows); either way a row is a few runs of tokens that are consecutive in
// both tensors, and each run is one memcpy of (run length x C) elements.  Pure byte copies:
// bitwise exact for every dtype.  Each direction is the other's gradient.  Offsets are int64_t.
#include "sf_cpu.h"

namespace {

// Copies `count` tokens of `row_bytes` into dst (contiguous), token j from src_of(j) (nullptr: a
// zero pad token), one memcpy per run of tokens consecutive in the source.
template <typename SrcOf>
inline void copy_runs(char* dst, int64_t count, int64_t row_bytes, const SrcOf& src_of) {
  int64_t j = 0;
  while (j < count) {
    const char* src = src_of(j);
    int64_t run = 1;
    if (src == nullptr) {
      while (j + run < count && src_of(j + run) == nullptr) ++run;
      std::memset(dst + j * row_bytes, 0, size_t(run * row_bytes));
    } else {
      while (j + run < count && src_of(j + run) == src + run * row_bytes) ++run;
      std::memcpy(dst + j * row_bytes, src, size_t(run * row_bytes));
    }
    j += run;
  }
}

// Rows per parallel task: at least ~64 KiB of copying, so small rows do not pay per-task overhead.
int64_t grain_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, row_bytes));
}

// (B, H, W, C) -> (B * nW, Wh, Ww, C)
at::Tensor partition(const at::Tensor& x, int64_t wh, int64_t ww, int64_t sy, int64_t sx, bool pad_then_roll) {
  SF_CPU_CHECK_INPUT(x, 4);
  SF_CPU_CHECK_CONTIGUOUS(x);
  const sf::WindowGeometry g = sf::cpu::window_geometry("window_partition", x.size(1), x.size(2), wh, ww, sy, sx,
                                                               pad_then_roll);
  const int64_t B = x.size(0), token_bytes = x.size(3) * int64_t(x.element_size());
  at::Tensor out = sf::cpu::pooled_empty({B * g.nW, wh, ww, x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // One task item: row i of window b_ (Ww tokens), all from image row y (or all padding).
  const int64_t window_rows = B * g.nW * wh;
  sf::cpu::parallel_for(window_rows, grain_rows(ww * token_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % wh, bw = r / wh, w = bw % g.nW, b = bw / g.nW;
      const int64_t y = sf::window_to_image(int((w / g.nWw) * wh + i), g.sy, g.H, g.Hp, pad_then_roll);
      const int64_t px0 = (w % g.nWw) * ww;
      const char* image_row = y < 0 ? nullptr : src + (b * g.H + y) * g.W * token_bytes;
      copy_runs(dst + r * ww * token_bytes, ww, token_bytes, [&](int64_t j) -> const char* {
        if (image_row == nullptr) return nullptr;
        const int64_t xx = sf::window_to_image(int(px0 + j), g.sx, g.W, g.Wp, pad_then_roll);
        return xx < 0 ? nullptr : image_row + xx * token_bytes;
      });
    }
  });
  return out;
}

// (B * nW, Wh, Ww, C) -> (B, H, W, C)
at::Tensor merge(const at::Tensor& windows, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy, int64_t sx,
                 bool pad_then_roll) {
  SF_CPU_CHECK_INPUT(windows, 4);
  SF_CPU_CHECK_CONTIGUOUS(windows);
  const sf::WindowGeometry g = sf::cpu::window_geometry("window_merge", H, W, wh, ww, sy, sx, pad_then_roll);
  TORCH_CHECK(windows.size(1) == wh && windows.size(2) == ww, "windows must have window dims (", wh, ", ", ww,
              "), got ", windows.sizes());
  TORCH_CHECK(windows.size(0) % g.nW == 0, "windows has ", windows.size(0), " windows, not a multiple of the ",
              g.nW, " windows of a ", H, "x", W, " image");
  const int64_t B = windows.size(0) / g.nW, token_bytes = windows.size(3) * int64_t(windows.element_size());
  at::Tensor out = sf::cpu::pooled_empty({B, H, W, windows.size(3)}, windows.options());
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(windows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // One task item: image row y of image b; its tokens come from one window row per window crossed.
  sf::cpu::parallel_for(B * H, grain_rows(W * token_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % H, b = r / H;
      const int64_t py = sf::image_to_window(int(y), g.sy, g.H, g.Hp, pad_then_roll);
      const int64_t window_row0 = b * g.nW + (py / wh) * g.nWw;  // first window of this row of windows
      const int64_t i = py % wh;
      copy_runs(dst + r * W * token_bytes, W, token_bytes, [&](int64_t xx) -> const char* {
        const int64_t px = sf::image_to_window(int(xx), g.sx, g.W, g.Wp, pad_then_roll);
        return src + (((window_row0 + px / ww) * wh + i) * ww + px % ww) * token_bytes;
      });
    }
  });
  return out;
}

// d(partition)/dx is the merge of the gradient, d(merge)/dwindows the partition of the gradient.
at::Tensor partition_backward(const at::Tensor& grad, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy,
                              int64_t sx, bool pad_then_roll) {
  return merge(grad, H, W, wh, ww, sy, sx, pad_then_roll);
}

at::Tensor merge_backward(const at::Tensor& grad, int64_t wh, int64_t ww, int64_t sy, int64_t sx, bool pad_then_roll) {
  return partition(grad, wh, ww, sy, sx, pad_then_roll);
}

}  // namespace

SF_CPU_LIBRARY(m) {
  m.def("window_partition_forward(Tensor x, int wh, int ww, int sy, int sx, bool pad_then_roll) -> Tensor");
  m.def("window_partition_backward(Tensor grad, int H, int W, int wh, int ww, int sy, int sx, "
        "bool pad_then_roll) -> Tensor");
  m.def("window_merge_forward(Tensor windows, int H, int W, int wh, int ww, int sy, int sx, "
        "bool pad_then_roll) -> Tensor");
  m.def("window_merge_backward(Tensor grad, int wh, int ww, int sy, int sx, bool pad_then_roll) -> Tensor");
}

SF_CPU_LIBRARY_IMPL(m) {
  m.impl("window_partition_forward", &partition);
  m.impl("window_partition_backward", &partition_backward);
  m.impl("window_merge_forward", &merge);
  m.impl("window_merge_backward", &merge_backward);
}
