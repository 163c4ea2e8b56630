// 2-D convolution forward, input gradient and weight gradient on the CPU through oneDNN,
// and an inference forward with bias, residual sum and ReLU fused in, exposed to XLA as
// typed FFI custom calls (see iap_jax/kernels/onednn.py).
//
// Layouts are the model's: activations NHWC, kernels HWIO, float32. Activations are
// handed to oneDNN in place (oneDNN's direct convolutions read and write NHWC); only the
// kernel is reordered to the blocked layout oneDNN picks, and back for its gradient.
// Written against oneDNN 2.x and 3.x (their primitive-descriptor APIs differ).
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
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

// Runs `body` and turns an exception (oneDNN's, or e.g. std::bad_alloc) into an XLA error
// naming the call: none may cross the FFI boundary.
template <typename Body>
ffi::Error Guarded(const char* what, Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": oneDNN: " + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": " + e.what());
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

// Inference: the convolution with its bias (BatchNorm folded in by the caller) and, as
// oneDNN post-ops, the residual sum (`dst` already holds the residual) and a ReLU, so no
// separate pass over the activations follows. The primitive descriptor (its implementation
// search) and its primitive are made once per geometry and data type and kept here.
// Activations, kernel and residual are float32 or bfloat16 (`type`); the bias is float32.
struct InferencePrimitive {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward primitive;
};

template <ffi::DataType T>
constexpr dt OnednnType() {
  static_assert(T == ffi::DataType::F32 || T == ffi::DataType::BF16, "float32 or bfloat16");
  return T == ffi::DataType::BF16 ? dt::bf16 : dt::f32;
}

const InferencePrimitive& Inference(const Geometry& g, bool sum, bool relu, dt type) {
  static std::mutex mutex;
  static std::map<std::string, InferencePrimitive> cache;
  std::string key = std::to_string(static_cast<int>(type)) + std::to_string(sum) + std::to_string(relu);
  for (const auto* dims : {&g.src, &g.wei, &g.dst, &g.strides, &g.pad_l, &g.pad_r}) {
    for (auto d : *dims) key += "," + std::to_string(d);
    key += ";";
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  dnnl::post_ops ops;
  if (sum) ops.append_sum(1.f);
#if DNNL_VERSION_MAJOR >= 3
  if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
#else
  if (relu) ops.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
#endif
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  memory::desc bias = Plain({g.dst[1]}, tag::a);
  memory::desc src(g.src, type, tag::nhwc), wei(g.wei, type, tag::any), dst(g.dst, type, tag::nhwc);
#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_forward::primitive_desc pd(
      Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      src, wei, bias, dst, g.strides, g.pad_l, g.pad_r, attr);
#else
  dnnl::convolution_forward::desc desc(
      dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      src, wei, bias, dst, g.strides, g.pad_l, g.pad_r);
  dnnl::convolution_forward::primitive_desc pd(desc, attr, Engine());
#endif
  return cache.emplace(key, InferencePrimitive{pd, dnnl::convolution_forward(pd)}).first->second;
}

// A prediction's kernels are constant: PackWeights reorders one (folded) HWIO kernel once
// into the blocked layout the inference primitive of that geometry reads, so that the
// forward can skip the reorder; PackedWeightBytes tells the caller the buffer's size.
template <ffi::DataType T>
ffi::Error PackWeightsImpl(ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<T> packed,
                           ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                           int64_t sum, int64_t relu) {
  Geometry g;
  if (auto err = MakeGeometry(x, w.dimensions(), y, sh, sw, pt, pb, pl, pr, &g); !err.success()) {
    return err;
  }
  return Guarded("packing convolution weights", [&] {
    const InferencePrimitive& p = Inference(g, sum != 0, relu != 0, OnednnType<T>());
    if (packed->size_bytes() != p.pd.weights_desc().get_size()) {
      throw dnnl::error(dnnl_invalid_arguments, "packed weight buffer of the wrong size");
    }
    dnnl::stream stream(Engine());
    memory wei_user(Plain(g.wei, tag::hwio), Engine(), w.typed_data());
    memory wei(p.pd.weights_desc(), Engine(), packed->typed_data());
    dnnl::reorder(wei_user, wei).execute(stream, wei_user, wei);
    stream.wait();
  });
}

// `w` is the HWIO kernel, or (packed != 0) PackWeights' buffer for this geometry; `kernel`
// is the HWIO shape either way.
template <ffi::DataType T>
ffi::Error ConvInferenceImpl(ffi::Buffer<T> x, ffi::Buffer<T> w,
                             ffi::Buffer<ffi::F32> b, ffi::RemainingArgs rest,
                             ffi::ResultBuffer<T> y, int64_t sh, int64_t sw, int64_t pt,
                             int64_t pb, int64_t pl, int64_t pr, ffi::Span<const int64_t> kernel,
                             int64_t packed, int64_t relu) {
  Geometry g;
  if (auto err = MakeGeometry(x.dimensions(), kernel, y->dimensions(), sh, sw, pt, pb, pl, pr,
                              &g); !err.success()) {
    return err;
  }
  if (b.element_count() != static_cast<size_t>(g.dst[1]) || rest.size() > 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "expected one bias per output channel and at most one residual");
  }
  void* residual = nullptr;
  if (rest.size() == 1) {
    auto r = rest.get<ffi::Buffer<T>>(0);
    if (!r.has_value() || r->element_count() != y->element_count()) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "the residual must be an array of the output's shape and type");
    }
    residual = r->typed_data();
  }
  const dt type = OnednnType<T>();
  return Guarded("convolution inference", [&] {
    const InferencePrimitive& p = Inference(g, residual != nullptr, relu != 0, type);
    dnnl::stream stream(Engine());
    // With the residual aliased to the output (as iap_jax asks XLA) there is nothing to copy.
    if (residual != nullptr && residual != y->typed_data()) {
      std::memcpy(y->typed_data(), residual, y->size_bytes());
    }
    memory src(p.pd.src_desc(), Engine(), x.typed_data());
    memory dst(p.pd.dst_desc(), Engine(), y->typed_data());
    memory bias(p.pd.bias_desc(), Engine(), b.typed_data());
    memory wei;
    if (packed) {
      if (w.size_bytes() != p.pd.weights_desc().get_size()) {  // a backstop: size only
        throw dnnl::error(dnnl_invalid_arguments, "packed weights of another geometry");
      }
      wei = memory(p.pd.weights_desc(), Engine(), w.typed_data());
    } else {
      wei = Reordered(memory(memory::desc(g.wei, type, tag::hwio), Engine(), w.typed_data()),
                      p.pd.weights_desc(), stream);
    }
    p.primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei},
                                 {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst}});
    stream.wait();
  });
}

// Max pooling (forward; its gradient is XLA's, from the output): NHWC in and out, padding
// never chosen (as PyTorch's), float32 or bfloat16.
template <ffi::DataType T>
ffi::Error MaxPoolImpl(ffi::Buffer<T> x, ffi::ResultBuffer<T> y, int64_t kh, int64_t kw,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || xd[3] != yd[3]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "expected NHWC input and output");
  }
  return Guarded("max pooling", [&] {
    const dt type = OnednnType<T>();
    memory::desc src({xd[0], xd[3], xd[1], xd[2]}, type, tag::nhwc);
    memory::desc dst({yd[0], yd[3], yd[1], yd[2]}, type, tag::nhwc);
#if DNNL_VERSION_MAJOR >= 3
    dnnl::pooling_forward::primitive_desc pd(
        Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_max, src, dst,
        {sh, sw}, {kh, kw}, {0, 0}, {pt, pl}, {pb, pr});
#else
    dnnl::pooling_forward::desc desc(dnnl::prop_kind::forward_inference,
                                     dnnl::algorithm::pooling_max, src, dst, {sh, sw}, {kh, kw},
                                     {pt, pl}, {pb, pr});
    dnnl::pooling_forward::primitive_desc pd(desc, Engine());
#endif
    dnnl::stream stream(Engine());
    memory in(src, Engine(), x.typed_data()), out(dst, Engine(), y->typed_data());
    dnnl::pooling_forward(pd).execute(stream, {{DNNL_ARG_SRC, in}, {DNNL_ARG_DST, out}});
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
// Inference x, w, bias[, residual] -> y (see ConvInferenceImpl), in float32 or bfloat16.
#define IAP_CONV_INFERENCE_BINDING(T)                                                   \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<T>>()                                                            \
      .Arg<ffi::Buffer<T>>()                                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .RemainingArgs()                                                                  \
      .Ret<ffi::Buffer<T>>() IAP_CONV_ATTRIBUTES                                        \
      .Attr<ffi::Span<const int64_t>>("kernel")                                         \
      .Attr<int64_t>("packed")                                                          \
      .Attr<int64_t>("relu")
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapConvInference, ConvInferenceImpl<ffi::F32>,
                              IAP_CONV_INFERENCE_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapConvInferenceBf16, ConvInferenceImpl<ffi::BF16>,
                              IAP_CONV_INFERENCE_BINDING(ffi::BF16));
// Packing the float32 kernel w -> packed, for the float32 or the bfloat16 inference (see
// PackWeightsImpl).
#define IAP_CONV_PACK_BINDING(T)                                                        \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<T>>()                                                            \
      .Attr<ffi::Span<const int64_t>>("src")                                            \
      .Attr<ffi::Span<const int64_t>>("dst") IAP_CONV_ATTRIBUTES                        \
      .Attr<int64_t>("sum")                                                             \
      .Attr<int64_t>("relu")
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapConvPackWeights, PackWeightsImpl<ffi::F32>,
                              IAP_CONV_PACK_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapConvPackWeightsBf16, PackWeightsImpl<ffi::BF16>,
                              IAP_CONV_PACK_BINDING(ffi::BF16));

// Max pooling x -> y (see MaxPoolImpl).
#define IAP_MAX_POOL_BINDING(T)                                                         \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<T>>()                                                            \
      .Ret<ffi::Buffer<T>>()                                                            \
      .Attr<int64_t>("window_h")                                                        \
      .Attr<int64_t>("window_w") IAP_CONV_ATTRIBUTES
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapMaxPool, MaxPoolImpl<ffi::F32>, IAP_MAX_POOL_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(IapMaxPoolBf16, MaxPoolImpl<ffi::BF16>,
                              IAP_MAX_POOL_BINDING(ffi::BF16));

// The bytes PackWeights writes for a geometry (NHWC x, HWIO w, NHWC y, strides and pads as
// above; bf16 != 0 for the bfloat16 inference), or -1 where oneDNN has no inference
// primitive for it (e.g. bfloat16 on a CPU without AVX-512).
extern "C" int64_t iap_onednn_packed_weight_bytes(const int64_t* x, const int64_t* w,
                                                  const int64_t* y, int64_t sh, int64_t sw,
                                                  int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                                                  int64_t sum, int64_t relu, int64_t bf16) {
  try {
    Geometry g;
    if (!MakeGeometry(ffi::Span<const int64_t>(x, 4), ffi::Span<const int64_t>(w, 4),
                      ffi::Span<const int64_t>(y, 4), sh, sw, pt, pb, pl, pr, &g).success()) {
      return -1;
    }
    const InferencePrimitive& p = Inference(g, sum != 0, relu != 0, bf16 ? dt::bf16 : dt::f32);
    return static_cast<int64_t>(p.pd.weights_desc().get_size());
  } catch (const std::exception&) {  // oneDNN's errors included: none may cross extern "C"
    return -1;
  }
}


// 1 where a bfloat16 inference convolution of this geometry runs in a native (jit or brgemm)
// kernel of this CPU, 0 where oneDNN has only its slow reference one or none.
extern "C" int64_t iap_onednn_bf16_inference_native(const int64_t* x, const int64_t* w,
                                                    const int64_t* y, int64_t sh, int64_t sw,
                                                    int64_t pt, int64_t pb, int64_t pl,
                                                    int64_t pr) {
  try {
    Geometry g;
    if (!MakeGeometry(ffi::Span<const int64_t>(x, 4), ffi::Span<const int64_t>(w, 4),
                      ffi::Span<const int64_t>(y, 4), sh, sw, pt, pb, pl, pr, &g).success()) {
      return 0;
    }
    std::string impl = Inference(g, true, true, dt::bf16).pd.impl_info_str();
    return impl.rfind("ref", 0) == 0 ? 0 : 1;
  } catch (const std::exception&) {
    return 0;
  }
}

extern "C" int iap_onednn_version() {
  return DNNL_VERSION_MAJOR * 10000 + DNNL_VERSION_MINOR * 100 + DNNL_VERSION_PATCH;
}
