// The geometry of Swin's shifted windows (SPEC.md section 1), one copy for every backend in C++:
// the CUDA window_partition / window_merge (csrc/ops/window_process.cu) and the CPU ones
// (csrc/cpu/window_process.cpp) and zero-copy attention (csrc/cpu/window_attention_tokens.h).
//
// x (B, H, W, C) is padded with zeros to Hp x Wp (multiples of the window Wh x Ww) and rolled by
// (-sy, -sx), in either order:
//   pad_then_roll (segmentation Swin / SeMask): the roll wraps around the padded Hp x Wp grid;
//   roll_then_pad (timm): the roll wraps around the H x W image, padding is added after.
// Window b * nW + wy * nWw + wx holds the padded-rolled pixels (wy * Wh + i, wx * Ww + j).
// Coordinates inside one image are int (window_geometry_error rules out Hp * Wp >= 2^31);
// offsets across images are the callers', in 64 bits.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SF_GEOMETRY_FN __host__ __device__ __forceinline__
#else
#define SF_GEOMETRY_FN inline
#endif

namespace sf {

struct WindowGeometry {
  int H, W;     // image
  int Hp, Wp;   // padded image
  int Wh, Ww;   // window
  int nWw, nW;  // windows per padded row, per image
  int sy, sx;   // roll (shift)
  bool pad_then_roll;
};

// Why these sizes have no geometry here, or nullptr: each language raises it its own way.
inline const char* window_geometry_error(int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy, int64_t sx) {
  if (H <= 0 || W <= 0 || wh <= 0 || ww <= 0) return "H, W and the window must be positive";
  if (sy < 0 || sx < 0 || sy >= wh || sx >= ww) return "the shift must be in [0, window)";
  if ((H + wh - 1) / wh * wh * ((W + ww - 1) / ww * ww) >= (int64_t(1) << 31))
    return "the padded image must have fewer than 2^31 pixels";
  return nullptr;
}

// Sizes without a window_geometry_error.
inline WindowGeometry make_window_geometry(int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sy, int64_t sx,
                                           bool pad_then_roll) {
  WindowGeometry g;
  g.H = int(H);
  g.W = int(W);
  g.Wh = int(wh);
  g.Ww = int(ww);
  g.Hp = int((H + wh - 1) / wh * wh);
  g.Wp = int((W + ww - 1) / ww * ww);
  g.nWw = g.Wp / g.Ww;
  g.nW = (g.Hp / g.Wh) * g.nWw;
  // Rolling the unpadded image (timm), a shift may exceed a tiny image: a roll by s is a roll by
  // s mod the axis length.
  g.sy = int(pad_then_roll ? sy : sy % H);
  g.sx = int(pad_then_roll ? sx : sx % W);
  g.pad_then_roll = pad_then_roll;
  return g;
}

// Image coordinate of the padded-rolled coordinate p along an axis of `size` image and `padded`
// positions, shift s; -1 for a pad position.
SF_GEOMETRY_FN int window_to_image(int p, int s, int size, int padded, bool pad_then_roll) {
  if (pad_then_roll) {
    const int q = p + s < padded ? p + s : p + s - padded;
    return q < size ? q : -1;
  }
  if (p >= size) return -1;
  return p + s < size ? p + s : p + s - size;
}

// Padded-rolled coordinate of image coordinate y (the inverse of window_to_image).
SF_GEOMETRY_FN int image_to_window(int y, int s, int size, int padded, bool pad_then_roll) {
  return y >= s ? y - s : y - s + (pad_then_roll ? padded : size);
}

// Window-frame position (py, px) -> image pixel (y, x), or false for a pad position.
SF_GEOMETRY_FN bool window_to_pixel(const WindowGeometry& g, int py, int px, int& y, int& x) {
  y = window_to_image(py, g.sy, g.H, g.Hp, g.pad_then_roll);
  x = window_to_image(px, g.sx, g.W, g.Wp, g.pad_then_roll);
  return y >= 0 && x >= 0;
}

// Image pixel (y, x) -> window-frame position (py, px).
SF_GEOMETRY_FN void pixel_to_window(const WindowGeometry& g, int y, int x, int& py, int& px) {
  py = image_to_window(y, g.sy, g.H, g.Hp, g.pad_then_roll);
  px = image_to_window(x, g.sx, g.W, g.Wp, g.pad_then_roll);
}

}  // namespace sf
