// Registration of DoReFa: the DoReFa-Net quantizer (Zhou et al. 2016, arXiv:1606.06160).
//
// Input:  data.  Attributes: nbits (k, 1..16, default 4), is_weight (default False).
// Output: the quantized tensor.  No learned parameters, no state.
// The math (and its bit-exact spec) is in kernels/dorefa.h / quant_ops/refs/dorefa.py.
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/dorefa.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "DoReFa";
const std::vector<const char*> kInputs{"data"};

struct DoReFaParams {
  int nbits;
  bool is_weight;

  explicit DoReFaParams(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a, {"nbits", "is_weight"});
    nbits = static_cast<int>(
        qo::attr_int(kOp, a, "nbits", 4, qo::dorefa::kMinBits, qo::dorefa::kMaxBits));
    is_weight = qo::attr_bool(kOp, a, "is_weight", false);
  }
};

MXReturnValue infer_type(const qo::AttrMap& attrs, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    DoReFaParams p(attrs);
    (void)p;
    qo::require_known_shape(kOp, "data", (*in)[0]);
    (*out)[0] = (*in)[0];
    return MX_SUCCESS;
  });
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const DoReFaParams p(attrs);
    MXTensor& data = (*inputs)[0];
    const float* x = data.data<float>();
    float* y = (*outputs)[0].data<float>();
    const int64_t n = data.size();
    if (p.is_weight) qo::dorefa::weight_forward(x, y, n, p.nbits);
    else qo::dorefa::activation_forward(x, y, n, p.nbits);
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, output]; outputs: [grad of data].
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const DoReFaParams p(attrs);
    const float* g = (*inputs)[0].data<float>();
    MXTensor& data = (*inputs)[1];
    const float* x = data.data<float>();
    float* dx = (*outputs)[0].data<float>();
    const int64_t n = data.size();
    if (p.is_weight) qo::dorefa::weight_backward(g, x, dx, n, p.nbits);
    else qo::dorefa::activation_backward(g, x, dx, n);
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(DoReFa)
    .setParseAttrs(qo::parse_attrs<DoReFaParams, 1>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
