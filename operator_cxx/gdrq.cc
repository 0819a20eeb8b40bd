// Registration of GDRQ: group-based distribution reshaping quantization (Yu et al., "Low-bit
// Quantization Needs Good Distribution", arXiv 1908.01477), the seed toolkit's interface
// GDRQ(data, alpha, nbits=4, group_size=-1, is_weight=False, lamda=0.001, do_quant=False,
// fix_alpha=False, ktimes=2, grad_mode='ste') plus the mode input qstate.
//
// Inputs:  data;
//          gdrq_alpha (aux: the clip value of each group, shape (1,) or (C / group_size,));
//          qstate (aux: [step, training], as Quantization_int8; MXNet does not tell an
//          external operator whether it trains).
// Output:  training and not do_quant: clip(data, alpha) (the Scale-Clip reshaping alone);
//          otherwise the clipped value quantized to 2 * (2^nbits - 1) + 1 levels, step alpha / L.
// State:   unless fix_alpha, alpha = ktimes * mean|data| per group for weights (every forward),
//          for activations (training forwards only) alpha <- alpha - lamda * (alpha - that).
// Backward: d data = d out where -alpha <= data <= alpha (weights with grad_mode 'ste': all).
// Kernels and exact numerics: kernels/gdrq.h; spec: quant_ops/refs/gdrq.py.
#include <cerrno>
#include <cfloat>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/attrs.h"
#include "common/op_utils.h"
#include "kernels/gdrq.h"

using namespace mxnet::ext;

namespace {

const char* kOp = "GDRQ";
const std::vector<const char*> kInputs{"data", "gdrq_alpha", "qstate"};

/*! \brief A finite number > 0 (attr_float's message would print FLT_MAX in full). */
float positive_float(const qo::AttrMap& a, const char* key, float dflt) {
  const std::string* v = qo::find_attr(a, key);
  if (!v) return dflt;
  errno = 0;
  char* end = nullptr;
  const float r = std::strtof(v->c_str(), &end);
  if (v->empty() || errno != 0 || *end != '\0' || !(r > 0.0f && r <= FLT_MAX))
    throw qo::AttrError(std::string(kOp) + ": attribute '" + key +
                        "' must be a positive number, got '" + *v + "'");
  return r;
}

struct GdrqParams {
  int nbits;
  long long group_size;
  bool is_weight;
  float lamda;
  bool do_quant;
  bool fix_alpha;
  float ktimes;
  bool clip_grad;

  explicit GdrqParams(const qo::AttrMap& a) {
    qo::check_known_keys(kOp, a,
                         {"nbits", "group_size", "is_weight", "lamda", "do_quant", "fix_alpha",
                          "ktimes", "grad_mode"});
    nbits = static_cast<int>(qo::attr_int(kOp, a, "nbits", 4, 1, 16));
    group_size = qo::attr_int(kOp, a, "group_size", -1, -1, 1LL << 31);
    if (group_size == 0)
      throw qo::AttrError(std::string(kOp) + ": attribute 'group_size' must be -1 (one group) "
                          "or a positive number of channels per group, got 0");
    is_weight = qo::attr_bool(kOp, a, "is_weight", false);
    lamda = qo::attr_float(kOp, a, "lamda", 0.001f, 0.0f, 1.0f);
    do_quant = qo::attr_bool(kOp, a, "do_quant", false);
    fix_alpha = qo::attr_bool(kOp, a, "fix_alpha", false);
    ktimes = positive_float(a, "ktimes", 2.0f);
    clip_grad = qo::attr_choice(kOp, a, "grad_mode", {"ste", "clip"}, 0) == 1;
  }
  bool grouped() const { return group_size != -1; }
  // the axis whose channels are grouped: a weight's output channels, an activation's channels
  int channel_axis() const { return is_weight ? 0 : 1; }
  // weights with grad_mode 'ste' pass the gradient everywhere; otherwise the clip's gradient
  bool pass_all() const { return is_weight && !clip_grad; }
};

template <typename Shape>
qo::GdrqView view_of(const GdrqParams& p, const Shape& shape) {
  qo::GdrqView v;
  if (!p.grouped()) {
    for (auto d : shape) v.inner *= static_cast<int64_t>(d);
    return v;
  }
  const qo::AxisView a = qo::axis_view(shape, p.channel_axis());
  v.outer = a.outer;
  v.groups = a.channels / p.group_size;
  v.inner = a.inner * p.group_size;
  return v;
}

MXReturnValue infer_type(const qo::AttrMap&, std::vector<int>* in, std::vector<int>* out) {
  return qo::float32_types(kOp, kInputs, in, out);
}

MXReturnValue infer_shape(const qo::AttrMap& attrs, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  return qo::guarded([&] {
    GdrqParams p(attrs);
    const auto& data = (*in)[0];
    qo::require_known_shape(kOp, "data", data);
    unsigned int groups = 1;
    if (p.grouped()) {
      const int axis = p.channel_axis();
      const std::string what = p.is_weight ? "a weight's output channels (axis 0)"
                                           : "an activation's channels (axis 1)";
      if (axis >= static_cast<int>(data.size()))
        throw qo::AttrError(std::string(kOp) + ": group_size=" + std::to_string(p.group_size) +
                            " groups " + what + ", but data of shape " + qo::shape_str(data) +
                            " has no axis " + std::to_string(axis));
      const unsigned int c = data[axis];
      if (c % static_cast<unsigned long long>(p.group_size) != 0)
        throw qo::AttrError(std::string(kOp) + ": group_size=" + std::to_string(p.group_size) +
                            " does not divide the " + std::to_string(c) + " channels on axis " +
                            std::to_string(axis) + " of data of shape " + qo::shape_str(data));
      groups = static_cast<unsigned int>(c / p.group_size);
    }
    const std::vector<unsigned int> want_alpha{groups};
    qo::fit_shape((*in)[1], want_alpha, [&] {
      return std::string(kOp) + ": 'gdrq_alpha' must have shape " + qo::shape_str(want_alpha) +
             " for data of shape " + qo::shape_str(data) +
             (p.grouped() ? " (one clip value per group of " + std::to_string(p.group_size) +
                                " channels)"
                          : std::string(" (one clip value)"));
    });
    qo::fit_qstate((*in)[2], kOp);
    (*out)[0] = data;
    return MX_SUCCESS;
  });
}

MXReturnValue mutate_inputs(const qo::AttrMap&, std::vector<int>* idx) {
  idx->push_back(1);  // gdrq_alpha
  idx->push_back(2);  // qstate
  return MX_SUCCESS;
}

MXReturnValue forward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_inputs(kOp, infer_shape, attrs, *inputs, 0, kInputs);
    const GdrqParams p(attrs);
    MXTensor& data = (*inputs)[0];
    float* alpha = (*inputs)[1].data<float>();
    float* st = (*inputs)[2].data<float>();
    const float* x = data.data<float>();
    float* y = (*outputs)[0].data<float>();
    const qo::GdrqView v = view_of(p, data.shape);
    const bool training = st[1] > 0.5f;

    // A weight's clip value is a function of the weight (recomputed in every forward, as the
    // seed did); an activation's moves in training only and is frozen in inference.
    if (!p.fix_alpha && (p.is_weight || training))
      qo::gdrq_update_alpha(x, v, alpha, p.is_weight, p.ktimes, p.lamda);
    if (training && !p.do_quant) qo::gdrq_clip_tensor(x, y, v, alpha);
    else qo::gdrq_quant_tensor(x, y, v, alpha, qo::gdrq_levels(p.nbits));
    if (training) st[0] = st[0] + 1.0f;
    return MX_SUCCESS;
  });
}

// Backward inputs: [out_grad, data, gdrq_alpha, qstate, output]; outputs: grads of the inputs
// (only data's is written: gdrq_alpha and qstate are auxiliary states).  The alpha read here
// is the one the forward used (the forward updated it before using it).
MXReturnValue backward(const qo::AttrMap& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  return qo::guarded([&] {
    qo::check_backward_inputs(kOp, infer_shape, attrs, *inputs, kInputs);
    const GdrqParams p(attrs);
    const float* g = (*inputs)[0].data<float>();
    MXTensor& data = (*inputs)[1];
    const float* alpha = (*inputs)[2].data<float>();
    float* dx = (*outputs)[0].data<float>();
    if (p.pass_all()) qo::copy(g, dx, data.size());
    else qo::gdrq_clip_grad_tensor(g, data.data<float>(), dx, view_of(p, data.shape), alpha);
    return MX_SUCCESS;
  });
}

}  // namespace

REGISTER_OP(GDRQ)
    .setParseAttrs(qo::parse_attrs<GdrqParams, 3>)
    .setInferType(infer_type)
    .setInferSType(qo::infer_dense_stype)
    .setInferShape(infer_shape)
    .setMutateInputs(mutate_inputs)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");
