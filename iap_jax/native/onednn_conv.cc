// 2-D convolution forward, input gradient and weight gradient on the CPU through oneDNN,
// exposed to XLA as typed FFI custom calls (see iap_jax/models/onednn.py).
//
// Layouts are the model's: activations NHWC, kernels HWIO, float32. Activations are
// handed to oneDNN in place (oneDNN's direct convolutions read and write NHWC); only the
// kernel is reordered to the blocked layout oneDNN picks, and back for its gradient.
// Written against oneDNN 2.x and 3.x (their primitive-descriptor APIs differ).
#include <cstdint>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
};

ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                        ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "expected NHWC, HWIO and NHWC arrays");
  }
  // x: N H W C, w: KH KW I O, y: N OH OW O; oneDNN's logical order is N C H W / O I KH KW.
  g->src = {x[0], x[3], x[1], x[2]};
  g->wei = {w[3], w[2], w[0], w[1]};
  g->dst = {y[0], y[3], y[1], y[2]};
  g->strides = {sh, sw};
  g->pad_l = {pt, pl};
  g->pad_r = {pb, pr};
  return ffi::Error::Success();
}

memory::desc Plain(const memory::dims& dims, tag format) { return memory::desc(dims, dt::f32, format); }
memory::desc Any(const memory::dims& dims) { return memory::desc(dims, dt::f32, tag::any); }

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Plain(g.src, tag::nhwc), Any(g.wei), Plain(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r);
#else
  dnnl::convolution_forward::desc desc(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Plain(g.src, tag::nhwc), Any(g.wei), Plain(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r);
  return dnnl::convolution_forward::primitive_desc(desc, Engine());
#endif
}

// The input-gradient (backward_data) and weight-gradient (backward_weights) primitives take
// the same descriptors: (diff_)src, (diff_)weights, diff_dst, and the forward pass as hint.
template <typename Primitive>
typename Primitive::primitive_desc BackwardPd(const Geometry& g) {
  auto hint = ForwardPd(g);
#if DNNL_VERSION_MAJOR >= 3
  return typename Primitive::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Plain(g.src, tag::nhwc), Any(g.wei),
      Plain(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, hint);
#else
  typename Primitive::desc desc(dnnl::algorithm::convolution_direct, Plain(g.src, tag::nhwc),
                                Any(g.wei), Plain(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r);
  return typename Primitive::primitive_desc(desc, Engine(), hint);
#endif
}

// Runs `body` and turns a oneDNN exception into an XLA error naming the call.
template <typename Body>
ffi::Error Guarded(const char* what, Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": oneDNN: " + e.what());
  }
}

// Reorders `from` into a new memory of descriptor `md` unless the layouts already agree.
memory Reordered(memory from, const memory::desc& md, dnnl::stream& stream) {
  if (from.get_desc() == md) return from;
  memory to(md, Engine());
  dnnl::reorder(from, to).execute(stream, from, to);
  return to;
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  if (auto err = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb,
                              pl, pr, &g); !err.success()) {
    return err;
  }
  return Guarded("convolution forward", [&] {
    dnnl::stream stream(Engine());
    auto pd = ForwardPd(g);
    memory src(pd.src_desc(), Engine(), x.typed_data());
    memory dst(pd.dst_desc(), Engine(), y->typed_data());
    memory wei_user(Plain(g.wei, tag::hwio), Engine(), w.typed_data());
    memory wei = Reordered(wei_user, pd.weights_desc(), stream);
    dnnl::convolution_forward(pd).execute(
        stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    stream.wait();
  });
}

void RunInputGrad(const Geometry& g, float* dy, float* w, float* dx, dnnl::stream& stream) {
  auto pd = BackwardPd<dnnl::convolution_backward_data>(g);
  memory diff_dst(pd.diff_dst_desc(), Engine(), dy);
  memory diff_src(pd.diff_src_desc(), Engine(), dx);
  memory wei_user(Plain(g.wei, tag::hwio), Engine(), w);
  memory wei = Reordered(wei_user, pd.weights_desc(), stream);
  dnnl::convolution_backward_data(pd).execute(
      stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_SRC, diff_src}});
}

void RunWeightGrad(const Geometry& g, float* x, float* dy, float* dw, dnnl::stream& stream) {
  auto pd = BackwardPd<dnnl::convolution_backward_weights>(g);
  memory src(pd.src_desc(), Engine(), x);
  memory diff_dst(pd.diff_dst_desc(), Engine(), dy);
  memory wei_user(Plain(g.wei, tag::hwio), Engine(), dw);
  memory diff_wei = pd.diff_weights_desc() == wei_user.get_desc()
                        ? wei_user
                        : memory(pd.diff_weights_desc(), Engine());
  dnnl::convolution_backward_weights(pd).execute(
      stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_wei}});
  if (diff_wei != wei_user) dnnl::reorder(diff_wei, wei_user).execute(stream, diff_wei, wei_user);
}

// `after` is not read: it is the layer's weight gradient, passed so that XLA runs the two
// gradients one after the other (run at once, two oneDNN thread teams on the same cores slow
// each other down), while an unused input gradient (the image's) is still dropped.
ffi::Error ConvInputGradImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                             ffi::AnyBuffer after, ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                             int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  if (auto err = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb,
                              pl, pr, &g); !err.success()) {
    return err;
  }
  return Guarded("convolution input gradient", [&] {
    dnnl::stream stream(Engine());
    RunInputGrad(g, dy.typed_data(), w.typed_data(), dx->typed_data(), stream);
    stream.wait();
  });
}

ffi::Error ConvWeightGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                              int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  if (auto err = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb,
                              pl, pr, &g); !err.success()) {
    return err;
  }
  return Guarded("convolution weight gradient", [&] {
    dnnl::stream stream(Engine());
    RunWeightGrad(g, x.typed_data(), dy.typed_data(), dw->typed_data(), stream);
    stream.wait();
  });
}

}  // namespace

#define IAP_CONV_ATTRIBUTES                                                             \
      .Attr<int64_t>("stride_h")                                                        \
      .Attr<int64_t>("stride_w")                                                        \
      .Attr<int64_t>("pad_top")                                                         \
      .Attr<int64_t>("pad_bottom")                                                      \
      .Attr<int64_t>("pad_left")                                                        \
      .Attr<int64_t>("pad_right")

// Forward x, w -> y and weight gradient x, dy -> dw; input gradient dy, w, after -> dx.
#define IAP_CONV_BINDING                                                                \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<ffi::F32>>() IAP_CONV_ATTRIBUTES

XLA_FFI_DEFINE_HANDLER_SYMBOL(IapConvForward, ConvForwardImpl, IAP_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapConvInputGrad, ConvInputGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>() IAP_CONV_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapConvWeightGrad, ConvWeightGradImpl, IAP_CONV_BINDING);


extern "C" int iap_onednn_version() {
  return DNNL_VERSION_MAJOR * 10000 + DNNL_VERSION_MINOR * 100 + DNNL_VERSION_PATCH;
}
