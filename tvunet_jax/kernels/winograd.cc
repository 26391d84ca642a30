// Winograd F(4x4, 3x3) convolutions for XLA:CPU, called from jax.jit through the XLA FFI.
//
// Owns two custom-call handlers for the U-Net's 3x3 'SAME' (pad 1), stride-1 float32 convolutions:
//   tvunet_winograd_conv   transposed=0: y = conv(x, w)      x (N,H,W,Ci), w (3,3,Ci,Co) -> y
//                                                           (N,H,W,Co)
//                          transposed=1: dx = conv^T(dy, w) dy (N,H,W,Co), w -> dx (N,H,W,Ci)
//   tvunet_winograd_wgrad  dw = x (*) dy                    x, dy -> dw (3,3,Ci,Co)
// i.e. lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
// and its two gradients.
//
// Why: a direct 3x3 convolution costs 9 multiply-adds per output pixel and channel pair, and
// oneDNN's direct kernels (onednn_conv.cc) already run near this CPU's matmul peak, so the only
// way left to a faster step is fewer multiplications. Winograd's minimal filtering algorithm
// (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks") computes a 4x4 output
// tile from a 6x6 input tile with 36 products instead of 144. Per call:
//   U = G w G^T             (36, Ci, Co)  weight transform (G: 6x3)
//   V = B^T d B             (36, T, Ci)   input transform of the T = N * ceil(H/4) * ceil(W/4)
//                                         overlapping 6x6 tiles (B^T: 6x6)
//   M[p] = V[p] U[p]        (36, T, Co)   36 independent GEMMs (oneDNN's sgemm)
//   y = A^T M A             tiles 4x4 of the output (A^T: 4x6), cropped at the right/bottom edge
// The input gradient is the same algorithm with the kernel rotated by 180 degrees and its channel
// axes swapped (done inside the weight transform and the GEMM's transpose flag), and the weight
// gradient is dU[p] = V[p]^T dM[p] with dM = A dY A^T, dw = G^T dU G. The sums are reassociated,
// so results differ from the direct convolution by float32 rounding amplified by the transforms'
// coefficients (relative error about 1e-5 instead of 1e-6; tests/test_winograd.py pins it). The
// Python side (conv.py) decides which layers use it: where the GEMMs are large enough to run
// near peak and the transforms' memory traffic is small next to them.
//
// Calls share onednn_conv.cc's execution lock (one kernel at a time; each already spreads over
// every core, through oneDNN's OpenMP pool for the GEMMs and OpenMP loops for the transforms) and
// three grow-only work buffers for V, M and U, sized by the largest layer.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace tvunet {
std::mutex& ExecutionLock();  // onednn_conv.cc
}  // namespace tvunet

namespace ffi = xla::ffi;

namespace {

// F(4x4, 3x3) (Lavin & Gray, section 4.2): B^T (6x6), G (6x3), A^T (4x6); kM output pixels per
// tile side from kA = kM + 2 input pixels.
constexpr int kM = 4, kA = 6;
constexpr float kBT[kA][kA] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                               {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr float kG[kA][3] = {{1.f / 4, 0, 0},
                             {-1.f / 6, -1.f / 6, -1.f / 6},
                             {-1.f / 6, 1.f / 6, -1.f / 6},
                             {1.f / 24, 1.f / 12, 1.f / 6},
                             {1.f / 24, -1.f / 12, 1.f / 6},
                             {0, 0, 1}};
constexpr float kAT[kM][kA] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0},
                               {0, 1, -1, 8, -8, 1}};

constexpr int kCB = 64;  // channels per vector block

struct Tiles {
  int64_t n, h, w, th, tw, t;
};
Tiles MakeTiles(int64_t n, int64_t h, int64_t w) {
  Tiles g{n, h, w, (h + kM - 1) / kM, (w + kM - 1) / kM, 0};
  g.t = n * g.th * g.tw;
  return g;
}

// x (N,H,W,C) -> V (36, T, C): V[i*6+j][t] = (B^T d B)[i][j], d the 6x6 patch at
// (4 ty - 1, 4 tx - 1), zero outside the image.
void InputTransform(const float* x, const Tiles& g, int64_t c, float* v) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < g.t; ++t) {
    const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    alignas(64) float d[kA][kA][kCB];
    alignas(64) float s[kA][kA][kCB];
    for (int64_t c0 = 0; c0 < c; c0 += kCB) {
      const int cb = static_cast<int>(std::min<int64_t>(kCB, c - c0));
      for (int i = 0; i < kA; ++i) {
        const int64_t r = ty * kM - 1 + i;
        for (int j = 0; j < kA; ++j) {
          const int64_t col = tx * kM - 1 + j;
          if (r < 0 || r >= g.h || col < 0 || col >= g.w) {
            std::memset(d[i][j], 0, sizeof(float) * cb);
          } else {
            std::memcpy(d[i][j], x + ((n * g.h + r) * g.w + col) * c + c0, sizeof(float) * cb);
          }
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < kA; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < kA; ++j) {
          float* out = s[i][j];
          for (int q = 0; q < cb; ++q) out[q] = 0.f;
#pragma GCC unroll 8
          for (int k = 0; k < kA; ++k) {
            const float f = kBT[i][k];
            if (f == 0.f) continue;
            for (int q = 0; q < cb; ++q) out[q] += f * d[k][j][q];
          }
        }
#pragma GCC unroll 8
      for (int i = 0; i < kA; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < kA; ++j) {
          float* out = v + ((i * kA + j) * g.t + t) * c + c0;
          alignas(64) float acc[kCB] = {};
#pragma GCC unroll 8
          for (int k = 0; k < kA; ++k) {
            const float f = kBT[j][k];
            if (f == 0.f) continue;
            for (int q = 0; q < cb; ++q) acc[q] += f * s[i][k][q];
          }
          std::memcpy(out, acc, sizeof(float) * cb);
        }
    }
  }
}

// M (36, T, C) -> y (N,H,W,C): y tile = AT Mtile AT^T, cropped to H x W.
void OutputTransform(const float* mm, const Tiles& g, int64_t c, float* y) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < g.t; ++t) {
    const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    alignas(64) float s[kM][kA][kCB];
    for (int64_t c0 = 0; c0 < c; c0 += kCB) {
      const int cb = static_cast<int>(std::min<int64_t>(kCB, c - c0));
#pragma GCC unroll 8
      for (int i = 0; i < kM; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < kA; ++j) {
          float* out = s[i][j];
          for (int q = 0; q < cb; ++q) out[q] = 0.f;
#pragma GCC unroll 8
          for (int k = 0; k < kA; ++k) {
            const float f = kAT[i][k];
            if (f == 0.f) continue;
            const float* in = mm + ((k * kA + j) * g.t + t) * c + c0;
            for (int q = 0; q < cb; ++q) out[q] += f * in[q];
          }
        }
      for (int i = 0; i < kM; ++i) {
        const int64_t r = ty * kM + i;
        if (r >= g.h) break;
        for (int j = 0; j < kM; ++j) {
          const int64_t col = tx * kM + j;
          if (col >= g.w) break;
          alignas(64) float acc[kCB] = {};
#pragma GCC unroll 8
          for (int k = 0; k < kA; ++k) {
            const float f = kAT[j][k];
            if (f == 0.f) continue;
            for (int q = 0; q < cb; ++q) acc[q] += f * s[i][k][q];
          }
          std::memcpy(y + ((n * g.h + r) * g.w + col) * c + c0, acc, sizeof(float) * cb);
        }
      }
    }
  }
}

// dy (N,H,W,C) -> dM (36, T, C): dM tile = AT^T dYtile AT (the transpose of OutputTransform).
void OutputTransformT(const float* dy, const Tiles& g, int64_t c, float* dm) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < g.t; ++t) {
    const int64_t n = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
    alignas(64) float d[kM][kM][kCB];
    alignas(64) float s[kA][kM][kCB];
    for (int64_t c0 = 0; c0 < c; c0 += kCB) {
      const int cb = static_cast<int>(std::min<int64_t>(kCB, c - c0));
      for (int i = 0; i < kM; ++i) {
        const int64_t r = ty * kM + i;
        for (int j = 0; j < kM; ++j) {
          const int64_t col = tx * kM + j;
          if (r >= g.h || col >= g.w) {
            std::memset(d[i][j], 0, sizeof(float) * cb);
          } else {
            std::memcpy(d[i][j], dy + ((n * g.h + r) * g.w + col) * c + c0, sizeof(float) * cb);
          }
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < kA; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < kM; ++j) {
          float* out = s[i][j];
          for (int q = 0; q < cb; ++q) out[q] = 0.f;
#pragma GCC unroll 8
          for (int k = 0; k < kM; ++k) {
            const float f = kAT[k][i];
            if (f == 0.f) continue;
            for (int q = 0; q < cb; ++q) out[q] += f * d[k][j][q];
          }
        }
#pragma GCC unroll 8
      for (int i = 0; i < kA; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < kA; ++j) {
          alignas(64) float acc[kCB] = {};
#pragma GCC unroll 8
          for (int k = 0; k < kM; ++k) {
            const float f = kAT[k][j];
            if (f == 0.f) continue;
            for (int q = 0; q < cb; ++q) acc[q] += f * s[i][k][q];
          }
          std::memcpy(dm + ((i * kA + j) * g.t + t) * c + c0, acc, sizeof(float) * cb);
        }
    }
  }
}

// w (3,3,Ci,Co) -> U (36, Ci, Co) = G w G^T; flip: the 180-degree rotated kernel (for dgrad).
void WeightTransform(const float* w, int64_t ci, int64_t co, bool flip, float* u) {
  const int64_t plane = ci * co;
#pragma omp parallel for schedule(static)
  for (int64_t e0 = 0; e0 < plane; e0 += kCB) {
    const int cb = static_cast<int>(std::min<int64_t>(kCB, plane - e0));
    alignas(64) float s[kA][3][kCB];
    for (int i = 0; i < kA; ++i)
      for (int l = 0; l < 3; ++l) {
        for (int q = 0; q < cb; ++q) s[i][l][q] = 0.f;
        for (int k = 0; k < 3; ++k) {
          const float f = kG[i][flip ? 2 - k : k];
          if (f == 0.f) continue;
          const float* in = w + (k * 3 + l) * plane + e0;
          for (int q = 0; q < cb; ++q) s[i][l][q] += f * in[q];
        }
      }
    for (int i = 0; i < kA; ++i)
      for (int j = 0; j < kA; ++j) {
        alignas(64) float acc[kCB] = {};
        for (int l = 0; l < 3; ++l) {
          const float f = kG[j][flip ? 2 - l : l];
          if (f == 0.f) continue;
          for (int q = 0; q < cb; ++q) acc[q] += f * s[i][l][q];
        }
        std::memcpy(u + (i * kA + j) * plane + e0, acc, sizeof(float) * cb);
      }
  }
}

// dU (36, Ci, Co) -> dw (3,3,Ci,Co) = G^T dU G.
void WeightTransformT(const float* du, int64_t ci, int64_t co, float* dw) {
  const int64_t plane = ci * co;
#pragma omp parallel for schedule(static)
  for (int64_t e0 = 0; e0 < plane; e0 += kCB) {
    const int cb = static_cast<int>(std::min<int64_t>(kCB, plane - e0));
    alignas(64) float s[3][kA][kCB];
    for (int k = 0; k < 3; ++k)
      for (int j = 0; j < kA; ++j) {
        for (int q = 0; q < cb; ++q) s[k][j][q] = 0.f;
        for (int i = 0; i < kA; ++i) {
          const float f = kG[i][k];
          if (f == 0.f) continue;
          const float* in = du + (i * kA + j) * plane + e0;
          for (int q = 0; q < cb; ++q) s[k][j][q] += f * in[q];
        }
      }
    for (int k = 0; k < 3; ++k)
      for (int l = 0; l < 3; ++l) {
        alignas(64) float acc[kCB] = {};
        for (int j = 0; j < kA; ++j) {
          const float f = kG[j][l];
          if (f == 0.f) continue;
          for (int q = 0; q < cb; ++q) acc[q] += f * s[k][j][q];
        }
        std::memcpy(dw + (k * 3 + l) * plane + e0, acc, sizeof(float) * cb);
      }
  }
}

struct Buffer {
  float* ptr = nullptr;
  size_t size = 0;
  float* Get(size_t floats) {
    const size_t bytes = std::max<size_t>(floats, 1) * sizeof(float);
    if (bytes > size || ptr == nullptr) {
      std::free(ptr);
      size = (bytes + 4095) / 4096 * 4096;
      ptr = static_cast<float*>(std::aligned_alloc(64, size));
      if (ptr == nullptr) {
        size = 0;
        throw std::bad_alloc();
      }
    }
    return ptr;
  }
};

void Gemm(char ta, char tb, int64_t M_, int64_t N_, int64_t K_, const float* A, int64_t lda,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (dnnl_sgemm(ta, tb, M_, N_, K_, 1.f, A, lda, B, ldb, 0.f, C, ldc) != dnnl_success)
    throw std::runtime_error("dnnl_sgemm failed");
}

// The work buffers, shared by both handlers (they run under the execution lock).
struct Work {
  Buffer v, m, u;
};
Work& Buffers() {
  static Work* work = new Work;
  return *work;
}

// y = conv(x, w) (transposed false: x (N,H,W,Ci) -> y (N,H,W,Co)) or dx = conv^T(dy, w)
// (transposed true: x is dy (N,H,W,Co), y is dx (N,H,W,Ci)); w (3,3,Ci,Co) either way.
void Conv(const float* x, const float* w, float* y, int64_t n, int64_t h, int64_t wd, int64_t ci,
          int64_t co, bool transposed) {
  const Tiles g = MakeTiles(n, h, wd);
  if (g.t == 0) return;  // an empty batch: an empty output
  const int64_t cin = transposed ? co : ci, cout = transposed ? ci : co;
  Work& work = Buffers();
  float* v = work.v.Get(kA * kA * g.t * cin);
  float* mm = work.m.Get(kA * kA * g.t * cout);
  float* u = work.u.Get(kA * kA * ci * co);
  WeightTransform(w, ci, co, transposed, u);
  InputTransform(x, g, cin, v);
  for (int p = 0; p < kA * kA; ++p) {
    if (!transposed) {  // M (T, Co) = V (T, Ci) @ U (Ci, Co)
      Gemm('N', 'N', g.t, co, ci, v + p * g.t * ci, ci, u + p * ci * co, co, mm + p * g.t * co, co);
    } else {  // dM' (T, Ci) = dYV (T, Co) @ U'^T, U' (Ci, Co) the rotated kernel's transform
      Gemm('N', 'T', g.t, ci, co, v + p * g.t * co, co, u + p * ci * co, co, mm + p * g.t * ci, ci);
    }
  }
  OutputTransform(mm, g, cout, y);
}

// dw (3,3,Ci,Co) from x (N,H,W,Ci) and dy (N,H,W,Co).
void WeightGrad(const float* x, const float* dy, float* dw, int64_t n, int64_t h, int64_t wd,
                int64_t ci, int64_t co) {
  const Tiles g = MakeTiles(n, h, wd);
  if (g.t == 0) {  // an empty batch: no tiles, a zero gradient
    std::memset(dw, 0, sizeof(float) * 9 * ci * co);
    return;
  }
  Work& work = Buffers();
  float* v = work.v.Get(kA * kA * g.t * ci);
  float* dm = work.m.Get(kA * kA * g.t * co);
  float* du = work.u.Get(kA * kA * ci * co);
  InputTransform(x, g, ci, v);
  OutputTransformT(dy, g, co, dm);
  for (int p = 0; p < kA * kA; ++p) {  // dU (Ci, Co) = V^T (Ci, T) @ dM (T, Co)
    Gemm('T', 'N', ci, co, g.t, v + p * g.t * ci, ci, dm + p * g.t * co, co, du + p * ci * co, co);
  }
  WeightTransformT(du, ci, co, dw);
}

std::string Shape(ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + ")";
}

ffi::Error ConvHandler(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t transposed) {
  const auto xd = x.dimensions(), wdims = w.dimensions(), yd = y->dimensions();
  const bool ok = xd.size() == 4 && wdims.size() == 4 && yd.size() == 4 && wdims[0] == 3 &&
                  wdims[1] == 3 && xd[3] == wdims[transposed ? 3 : 2] &&
                  yd[3] == wdims[transposed ? 2 : 3] && yd[0] == xd[0] && yd[1] == xd[1] &&
                  yd[2] == xd[2];
  if (!ok) {
    return ffi::Error::InvalidArgument("tvunet winograd conv: inconsistent shapes x" +
                                       Shape(xd) + " w" + Shape(wdims) + " y" + Shape(yd));
  }
  try {
    std::lock_guard<std::mutex> lock(tvunet::ExecutionLock());
    Conv(x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], xd[2], wdims[2],
            wdims[3], transposed != 0);
  } catch (const std::exception& e) {  // std::bad_alloc, a failed sgemm
    return ffi::Error::Internal(std::string("tvunet winograd conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error WgradHandler(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), wdims = dw->dimensions();
  const bool ok = xd.size() == 4 && yd.size() == 4 && wdims.size() == 4 && wdims[0] == 3 &&
                  wdims[1] == 3 && wdims[2] == xd[3] && wdims[3] == yd[3] && yd[0] == xd[0] &&
                  yd[1] == xd[1] && yd[2] == xd[2];
  if (!ok) {
    return ffi::Error::InvalidArgument("tvunet winograd weight grad: inconsistent shapes x" +
                                       Shape(xd) + " dy" + Shape(yd) + " dw" + Shape(wdims));
  }
  try {
    std::lock_guard<std::mutex> lock(tvunet::ExecutionLock());
    WeightGrad(x.typed_data(), dy.typed_data(), dw->typed_data(), xd[0], xd[1], xd[2], xd[3],
                  yd[3]);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("tvunet winograd weight grad: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_winograd_conv, ConvHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transposed"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_winograd_wgrad, WgradHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
