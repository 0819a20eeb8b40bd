// Registration of Quantization_int8: TensorRT-aligned symmetric fake quantization for QAT.
//
// Inputs:  data, minmax (aux: range, shape (1,) or (C,)), qstate (aux: [step, training]).
// Output:  dequant(quant(data)).
// signed=False (activations): codes 0..2^b - 1, scale amax / (2^b - 1), for tensors that are
// never negative: the uint8 a CPU engine runs after a ReLU, with all 256 codes in use.
// fix_weight_scale=True (weights): a stored range > 0 is kept (a calibrated clip, e.g. the
// least-error one below 8 bits); a range of 0 is not set yet and is taken from max|w|.
// The kernels are in kernels/fake_quant.h; this file binds them to lib_api.h.
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/fake_quant.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "Quantization_int8";
const std::vector<const char*> kInputs{"data", "minmax", "qstate"};

struct Int8Params {
  int nbits;
  bool is_weight;
  bool perchannel;
  long long delay_quant;
  float ema_decay;
  bool clip_grad;
  bool fix_act_scale;
  bool fix_weight_scale;
  int channel_axis;
  bool is_signed;

  explicit Int8Params(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a,
                         {"nbits", "is_weight", "is_weight_perchannel", "delay_quant",
                          "ema_decay", "grad_mode", "fix_act_scale", "fix_weight_scale",
                          "channel_axis", "signed"});
    nbits = static_cast<int>(qo::attr_int(kOp, a, "nbits", 8, 2, 16));
    is_weight = qo::attr_bool(kOp, a, "is_weight", false);
    perchannel = qo::attr_bool(kOp, a, "is_weight_perchannel", false);
    delay_quant = qo::attr_int(kOp, a, "delay_quant", 0, 0, 1LL << 40);
    ema_decay = qo::attr_float(kOp, a, "ema_decay", 0.99f, 0.0f, 1.0f);
    clip_grad = qo::attr_choice(kOp, a, "grad_mode", {"ste", "clip"}, 0) == 1;
    fix_act_scale = qo::attr_bool(kOp, a, "fix_act_scale", false);
    fix_weight_scale = qo::attr_bool(kOp, a, "fix_weight_scale", false);
    channel_axis = static_cast<int>(qo::attr_int(kOp, a, "channel_axis", 0, 0, 7));
    is_signed = qo::attr_bool(kOp, a, "signed", true);
    if (!is_signed && is_weight)
      throw qo::AttrError(std::string(kOp) +
                          ": signed=False needs is_weight=False (weights are symmetric int8; "
                          "unsigned codes are for non-negative activations)");
    if (fix_weight_scale && !is_weight)
      throw qo::AttrError(std::string(kOp) +
                          ": fix_weight_scale=True needs is_weight=True (an activation keeps "
                          "its range with fix_act_scale)");
    if (perchannel && !is_weight)
      throw qo::AttrError(std::string(kOp) +
                          ": is_weight_perchannel=True needs is_weight=True (activations are "
                          "quantized per tensor)");
  }
  bool per_channel() const { return is_weight && perchannel; }
  // unsigned: codes 0..2^b - 1 on [0, amax] (negative inputs clamp to 0)
  qo::QRange range() const {
    return is_signed ? qo::qrange(nbits, is_weight) : qo::qrange_unsigned(nbits);
  }
};

// A weight's stored ranges where they are set (> 0); the unset ones from max|w| now.
void keep_set_ranges(const Int8Params& p, const float* x, int64_t n, const qo::AxisView& v,
                     float* mm) {
  const int64_t count = p.per_channel() ? v.channels : 1;
  bool unset = false;
  for (int64_t c = 0; c < count; ++c) unset = unset || !(mm[c] > 0.0f);
  if (!unset) return;
  std::vector<float> now(static_cast<size_t>(count));
  if (p.per_channel()) qo::abs_max_channels(x, v.outer, v.channels, v.inner, now.data());
  else now[0] = qo::abs_max(x, n);
  for (int64_t c = 0; c < count; ++c)
    if (!(mm[c] > 0.0f)) mm[c] = now[static_cast<size_t>(c)];
}

// Shape of `data` seen around the channel axis (a per-tensor quantizer has one channel).
qo::AxisView view_of(const Int8Params& p, const std::vector<int64_t>& shape) {
  if (p.per_channel()) return qo::axis_view(shape, p.channel_axis);
  qo::AxisView v;
  for (auto d : shape) v.inner *= d;
  return v;
}

MXReturnValue infer_type(const qo::AttrMap& attrs, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    Int8Params p(attrs);
    const auto& data = (*in)[0];
    qo::require_known_shape(kOp, "data", data);
    const unsigned int channels = qo::range_count(data, p.per_channel(), p.channel_axis, kOp);
    const std::vector<unsigned int> want_mm{channels};
    qo::fit_shape((*in)[1], want_mm, [&] {
      return std::string(kOp) + ": 'minmax' must have shape " + qo::shape_str(want_mm) +
             " for data of shape " + qo::shape_str(data) +
             (p.per_channel() ? " (one range per channel)" : " (one range)");
    });
    qo::fit_qstate((*in)[2], kOp);
    (*out)[0] = data;
    return MX_SUCCESS;
  });
}

MXReturnValue mutate_inputs(const qo::AttrMap&, std::vector<int>* idx) {
  idx->push_back(1);  // minmax
  idx->push_back(2);  // qstate
  return MX_SUCCESS;
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const Int8Params p(attrs);
    MXTensor& data = (*inputs)[0];
    float* mm = (*inputs)[1].data<float>();
    float* st = (*inputs)[2].data<float>();
    const float* x = data.data<float>();
    float* y = (*outputs)[0].data<float>();
    const int64_t n = data.size();
    const qo::AxisView v = view_of(p, data.shape);
    const bool training = st[1] > 0.5f;
    const float step = st[0];

    const bool delayed = training && step < static_cast<float>(p.delay_quant);
    if (p.per_channel() && v.outer == 1 && !delayed && !p.fix_weight_scale) {
      // the common weight layout: each channel's range found and applied in one pass
      qo::fake_quant_channels_own_range(x, y, v.channels, v.inner, mm, p.range());
    } else {
      if (p.is_weight && p.fix_weight_scale) {
        keep_set_ranges(p, x, n, v, mm);
      } else if (p.is_weight) {
        if (p.per_channel()) qo::abs_max_channels(x, v.outer, v.channels, v.inner, mm);
        else mm[0] = qo::abs_max(x, n);
      } else if (training) {
        const float batch = qo::abs_max(x, n);
        mm[0] = (p.fix_act_scale && mm[0] > 0.0f) ? mm[0]
                                                   : qo::ema_update(mm[0], batch, p.ema_decay);
      }
      if (delayed) qo::copy(x, y, n);
      else if (p.per_channel()) qo::fake_quant_channels(x, y, v.outer, v.channels, v.inner, mm,
                                                        p.range());
      else qo::fake_quant_tensor(x, y, n, mm[0], p.range());
    }
    if (training) st[0] = step + 1.0f;
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, minmax, qstate, output]; outputs: grads of the inputs.
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const Int8Params p(attrs);
    const float* g = (*inputs)[0].data<float>();
    MXTensor& data = (*inputs)[1];
    const float* mm = (*inputs)[2].data<float>();
    const float* st = (*inputs)[3].data<float>();
    float* dx = (*outputs)[0].data<float>();
    const int64_t n = data.size();
    // Forward already counted this step, so the step it ran at is st[0] - 1.
    const bool delayed = st[1] > 0.5f && st[0] - 1.0f < static_cast<float>(p.delay_quant);
    if (!p.clip_grad || delayed) {
      qo::copy(g, dx, n);
    } else if (!p.per_channel()) {
      qo::clip_grad_tensor(g, data.data<float>(), dx, n, mm[0], p.range());
    } else {
      const qo::AxisView v = view_of(p, data.shape);
      qo::clip_grad_channels(g, data.data<float>(), dx, v.outer, v.channels, v.inner, mm,
                             p.range());
    }
    // minmax and qstate are auxiliary states: MXNet never reads gradients for them.
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(Quantization_int8)
    .setParseAttrs(qo::parse_attrs<Int8Params, 3>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setMutateInputs(mutate_inputs)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
