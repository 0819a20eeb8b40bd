// Registration of PACT: parameterized clipping activation with a learned clip value
// (Choi et al., arXiv:1805.06085), the seed toolkit's interface PACT(data, gamma, nbits=4).
//
// Inputs:  data; gamma (the learned clip value alpha, shape (1,): an ordinary input whose
//          gradient backward writes, e.g. a Gluon parameter).
// Attributes: nbits (k, 2..16, default 4): 2^k - 1 levels above 0;
//          signed (default False): clip to [-alpha, alpha] instead of [0, alpha], on
//          2^(k-1) - 1 levels each side of 0 (k counts the sign bit; the seed toolkit's
//          _contrib_PACT at its nbits = n is signed=True, nbits = n + 1).
// Output:  y_q = q * s with s = alpha / (2^k - 1), q = clamp(rint(data / s), 0, 2^k - 1);
//          signed: s = alpha / (2^(k-1) - 1), q = clamp(rint(data / s), -m, m) with
//          m = 2^(k-1) - 1.
// Backward: d data = d y where 0 <= data < alpha; d gamma = sum of d y over data >= alpha;
//          signed: d data = d y where -alpha < data < alpha; d gamma = sum of d y over
//          data >= alpha minus sum of d y over data <= -alpha.
// The kernels and the exact numerics are in kernels/pact.h; the spec is quant_ops/refs/pact.py.
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/pact.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "PACT";
const std::vector<const char*> kInputs{"data", "gamma"};

struct PactParams {
  int nbits;
  bool is_signed;

  explicit PactParams(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a, {"nbits", "signed"});
    nbits = static_cast<int>(qo::attr_int(kOp, a, "nbits", 4, 2, 16));
    is_signed = qo::attr_bool(kOp, a, "signed", false);
  }
};

MXReturnValue infer_type(const qo::AttrMap&, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    PactParams p(attrs);
    (void)p;
    const auto& data = (*in)[0];
    qo::require_known_shape(kOp, "data", data);
    const std::vector<unsigned int> want{1};
    qo::fit_shape((*in)[1], want, [&] {
      return std::string(kOp) + ": 'gamma' (the learned clip value alpha) must have shape (1,)";
    });
    (*out)[0] = data;
    return MX_SUCCESS;
  });
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const PactParams p(attrs);
    MXTensor& data = (*inputs)[0];
    const float alpha = (*inputs)[1].data<float>()[0];
    qo::pact_forward(data.data<float>(), (*outputs)[0].data<float>(), data.size(), alpha,
                     p.nbits, p.is_signed);
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, gamma, output]; outputs: [d data, d gamma].
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const PactParams p(attrs);
    const float* g = (*inputs)[0].data<float>();
    MXTensor& data = (*inputs)[1];
    const float alpha = (*inputs)[2].data<float>()[0];
    const float dalpha = qo::pact_backward(g, data.data<float>(), (*outputs)[0].data<float>(),
                                           data.size(), alpha, p.is_signed);
    (*outputs)[1].data<float>()[0] = dalpha;
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(PACT)
    .setParseAttrs(qo::parse_attrs<PactParams, 2>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
