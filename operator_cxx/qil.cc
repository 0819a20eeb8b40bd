// Registration of QIL: quantization interval learning (Jung et al., arXiv:1808.05779,
// section 3), the seed toolkit's interface QIL(data, center, distance, gamma, nbits=4,
// is_weight=False, fix_gamma=True).
//
// Inputs:  data; center (c), distance (d), gamma (the weight transformer's exponent): each
//          shape (1,), ordinary inputs whose gradients backward writes (learned parameters).
// Attributes: nbits (N, 2..16, default 4); is_weight (default False): the weight transformer
//          (|x|, sign) and q_D = 2^(N-1) - 1, else the activation transformer and
//          q_D = 2^N - 1; fix_gamma (default True): the exponent is 1 and gamma's gradient 0.
// Output:  y = round(T(x) * q_D) / q_D in [-1, 1] (weights) or [0, 1] (activations), not
//          scaled back (as the seed).
// Backward: straight through the round, the chain rule through T inside [c - d, c + d].
// The kernels are in kernels/qil.h; the spec is quant_ops/refs/qil.py.
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/qil.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "QIL";
const std::vector<const char*> kInputs{"data", "center", "distance", "gamma"};

struct QilParams {
  int nbits;
  bool is_weight;
  bool fix_gamma;

  explicit QilParams(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a, {"nbits", "is_weight", "fix_gamma"});
    nbits = static_cast<int>(qo::attr_int(kOp, a, "nbits", 4, 2, 16));
    is_weight = qo::attr_bool(kOp, a, "is_weight", false);
    fix_gamma = qo::attr_bool(kOp, a, "fix_gamma", true);
  }

  qo::QilSpec spec(std::vector<MXTensor>& in, size_t first) const {
    return qo::qil_spec(in[first].data<float>()[0], in[first + 1].data<float>()[0],
                        in[first + 2].data<float>()[0], nbits, is_weight, fix_gamma);
  }
};

MXReturnValue infer_type(const qo::AttrMap&, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    QilParams p(attrs);
    (void)p;
    const auto& data = (*in)[0];
    qo::require_known_shape(kOp, "data", data);
    const std::vector<unsigned int> want{1};
    for (int i = 1; i < 4; ++i) {
      qo::fit_shape((*in)[i], want, [&] {
        return std::string(kOp) + ": '" + kInputs[i] + "' must have shape (1,)";
      });
    }
    (*out)[0] = data;
    return MX_SUCCESS;
  });
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const QilParams p(attrs);
    MXTensor& data = (*inputs)[0];
    qo::qil_forward(data.data<float>(), (*outputs)[0].data<float>(), data.size(),
                    p.spec(*inputs, 1));
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, center, distance, gamma, output];
// outputs: [d data, d center, d distance, d gamma].
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const QilParams p(attrs);
    MXTensor& data = (*inputs)[1];
    const qo::QilGrads r = qo::qil_backward((*inputs)[0].data<float>(), data.data<float>(),
                                            (*outputs)[0].data<float>(), data.size(),
                                            p.spec(*inputs, 2));
    (*outputs)[1].data<float>()[0] = r.dc;
    (*outputs)[2].data<float>()[0] = r.dd;
    (*outputs)[3].data<float>()[0] = r.dgamma;
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(QIL)
    .setParseAttrs(qo::parse_attrs<QilParams, 4>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
