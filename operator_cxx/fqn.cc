// Registration of FQN: asymmetric min/max fake quantization of "Fully Quantized Network for
// Object Detection" (Li et al., CVPR 2019), interface of the seed toolkit's _contrib_FQN.
//
// Inputs:  data, fqn_min, fqn_max (aux: the range, shape (1,) or (C,) for per-channel
//          weights), qstate (aux: [step, training]).
// Output:  dequant(quant(data)), unsigned k-bit code with a zero point.
// seed_grid=True (default False): the seed toolkit's grid instead, rint((x - min) / s) * s +
//          min with s = (max - min) / (2^k - 1) (no zero point, no clamp; nbits 1..16); a
//          weight's range is then the seed's too: the batch's (per channel: max + 1e-6) in
//          training, the stored one in inference.  Activations' ranges are as without it.
// The kernels and the exact numerics are in kernels/fqn.h (spec: quant_ops/refs/fqn.py).
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/fqn.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "FQN";
const std::vector<const char*> kInputs{"data", "fqn_min", "fqn_max", "qstate"};

struct FqnParams {
  int nbits;
  bool is_weight;
  bool perchannel;
  int channel_axis;
  float ema_decay;
  bool ste;
  bool seed_grid;

  explicit FqnParams(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a,
                         {"nbits", "is_weight", "is_perchannel", "channel_axis", "ema_decay",
                          "grad_mode", "seed_grid"});
    seed_grid = qo::attr_bool(kOp, a, "seed_grid", false);
    // the seed grid has no code to store, so 1 bit (the two levels min and max) is allowed
    nbits = static_cast<int>(qo::attr_int(kOp, a, "nbits", 4, seed_grid ? 1 : 2, 16));
    is_weight = qo::attr_bool(kOp, a, "is_weight", false);
    perchannel = qo::attr_bool(kOp, a, "is_perchannel", false);
    channel_axis = static_cast<int>(qo::attr_int(kOp, a, "channel_axis", 0, 0, 7));
    ema_decay = qo::attr_float(kOp, a, "ema_decay", 0.0f, 0.0f, 1.0f);
    ste = qo::attr_choice(kOp, a, "grad_mode", {"clip", "ste"}, 0) == 1;
    if (perchannel && !is_weight)
      throw qo::AttrError(std::string(kOp) +
                          ": is_perchannel=True needs is_weight=True (activations are "
                          "quantized per tensor)");
  }
  bool per_channel() const { return is_weight && perchannel; }
  float levels() const { return qo::fqn_levels(nbits); }
};

template <typename Shape>
qo::FqnView view_of(const FqnParams& p, const Shape& shape) {
  qo::FqnView v;
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

MXReturnValue infer_type(const qo::AttrMap&, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    FqnParams p(attrs);
    const auto& data = (*in)[0];
    qo::require_known_shape(kOp, "data", data);
    const unsigned int channels = qo::range_count(data, p.per_channel(), p.channel_axis, kOp);
    const std::vector<unsigned int> want{channels};
    for (int i : {1, 2}) {
      qo::fit_shape((*in)[i], want, [&] {
        return std::string(kOp) + ": '" + (i == 1 ? "fqn_min" : "fqn_max") +
               "' must have shape " + qo::shape_str(want) + " for data of shape " +
               qo::shape_str(data) +
               (p.per_channel() ? " (one range per channel)" : " (one range)");
      });
    }
    qo::fit_qstate((*in)[3], kOp);
    (*out)[0] = data;
    return MX_SUCCESS;
  });
}

MXReturnValue mutate_inputs(const qo::AttrMap&, std::vector<int>* idx) {
  idx->push_back(1);  // fqn_min
  idx->push_back(2);  // fqn_max
  idx->push_back(3);  // qstate
  return MX_SUCCESS;
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const FqnParams p(attrs);
    MXTensor& data = (*inputs)[0];
    float* mn = (*inputs)[1].data<float>();
    float* mx = (*inputs)[2].data<float>();
    float* st = (*inputs)[3].data<float>();
    const float* x = data.data<float>();
    const qo::FqnView v = view_of(p, data.shape);
    const bool training = st[1] > 0.5f;

    if (p.is_weight && (training || !p.seed_grid)) {  // seed grid: stored in inference
      if (p.per_channel()) {
        qo::fqn_min_max_channels(x, v, mn, mx);
        if (p.seed_grid) {  // the seed's per-channel max + 1e-6, in float32
          for (int64_t c = 0; c < v.channels; ++c) mx[c] = mx[c] + 1e-6f;
        }
      } else {
        float bmn, bmx;
        qo::fqn_min_max(x, data.size(), &bmn, &bmx);
        const bool found = bmn <= bmx;
        mn[0] = found ? bmn : 0.0f;
        mx[0] = found ? bmx : 0.0f;
      }
    } else if (training) {
      float bmn, bmx;
      qo::fqn_min_max(x, data.size(), &bmn, &bmx);
      if (bmn <= bmx) {  // a batch of NaN (or none) leaves the range alone
        const bool uninitialized = mn[0] != mn[0] || mx[0] != mx[0] ||
                                   (mn[0] == 0.0f && mx[0] == 0.0f);
        if (p.ema_decay == 0.0f || uninitialized) {
          mn[0] = bmn;
          mx[0] = bmx;
        } else {
          mn[0] = qo::fqn_ema(mn[0], bmn, p.ema_decay);
          mx[0] = qo::fqn_ema(mx[0], bmx, p.ema_decay);
        }
      }
    }
    if (p.seed_grid)
      qo::fqn_seed_forward(x, (*outputs)[0].data<float>(), v, mn, mx, p.levels());
    else
      qo::fqn_forward(x, (*outputs)[0].data<float>(), v, mn, mx, p.levels());
    if (training) st[0] = st[0] + 1.0f;
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, fqn_min, fqn_max, qstate, output]; outputs: the gradients
// of the inputs (only data's is written: the others are auxiliary states).
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const FqnParams p(attrs);
    const float* g = (*inputs)[0].data<float>();
    MXTensor& data = (*inputs)[1];
    float* dx = (*outputs)[0].data<float>();
    if (p.ste) {
      qo::copy(g, dx, data.size());
    } else if (p.seed_grid) {
      qo::fqn_seed_backward(g, data.data<float>(), dx, view_of(p, data.shape),
                            (*inputs)[2].data<float>(), (*inputs)[3].data<float>());
    } else {
      qo::fqn_backward(g, data.data<float>(), dx, view_of(p, data.shape),
                       (*inputs)[2].data<float>(), (*inputs)[3].data<float>(), p.levels());
    }
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(FQN)
    .setParseAttrs(qo::parse_attrs<FqnParams, 4>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setMutateInputs(mutate_inputs)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
