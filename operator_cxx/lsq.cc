// Registration of LSQ: Learned Step Size Quantization (Esser et al., arXiv 1902.08153).
//
// Inputs:  data, step (learned: shape (1,), or (C,) for per-channel weights).
// Output:  v_hat = rint(clip(data / step, -Qn, Qp)) * step.
// Backward writes the gradients of data and step (paper eq. 3 and 5, gradient scale of
// section 2.2).  The kernels and the exact numerics are in kernels/lsq.h.
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/lsq.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "LSQ";
const std::vector<const char*> kInputs{"data", "step"};

struct LsqParams {
  int nbits;
  bool is_weight;
  bool perchannel;
  int channel_axis;
  bool is_signed;

  explicit LsqParams(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a,
                         {"nbits", "is_weight", "is_weight_perchannel", "channel_axis", "signed"});
    nbits = static_cast<int>(qo::attr_int(kOp, a, "nbits", 4, 2, 16));
    is_weight = qo::attr_bool(kOp, a, "is_weight", false);
    perchannel = qo::attr_bool(kOp, a, "is_weight_perchannel", false);
    channel_axis = static_cast<int>(qo::attr_int(kOp, a, "channel_axis", 0, 0, 7));
    // the paper's convention: weights are signed, activations (after ReLU) unsigned
    is_signed = qo::attr_bool(kOp, a, "signed", is_weight);
    if (perchannel && !is_weight)
      throw qo::AttrError(std::string(kOp) +
                          ": is_weight_perchannel=True needs is_weight=True (activations are "
                          "quantized per tensor)");
  }
  bool per_channel() const { return is_weight && perchannel; }
  qo::LsqRange range() const { return qo::lsq_range(nbits, is_signed); }
};

template <typename Shape>
qo::LsqView view_of(const LsqParams& p, const Shape& shape) {
  qo::LsqView v;
  if (p.per_channel()) {
    const qo::AxisView a = qo::axis_view(shape, p.channel_axis);
    v.outer = a.outer;
    v.channels = a.channels;
    v.inner = a.inner;
  } else {
    for (auto d : shape) v.inner *= static_cast<int64_t>(d);
  }
  return v;
}

// N of the gradient scale g = 1 / sqrt(N * Qp): the elements one step quantizes for weights
// (per channel for per-channel weights); for activations the features of one example, i.e.
// the elements over the batch size, axis 0 being the batch axis.
template <typename Shape>
int64_t elements_per_step(const LsqParams& p, const Shape& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= static_cast<int64_t>(d);
  if (p.per_channel()) {
    const int64_t c = static_cast<int64_t>(shape[p.channel_axis]);
    return c > 0 ? n / c : 0;
  }
  if (!p.is_weight) {
    const int64_t batch = shape.empty() ? 1 : static_cast<int64_t>(shape[0]);
    return batch > 0 ? n / batch : 0;
  }
  return n;
}

MXReturnValue infer_type(const qo::AttrMap&, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    LsqParams p(attrs);
    const auto& data = (*in)[0];
    qo::require_known_shape(kOp, "data", data);
    const unsigned int channels = qo::range_count(data, p.per_channel(), p.channel_axis, kOp);
    const std::vector<unsigned int> want{channels};
    qo::fit_shape((*in)[1], want, [&] {
      return std::string(kOp) + ": 'step' must have shape " + qo::shape_str(want) +
             " for data of shape " + qo::shape_str(data) +
             (p.per_channel() ? " (one step per channel)" : " (one step)");
    });
    (*out)[0] = data;
    return MX_SUCCESS;
  });
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const LsqParams p(attrs);
    MXTensor& data = (*inputs)[0];
    qo::lsq_forward(data.data<float>(), (*outputs)[0].data<float>(), view_of(p, data.shape),
                    (*inputs)[1].data<float>(), p.range());
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, step, output]; outputs: [grad of data, grad of step].
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const LsqParams p(attrs);
    MXTensor& data = (*inputs)[1];
    const qo::LsqRange r = p.range();
    qo::lsq_backward((*inputs)[0].data<float>(), data.data<float>(),
                     (*outputs)[0].data<float>(), (*outputs)[1].data<float>(),
                     view_of(p, data.shape), (*inputs)[2].data<float>(), r,
                     qo::lsq_grad_scale(elements_per_step(p, data.shape), r.qmax));
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(LSQ)
    .setParseAttrs(qo::parse_attrs<LsqParams, 2>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
