// Registration of DSQ: Differentiable Soft Quantization (Gong et al., ICCV 2019,
// arXiv:1908.05033).
//
// Inputs:  data; dsq_lower, dsq_upper (the learned clip range l, u: shape (1,) each);
//          dsq_alpha (the learned softness alpha, shape (1,), evaluated in [1e-6, 0.5]); these
//          three are ordinary inputs whose gradients backward writes; qstate (aux: [step,
//          training], as Quantization_int8's: a training pass counts step + 1).
// Attributes: nbits (b, 1..16, default 4): 2^b levels l + q (u - l) / (2^b - 1);
//          is_weight (default False; no effect on the math: the paper uses the same DSQ for
//          weights and activations); soft (default True: the paper's soft gradient; False:
//          the uniform-quantization baseline with the straight-through estimator).
// Output:  the hard quantization of clip(data, l, u) onto the 2^b levels (training and
//          inference alike: "hard output, soft gradient").
// Backward writes the gradients of data, lower, upper and alpha.  The kernels and the exact
// numerics are in kernels/dsq.h; the spec is quant_ops/refs/dsq.py.
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/dsq.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "DSQ";
const std::vector<const char*> kInputs{"data", "dsq_lower", "dsq_upper", "dsq_alpha", "qstate"};

struct DsqParams {
  int nbits;
  bool is_weight;
  bool soft;

  explicit DsqParams(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a, {"nbits", "is_weight", "soft"});
    nbits = static_cast<int>(
        qo::attr_int(kOp, a, "nbits", 4, qo::dsq::kMinBits, qo::dsq::kMaxBits));
    is_weight = qo::attr_bool(kOp, a, "is_weight", false);
    soft = qo::attr_bool(kOp, a, "soft", true);
  }
};

MXReturnValue infer_type(const qo::AttrMap&, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    DsqParams p(attrs);
    (void)p;
    const auto& data = (*in)[0];
    qo::require_known_shape(kOp, "data", data);
    const std::vector<unsigned int> one{1};
    const char* what[] = {"dsq_lower", "dsq_upper", "dsq_alpha"};
    const char* meaning[] = {"the learned lower clip value l", "the learned upper clip value u",
                             "the learned softness alpha"};
    for (int i = 0; i < 3; ++i) {
      qo::fit_shape((*in)[1 + i], one, [&] {
        return std::string(kOp) + ": '" + what[i] + "' (" + meaning[i] +
               ") must have shape (1,)";
      });
    }
    qo::fit_qstate((*in)[4], kOp);
    (*out)[0] = data;
    return MX_SUCCESS;
  });
}

MXReturnValue mutate_inputs(const qo::AttrMap&, std::vector<int>* idx) {
  idx->push_back(4);  // qstate
  return MX_SUCCESS;
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const DsqParams p(attrs);
    MXTensor& data = (*inputs)[0];
    const float l = (*inputs)[1].data<float>()[0];
    const float u = (*inputs)[2].data<float>()[0];
    float* st = (*inputs)[4].data<float>();
    qo::dsq::forward(data.data<float>(), (*outputs)[0].data<float>(), data.size(), l, u,
                     p.nbits);
    if (st[1] > 0.5f) st[0] = st[0] + 1.0f;
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, dsq_lower, dsq_upper, dsq_alpha, qstate, output];
// outputs: gradients of the five inputs (qstate's is not written: it is an auxiliary state).
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const DsqParams p(attrs);
    const float* g = (*inputs)[0].data<float>();
    MXTensor& data = (*inputs)[1];
    const float l = (*inputs)[2].data<float>()[0];
    const float u = (*inputs)[3].data<float>()[0];
    const float alpha = (*inputs)[4].data<float>()[0];
    qo::dsq::backward(g, data.data<float>(), (*outputs)[0].data<float>(), data.size(), l, u,
                      alpha, p.nbits, p.soft, (*outputs)[1].data<float>(),
                      (*outputs)[2].data<float>(), (*outputs)[3].data<float>());
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(DSQ)
    .setParseAttrs(qo::parse_attrs<DsqParams, 5>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setMutateInputs(mutate_inputs)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
