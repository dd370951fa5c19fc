// window_partition / window_merge, forward and backward: pad + roll + partition and its inverse
// as single gather copies (SPEC.md section 1).
//
// Geometry (padding, roll in either order, window order): csrc/common/sf_window_geometry.h.
//
// The two kernels are the two directions of one bijection between image pixels and the non-pad
// window positions: partition gathers windows from the image (zeros at pad positions), merge
// gathers the image from the windows.  merge is the gradient of partition and vice versa.
//
// Pure copies, so the kernels move bytes: each thread copies one vector V (16, 8, 4 or 2 bytes) of
// a token's C channels; the widest V that divides the row size and the pointers' alignment is
// used.  dtype does not matter (bitwise exact for every dtype).  Index math runs in I = int64_t
// when the tensor has 2^31 vectors or more, else in int32_t (64-bit division is many instructions
// on a GPU); coordinates inside one image are int.
#include "../common/sf_window_geometry.h"
#include "sf_common.cuh"

namespace {

using sf::pixel_to_window;
using sf::window_to_pixel;

// out: (B * nW, Wh, Ww, vpt) vectors, x: (B, H, W, vpt).
template <typename V, typename I>
__global__ void __launch_bounds__(256) partition_kernel(const V* __restrict__ x, V* __restrict__ out,
                                                        sf::WindowGeometry g, int vpt, I total) {
  const I stride = I(gridDim.x) * blockDim.x;
  for (I o = I(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += stride) {
    const I token = o / vpt;
    const int v = int(o - token * vpt);
    const int j = int(token % g.Ww);
    const I t = token / g.Ww;
    const int i = int(t % g.Wh);
    const I bw = t / g.Wh;  // window row b_
    const int w = int(bw % g.nW);
    const I b = bw / g.nW;
    int y, xx;
    V value{};
    if (window_to_pixel(g, (w / g.nWw) * g.Wh + i, (w % g.nWw) * g.Ww + j, y, xx)) {
      value = x[((b * g.H + y) * g.W + xx) * vpt + v];
    }
    out[o] = value;
  }
}

// out: (B, H, W, vpt) vectors, windows: (B * nW, Wh, Ww, vpt).
template <typename V, typename I>
__global__ void __launch_bounds__(256) merge_kernel(const V* __restrict__ windows, V* __restrict__ out,
                                                    sf::WindowGeometry g, int vpt, I total) {
  const I stride = I(gridDim.x) * blockDim.x;
  for (I o = I(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += stride) {
    const I pixel = o / vpt;
    const int v = int(o - pixel * vpt);
    const int x = int(pixel % g.W);
    const I t = pixel / g.W;
    const int y = int(t % g.H);
    const I b = t / g.H;
    int py, px;
    pixel_to_window(g, y, x, py, px);
    const I bw = b * g.nW + (py / g.Wh) * g.nWw + px / g.Ww;
    out[o] = windows[((bw * g.Wh + py % g.Wh) * g.Ww + px % g.Ww) * vpt + v];
  }
}

constexpr int kThreads = 256;
// Enough resident blocks to saturate memory bandwidth on an H100 (132 SMs x 8 blocks of 256);
// larger inputs loop (grid-stride).
constexpr int64_t kMaxBlocks = 132 * 8;

// Copies every token row (row_bytes bytes) of the gather; kMerge picks the direction.
template <bool kMerge>
void launch_copy(const void* src, void* dst, const sf::WindowGeometry& g, int64_t tokens, int64_t src_tokens,
                 int64_t row_bytes, cudaStream_t stream) {
  // Widest vector dividing the row and both pointers' alignment.
  const auto align = uintptr_t(src) | uintptr_t(dst) | uintptr_t(row_bytes);
  const int vbytes = (align % 16 == 0) ? 16 : (align % 8 == 0) ? 8 : (align % 4 == 0) ? 4 : 2;
  const int vpt = int(row_bytes / vbytes);
  const int64_t total = tokens * vpt;
  if (total == 0) return;
  const int blocks = int(std::min<int64_t>(sf::ceil_div(total, kThreads), kMaxBlocks));
  // int32 if every index fits: the source's (merge reads the larger, padded windows) and the
  // grid-stride loop's last step past total.
  const bool wide = std::max(total, src_tokens * vpt) + int64_t(blocks) * kThreads >= (int64_t(1) << 31);
  auto run = [&](auto vector) {
    using V = decltype(vector);
    if (wide) {
      auto kernel = kMerge ? merge_kernel<V, int64_t> : partition_kernel<V, int64_t>;
      SF_LAUNCH(kernel, blocks, kThreads, 0, stream, static_cast<const V*>(src), static_cast<V*>(dst), g, vpt, total);
    } else {
      auto kernel = kMerge ? merge_kernel<V, int32_t> : partition_kernel<V, int32_t>;
      SF_LAUNCH(kernel, blocks, kThreads, 0, stream, static_cast<const V*>(src), static_cast<V*>(dst), g, vpt,
                int32_t(total));
    }
  };
  switch (vbytes) {
    case 16: run(uint4{}); break;
    case 8: run(uint2{}); break;
    case 4: run(uint32_t{}); break;
    default: run(uint16_t{});
  }
  SF_CHECK_LAUNCH();
}

sf::WindowGeometry make_geometry(int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy, int64_t sx,
                                 bool pad_then_roll) {
  const char* error = sf::window_geometry_error(H, W, wh, ww, sy, sx);
  SF_CHECK(error == nullptr, "window_process: ", error);
  return sf::make_window_geometry(H, W, wh, ww, sy, sx, pad_then_roll);
}

}  // namespace

#include "sf_torch.h"

namespace {

// (B, H, W, C) -> (B * nW, Wh, Ww, C)
at::Tensor partition(const at::Tensor& x, int64_t wh, int64_t ww, int64_t sy, int64_t sx, bool pad_then_roll) {
  SF_CHECK_INPUT(x, 4);
  SF_DEVICE_GUARD(x);
  const sf::WindowGeometry g = make_geometry(x.size(1), x.size(2), wh, ww, sy, sx, pad_then_roll);
  const int64_t B = x.size(0), C = x.size(3);
  at::Tensor out = at::empty({B * g.nW, wh, ww, C}, x.options());
  launch_copy<false>(x.data_ptr(), out.data_ptr(), g, B * g.nW * wh * ww, B * g.H * g.W,
                     C * int64_t(x.element_size()), sf::current_stream());
  return out;
}

// (B * nW, Wh, Ww, C) -> (B, H, W, C)
at::Tensor merge(const at::Tensor& windows, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy, int64_t sx,
                 bool pad_then_roll) {
  SF_CHECK_INPUT(windows, 4);
  SF_DEVICE_GUARD(windows);
  const sf::WindowGeometry g = make_geometry(H, W, wh, ww, sy, sx, pad_then_roll);
  TORCH_CHECK(windows.size(1) == wh && windows.size(2) == ww, "windows must have window dims (", wh, ", ", ww,
              "), got ", windows.sizes());
  TORCH_CHECK(windows.size(0) % g.nW == 0, "windows has ", windows.size(0), " windows, not a multiple of ", g.nW);
  const int64_t B = windows.size(0) / g.nW, C = windows.size(3);
  at::Tensor out = at::empty({B, H, W, C}, windows.options());
  launch_copy<true>(windows.data_ptr(), out.data_ptr(), g, B * H * W, windows.size(0) * wh * ww,
                    C * int64_t(windows.element_size()), sf::current_stream());
  return out;
}

// d(partition)/dx is merge of the gradient, and d(merge)/dwindows is partition of the gradient.
at::Tensor partition_backward(const at::Tensor& grad, int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy,
                              int64_t sx, bool pad_then_roll) {
  return merge(grad, H, W, wh, ww, sy, sx, pad_then_roll);
}

at::Tensor merge_backward(const at::Tensor& grad, int64_t wh, int64_t ww, int64_t sy, int64_t sx, bool pad_then_roll) {
  return partition(grad, wh, ww, sy, sx, pad_then_roll);
}

}  // namespace

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("window_partition_forward(Tensor x, int wh, int ww, int sy, int sx, bool pad_then_roll) -> Tensor");
  m.def("window_partition_backward(Tensor grad, int H, int W, int wh, int ww, int sy, int sx, "
        "bool pad_then_roll) -> Tensor");
  m.def("window_merge_forward(Tensor windows, int H, int W, int wh, int ww, int sy, int sx, "
        "bool pad_then_roll) -> Tensor");
  m.def("window_merge_backward(Tensor grad, int wh, int ww, int sy, int sx, bool pad_then_roll) -> Tensor");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("window_partition_forward", &partition);
  m.impl("window_partition_backward", &partition_backward);
  m.impl("window_merge_forward", &merge);
  m.impl("window_merge_backward", &merge_backward);
}
