// oneDNN 2D convolutions for XLA:CPU, called from jax.jit through the XLA FFI.
//
// Owns six custom-call handlers. Three for stride-1, undilated, ungrouped convolutions with
// explicit (top, bottom, left, right) zero padding (the U-Net's 3x3 convs and 1x1 head):
//   tvunet_onednn_conv_fwd          y  = conv(x, w)     x (N,H,W,Ci), w (KH,KW,Ci,Co) -> y
//                                                       (N,Ho,Wo,Co)
//   tvunet_onednn_conv_bwd_data     dx = conv^T(dy, w)  dy (N,Ho,Wo,Co), w -> dx (N,H,W,Ci)
//   tvunet_onednn_conv_bwd_weights  dw = x (*) dy       x, dy -> dw (KH,KW,Ci,Co), always float32
// with Ho = H + top + bottom - KH + 1 (same for W), i.e. exactly lax.conv_general_dilated with
// dimension_numbers ('NHWC', 'HWIO', 'NHWC'). And the same three for oneDNN's transposed
// convolution ("deconvolution", the U-Net's 3x3 stride-2 up-sampling), with one more attribute,
// `stride`:
//   tvunet_onednn_deconv_fwd / _bwd_data / _bwd_weights
// where y[s*i - top + k] += x[i] w[k] per spatial axis and Ho = (H - 1) * s - top - bottom + KH;
// the Python side flips the kernel and converts lax.conv_transpose's padding to this convention.
// Activations are float32 or bfloat16 (oneDNN accumulates in float32). Activations stay in JAX's
// NHWC layout; the weights are reordered per call into the layout oneDNN's kernel prefers (as
// PyTorch does), since they are small next to the activations at every level but the bottleneck.
//
// Primitives are built once per (op, dtype, shape, padding, stride) and cached. Calls run one at a
// time: each already spreads over every core through oneDNN's OpenMP pool, so letting XLA run two
// at once (a layer's independent input and weight gradients, or several devices of one host) would
// only oversubscribe the cores (measured: no gain), and one set of work buffers, sized by the
// largest layer, serves every call instead of one set per XLA thread. All primitives, reorders
// included, take their scratchpad from that set (oneDNN's "user" scratchpad mode), so none
// depends on oneDNN's per-thread library scratchpad. A few extern "C" helpers (version, chosen
// implementation) serve the Python wrapper, the tests and the benchmark through ctypes.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace tvunet {
// One kernel at a time, this file's and winograd.cc's (see above).
std::mutex& ExecutionLock() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}
}  // namespace tvunet

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;

// Ops 0-2: stride-1 convolution. Ops 3-5: the same three for a transposed convolution
// (oneDNN's "deconvolution") of any stride.
enum Op : int {
  kFwd = 0, kBwdData = 1, kBwdWeights = 2, kDeconvFwd = 3, kDeconvBwdData = 4,
  kDeconvBwdWeights = 5
};

bool IsDeconv(Op op) { return op >= kDeconvFwd; }
// The same op with the deconvolution offset removed: what the three code paths switch on.
Op Kind(Op op) { return static_cast<Op>(op % 3); }

struct Geometry {
  int64_t n, h, w, ci, kh, kw, co, ho, wo;
  int64_t top, bottom, left, right;
  int64_t stride = 1;  // deconvolution only; convolutions are stride 1
};

// Output extent of a convolution (stride 1) or transposed convolution (stride s) along one axis.
int64_t OutSize(bool deconv, int64_t in, int64_t k, int64_t lo, int64_t hi, int64_t s) {
  return deconv ? (in - 1) * s - lo - hi + k : in + lo + hi - k + 1;
}

struct Entry {
  dnnl::primitive prim;
  memory::desc wei_prim_md;  // weights (or weight gradient) as the primitive wants them
  memory::desc wei_user_md;  // the same in JAX's HWIO layout
  bool reorder = false;
  dnnl::reorder wei_reorder;  // user -> primitive (fwd, bwd data); primitive -> user (bwd weights)
  // Weight gradient only: activation layouts the primitive wants, and NHWC -> those reorders.
  memory::desc x_prim_md, dy_prim_md;
  bool reorder_x = false, reorder_dy = false;
  dnnl::reorder x_reorder, dy_reorder;
  size_t scratch_bytes = 0;  // the largest scratchpad of the primitive and its reorders
  std::string impl;
};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// A 64-byte aligned, grow-only work buffer (used under the execution lock only).
struct Buffer {
  void* ptr = nullptr;
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size || ptr == nullptr) {
      std::free(ptr);
      size = (std::max<size_t>(bytes, 1) + 4095) / 4096 * 4096;
      ptr = std::aligned_alloc(64, size);
      if (ptr == nullptr) {
        size = 0;
        throw std::bad_alloc();
      }
    }
    return ptr;
  }
};

dnnl::reorder MakeReorder(const memory::desc& from, const memory::desc& to, size_t* scratch) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, attr);
  *scratch = std::max(*scratch, pd.scratchpad_desc().get_size());
  return dnnl::reorder(pd);
}

// The three primitive descriptors of a convolution or a deconvolution, behind one interface.
template <class Fwd, class BwdData, class BwdWeights>
std::shared_ptr<Entry> BuildOp(Op op, dnnl::algorithm alg, memory::data_type dt,
                               const Geometry& g) {
  const memory::dims src_dims = {g.n, g.ci, g.h, g.w};
  const memory::dims wei_dims = {g.co, g.ci, g.kh, g.kw};
  const memory::dims dst_dims = {g.n, g.co, g.ho, g.wo};
  const memory::dims strides = {g.stride, g.stride};
  const memory::dims pad_l = {g.top, g.left};
  const memory::dims pad_r = {g.bottom, g.right};
  const memory::desc src_md(src_dims, dt, tag::nhwc);
  const memory::desc dst_md(dst_dims, dt, tag::nhwc);
  const memory::desc wei_any(wei_dims, dt, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  const auto fwd_pd = typename Fwd::primitive_desc(Engine(), dnnl::prop_kind::forward_training,
                                                   alg, src_md, wei_any, dst_md, strides, pad_l,
                                                   pad_r, attr);
  auto e = std::make_shared<Entry>();
  const Op kind = Kind(op);
  if (kind == kFwd) {
    e->prim = Fwd(fwd_pd);
    e->wei_prim_md = fwd_pd.weights_desc();
    e->wei_user_md = memory::desc(wei_dims, dt, tag::hwio);
    e->scratch_bytes = std::max(e->scratch_bytes, fwd_pd.scratchpad_desc().get_size());
    e->impl = fwd_pd.impl_info_str();
  } else if (kind == kBwdData) {
    const auto pd = typename BwdData::primitive_desc(Engine(), alg, src_md, wei_any, dst_md,
                                                     strides, pad_l, pad_r, fwd_pd, attr);
    e->prim = BwdData(pd);
    e->wei_prim_md = pd.weights_desc();
    e->wei_user_md = memory::desc(wei_dims, dt, tag::hwio);
    e->scratch_bytes = std::max(e->scratch_bytes, pd.scratchpad_desc().get_size());
    e->impl = pd.impl_info_str();
  } else {
    // The weight gradient lets oneDNN pick the activation layout too: on AVX2 its NHWC kernel is
    // 4x slower than its blocked (nChw8c) one, which is worth two activation reorders.
    const memory::desc dwei_any(wei_dims, memory::data_type::f32, tag::any);
    const memory::desc src_any(src_dims, dt, tag::any), dst_any(dst_dims, dt, tag::any);
    const auto pd = typename BwdWeights::primitive_desc(Engine(), alg, src_any, dwei_any, dst_any,
                                                        strides, pad_l, pad_r, fwd_pd, attr);
    e->prim = BwdWeights(pd);
    e->x_prim_md = pd.src_desc();
    e->dy_prim_md = pd.diff_dst_desc();
    e->reorder_x = e->x_prim_md != src_md;
    e->reorder_dy = e->dy_prim_md != dst_md;
    if (e->reorder_x) e->x_reorder = MakeReorder(src_md, e->x_prim_md, &e->scratch_bytes);
    if (e->reorder_dy) e->dy_reorder = MakeReorder(dst_md, e->dy_prim_md, &e->scratch_bytes);
    e->wei_prim_md = pd.diff_weights_desc();
    e->wei_user_md = memory::desc(wei_dims, memory::data_type::f32, tag::hwio);
    e->scratch_bytes = std::max(e->scratch_bytes, pd.scratchpad_desc().get_size());
    e->impl = pd.impl_info_str();
  }
  e->reorder = e->wei_prim_md != e->wei_user_md;
  if (e->reorder) {
    e->wei_reorder = kind == kBwdWeights
                         ? MakeReorder(e->wei_prim_md, e->wei_user_md, &e->scratch_bytes)
                         : MakeReorder(e->wei_user_md, e->wei_prim_md, &e->scratch_bytes);
  }
  return e;
}

std::shared_ptr<Entry> Build(Op op, bool bf16, const Geometry& g) {
  const auto dt = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  if (IsDeconv(op)) {
    return BuildOp<dnnl::deconvolution_forward, dnnl::deconvolution_backward_data,
                   dnnl::deconvolution_backward_weights>(
        op, dnnl::algorithm::deconvolution_direct, dt, g);
  }
  return BuildOp<dnnl::convolution_forward, dnnl::convolution_backward_data,
                 dnnl::convolution_backward_weights>(op, dnnl::algorithm::convolution_direct, dt,
                                                     g);
}

std::shared_ptr<Entry> Lookup(Op op, bool bf16, const Geometry& g) {
  static std::mutex* mu = new std::mutex;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Entry>>;
  std::ostringstream key;
  key << op << ',' << bf16;
  for (int64_t v : {g.n, g.h, g.w, g.ci, g.kh, g.kw, g.co, g.top, g.bottom, g.left, g.right,
                    g.stride}) {
    key << ',' << v;
  }
  {
    std::lock_guard<std::mutex> lock(*mu);
    auto it = cache->find(key.str());
    if (it != cache->end()) return it->second;
  }
  auto entry = Build(op, bf16, g);  // outside the lock: building can take milliseconds
  std::lock_guard<std::mutex> lock(*mu);
  return cache->emplace(key.str(), entry).first->second;
}

std::string Shape(ffi::AnyBuffer::Dimensions d) {
  std::ostringstream s;
  s << '(';
  for (size_t i = 0; i < d.size(); ++i) s << (i ? "," : "") << d[i];
  s << ')';
  return s.str();
}

// Reads the geometry from the operands of `op` and checks that it is consistent.
ffi::Error Geometry4(Op op, const ffi::AnyBuffer& a, const ffi::AnyBuffer& b,
                     const ffi::AnyBuffer& out, int64_t top, int64_t bottom, int64_t left,
                     int64_t right, int64_t stride, Geometry* g) {
  const auto da = a.dimensions(), db = b.dimensions(), dout = out.dimensions();
  if (da.size() != 4 || db.size() != 4 || dout.size() != 4) {
    return ffi::Error::InvalidArgument("tvunet oneDNN conv: operands must be rank 4");
  }
  if (top < 0 || bottom < 0 || left < 0 || right < 0 || stride < 1) {
    return ffi::Error::InvalidArgument(
        "tvunet oneDNN conv: padding must be non-negative and stride positive");
  }
  // a, b, out per op: fwd (x, w, y); bwd data (dy, w, dx); bwd weights (x, dy, dw).
  const Op kind = Kind(op);
  const bool deconv = IsDeconv(op);
  const auto& x = kind == kBwdData ? dout : da;
  const auto& w = kind == kBwdWeights ? dout : db;
  const auto& y = kind == kFwd ? dout : (kind == kBwdData ? da : db);
  *g = Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
                top,  bottom, left, right, stride};
  if (y[0] != g->n || w[2] != g->ci || y[3] != g->co ||
      g->ho != OutSize(deconv, g->h, g->kh, top, bottom, stride) ||
      g->wo != OutSize(deconv, g->w, g->kw, left, right, stride) || g->ho <= 0 || g->wo <= 0) {
    return ffi::Error::InvalidArgument("tvunet oneDNN conv: inconsistent shapes x" + Shape(x) +
                                       " w" + Shape(w) + " y" + Shape(y));
  }
  return ffi::Error::Success();
}

ffi::Error Run(Op op, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               int64_t top, int64_t bottom, int64_t left, int64_t right, int64_t stride = 1) {
  const auto dt = a.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("tvunet oneDNN conv: dtype must be float32 or bfloat16");
  }
  if (b.element_type() != dt ||
      out->element_type() != (Kind(op) == kBwdWeights ? ffi::DataType::F32 : dt)) {
    return ffi::Error::InvalidArgument("tvunet oneDNN conv: mismatched dtypes");
  }
  Geometry g;
  if (auto err = Geometry4(op, a, b, *out, top, bottom, left, right, stride, &g);
      !err.success()) {
    return err;
  }
  try {
    const auto entry = Lookup(op, dt == ffi::DataType::BF16, g);
    static auto* scratch = new Buffer;
    static auto* weights = new Buffer;
    static auto* x_buf = new Buffer;
    static auto* dy_buf = new Buffer;
    static dnnl::stream* stream = nullptr;
    std::lock_guard<std::mutex> lock(tvunet::ExecutionLock());
    auto& eng = Engine();
    if (stream == nullptr) stream = new dnnl::stream(eng);
    const auto adt = dt == ffi::DataType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
    const memory::desc x_md({g.n, g.ci, g.h, g.w}, adt, tag::nhwc);
    const memory::desc y_md({g.n, g.co, g.ho, g.wo}, adt, tag::nhwc);
    // One scratchpad serves the primitive and its reorders: they run one after another on the
    // in-order CPU stream. Described as a byte array of the largest size any of them needs.
    const memory::desc scratch_md({static_cast<memory::dim>(std::max<size_t>(
                                      entry->scratch_bytes, 1))},
                                  memory::data_type::u8, tag::a);
    memory scratch_mem(scratch_md, eng, scratch->Get(entry->scratch_bytes));
    auto reorder = [&](dnnl::reorder& r, memory& from, memory& to) {
      r.execute(*stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                          {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    };
    const Op kind = Kind(op);
    if (kind == kFwd || kind == kBwdData) {
      memory wei_user(entry->wei_user_md, eng, b.untyped_data());
      memory wei = wei_user;
      if (entry->reorder) {
        wei = memory(entry->wei_prim_md, eng, weights->Get(entry->wei_prim_md.get_size()));
        reorder(entry->wei_reorder, wei_user, wei);
      }
      if (kind == kFwd) {
        memory x(x_md, eng, a.untyped_data()), y(y_md, eng, out->untyped_data());
        entry->prim.execute(*stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, wei},
                                      {DNNL_ARG_DST, y}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
      } else {
        memory dy(y_md, eng, a.untyped_data()), dx(x_md, eng, out->untyped_data());
        entry->prim.execute(*stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, wei},
                                      {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
      }
    } else {
      memory x(x_md, eng, a.untyped_data()), dy(y_md, eng, b.untyped_data());
      if (entry->reorder_x) {
        memory xr(entry->x_prim_md, eng, x_buf->Get(entry->x_prim_md.get_size()));
        reorder(entry->x_reorder, x, xr);
        x = xr;
      }
      if (entry->reorder_dy) {
        memory dyr(entry->dy_prim_md, eng, dy_buf->Get(entry->dy_prim_md.get_size()));
        reorder(entry->dy_reorder, dy, dyr);
        dy = dyr;
      }
      memory dw_user(entry->wei_user_md, eng, out->untyped_data());
      memory dw = entry->reorder ? memory(entry->wei_prim_md, eng,
                                          weights->Get(entry->wei_prim_md.get_size()))
                                 : dw_user;
      entry->prim.execute(*stream, {{DNNL_ARG_SRC, x},
                                    {DNNL_ARG_DIFF_DST, dy},
                                    {DNNL_ARG_DIFF_WEIGHTS, dw},
                                    {DNNL_ARG_SCRATCHPAD, scratch_mem}});
      if (entry->reorder) reorder(entry->wei_reorder, dw, dw_user);
    }
    stream->wait();
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc, ...
    return ffi::Error::Internal(std::string("tvunet oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

// The handlers: operands (a, b) -> out as `Run` reads them per op; convolutions are stride 1.
template <Op op>
ffi::Error ConvHandler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                       int64_t top, int64_t bottom, int64_t left, int64_t right) {
  return Run(op, a, b, out, top, bottom, left, right);
}
template <Op op>
ffi::Error DeconvHandler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                         int64_t top, int64_t bottom, int64_t left, int64_t right,
                         int64_t stride) {
  return Run(op, a, b, out, top, bottom, left, right, stride);
}

}  // namespace

#define TVUNET_CONV_BINDING                                                               \
  ffi::Ffi::Bind()                                                                        \
      .Arg<ffi::AnyBuffer>()                                                              \
      .Arg<ffi::AnyBuffer>()                                                              \
      .Ret<ffi::AnyBuffer>()                                                              \
      .Attr<int64_t>("top")                                                               \
      .Attr<int64_t>("bottom")                                                            \
      .Attr<int64_t>("left")                                                              \
      .Attr<int64_t>("right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_onednn_conv_fwd, ConvHandler<kFwd>, TVUNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_onednn_conv_bwd_data, ConvHandler<kBwdData>,
                              TVUNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_onednn_conv_bwd_weights, ConvHandler<kBwdWeights>,
                              TVUNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_onednn_deconv_fwd, DeconvHandler<kDeconvFwd>,
                              TVUNET_CONV_BINDING.Attr<int64_t>("stride"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_onednn_deconv_bwd_data, DeconvHandler<kDeconvBwdData>,
                              TVUNET_CONV_BINDING.Attr<int64_t>("stride"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(tvunet_onednn_deconv_bwd_weights, DeconvHandler<kDeconvBwdWeights>,
                              TVUNET_CONV_BINDING.Attr<int64_t>("stride"));

extern "C" {

// The instruction-set extensions the compiler was allowed to use (the build is -march=native),
// as /proc/cpuinfo names them, space-separated. conv.py reads it before registering any handler
// and refuses a library built for a CPU with more extensions than this one (which would die of
// SIGILL instead of falling back to XLA with a message). Plain string: no vector code runs.
const char* tvunet_build_isa() {
  return ""
#ifdef __AVX__
         " avx"
#endif
#ifdef __AVX2__
         " avx2"
#endif
#ifdef __FMA__
         " fma"
#endif
#ifdef __F16C__
         " f16c"
#endif
#ifdef __BMI2__
         " bmi2"
#endif
#ifdef __AVX512F__
         " avx512f"
#endif
#ifdef __AVX512BW__
         " avx512bw"
#endif
#ifdef __AVX512DQ__
         " avx512dq"
#endif
#ifdef __AVX512VL__
         " avx512vl"
#endif
#ifdef __AVX512VNNI__
         " avx512_vnni"
#endif
#ifdef __AVX512BF16__
         " avx512_bf16"
#endif
#ifdef __AMX_TILE__
         " amx_tile"
#endif
      ;
}

// oneDNN's version as "major.minor.patch".
int tvunet_onednn_version(char* out, int len) {
  const auto* v = dnnl::version();
  return std::snprintf(out, len, "%d.%d.%d", v->major, v->minor, v->patch);
}

// The implementation oneDNN picks for one op (0 fwd, 1 bwd data, 2 bwd weights; 3-5 the same for
// a transposed convolution of stride `stride`) at one shape, e.g. "brg:avx512_core_amx" or
// "jit:avx2"; "ref:any" means no optimised kernel. Returns -1 and the error text when the
// primitive cannot be built.
int tvunet_onednn_impl(int op, int bf16, int64_t n, int64_t h, int64_t w, int64_t ci, int64_t kh,
                       int64_t kw, int64_t co, int64_t top, int64_t bottom, int64_t left,
                       int64_t right, int64_t stride, char* out, int len) {
  if (op < kFwd || op > kDeconvBwdWeights || stride < 1 || (op < kDeconvFwd && stride != 1)) {
    std::snprintf(out, len,
                  "op must be 0-2 (conv: forward, input grad, weight grad; stride 1) or 3-5 "
                  "(transposed conv)");
    return -1;
  }
  const bool deconv = IsDeconv(static_cast<Op>(op));
  const Geometry g{n,   h,      w,    ci,    kh,    kw,
                   co,  OutSize(deconv, h, kh, top, bottom, stride),
                   OutSize(deconv, w, kw, left, right, stride),
                   top, bottom, left, right, stride};
  try {
    const auto e = Lookup(static_cast<Op>(op), bf16 != 0, g);
    std::snprintf(out, len, "%s", e->impl.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(out, len, "%s", e.what());
    return -1;
  }
}

}  // extern "C"
