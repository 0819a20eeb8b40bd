// Helpers shared by the registration files: error reporting into MXNet, dtype/shape checks,
// and the (outer, channels, inner) view of a tensor around one axis.
#pragma once

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"
#include "attrs.h"

namespace qo {

namespace detail {
// MXNet reads an extension's error through two calls it makes right after a failed call, on
// the same thread (_msgSize, then _msgGet for each index). lib_api.cc keeps one list for all
// threads, never cleared: every new error repeated the old ones, and with several threads a
// call got another call's text or a freed one. error_channel.cc answers those two calls
// from the calling thread's own last error instead; it is set here.
struct ThreadError {
  std::string text;
  bool set = false;
};

inline ThreadError& thread_error() {
  static thread_local ThreadError e;
  return e;
}

/*! \brief Report one error: the calling thread's message for MXNet to read. */
inline void report_error(const char* what) {
  ThreadError& e = thread_error();
  e.text = what;
  e.set = true;
}
}  // namespace detail

/*! \brief An error whose message is already in MXNet's error channel. */
struct Reported : std::exception {};

/*! \brief Run `body`; turn an AttrError (or any std::exception) into MXNet's error channel. */
template <typename F>
inline mxnet::ext::MXReturnValue guarded(F&& body) {
  detail::thread_error().set = false;   // an earlier error of this thread is not this one's
  try {
    return body();
  } catch (const Reported&) {
    return mxnet::ext::MX_FAIL;
  } catch (const std::exception& e) {
    detail::report_error(e.what());
    return mxnet::ext::MX_FAIL;
  }
}

/*! \brief parse_attrs of an operator with `NumIn` inputs and one output whose attributes
 *  parse into `Params` (whose constructor throws AttrError naming a bad one). */
template <typename Params, int NumIn>
inline mxnet::ext::MXReturnValue parse_attrs(const AttrMap& attrs, int* num_in, int* num_out) {
  return guarded([&] {
    const Params p(attrs);
    (void)p;
    *num_in = NumIn;
    *num_out = 1;
    return mxnet::ext::MX_SUCCESS;
  });
}

/*! \brief View a shape as (outer, channels, inner) around `axis`. */
struct AxisView {
  int64_t outer = 1, channels = 1, inner = 1;
};

template <typename Shape>
inline AxisView axis_view(const Shape& shape, int axis) {
  AxisView v;
  for (int i = 0; i < static_cast<int>(shape.size()); ++i) {
    const int64_t d = static_cast<int64_t>(shape[i]);
    if (i < axis) v.outer *= d;
    else if (i == axis) v.channels = d;
    else v.inner *= d;
  }
  return v;
}

// MXNet hands an unknown dimension over as (unsigned)-1.
constexpr unsigned int kUnknownDim = static_cast<unsigned int>(-1);

inline bool shape_known(const std::vector<unsigned int>& s) {
  if (s.empty()) return false;
  for (auto d : s)
    if (d == kUnknownDim) return false;
  return true;
}

/*! \brief True when `have` is unknown or agrees with `want` wherever it is known. */
inline bool shape_compatible(const std::vector<unsigned int>& have,
                             const std::vector<unsigned int>& want) {
  if (have.empty()) return true;
  if (have.size() != want.size()) return false;
  for (size_t i = 0; i < have.size(); ++i)
    if (have[i] != kUnknownDim && have[i] != want[i]) return false;
  return true;
}

/*! \brief Shapes must be fully known when an external operator infers them: MXNet 1.9 gives
 *  it no output shapes (so nothing can be inferred backwards through it) and would store a
 *  returned unknown dimension as 4294967295. */
inline void require_known_shape(const std::string& op, const char* input,
                                const std::vector<unsigned int>& s) {
  if (!shape_known(s))
    throw AttrError(op + ": the shape of '" + input + "' is not known when shapes are inferred; "
                    "give its variable a shape (mx.sym.var(name, shape=...)) or initialize "
                    "Gluon parameters with known sizes (MXNet 1.9's external operators "
                    "cannot infer input shapes backwards)");
}

inline std::string shape_str(const std::vector<unsigned int>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i)
    r += (i ? "," : "") + (s[i] == kUnknownDim ? std::string("?") : std::to_string(s[i]));
  return r + (s.size() == 1 ? ",)" : ")");
}

/*! \brief Give an input the shape `want`, or refuse with `what()` + ", got <its shape>"
 *  (`what()` names the operator, the input and what its shape means).  The message is a
 *  callable because imperative calls infer shapes on every call and it is rarely needed. */
template <typename What>
inline void fit_shape(std::vector<unsigned int>& have, const std::vector<unsigned int>& want,
                      What&& what) {
  if (!shape_compatible(have, want)) throw AttrError(what() + ", got " + shape_str(have));
  have = want;
}

/*! \brief How many ranges a quantizer keeps: one per channel along `axis`, or one. */
inline unsigned int range_count(const std::vector<unsigned int>& data, bool per_channel, int axis,
                                const char* op) {
  if (!per_channel) return 1;
  if (axis >= static_cast<int>(data.size()))
    throw AttrError(std::string(op) + ": channel_axis=" + std::to_string(axis) +
                    " is outside data of shape " + shape_str(data));
  return data[axis];
}

/*! \brief The [step, training] state input of every stateful quantizer. */
inline void fit_qstate(std::vector<unsigned int>& have, const char* op) {
  fit_shape(have, {2}, [op] {
    return std::string(op) + ": 'qstate' must have shape (2,) ([step, training])";
  });
}

inline const char* dtype_name(int t) {
  switch (t) {
    case mxnet::ext::kFloat32: return "float32";
    case mxnet::ext::kFloat64: return "float64";
    case mxnet::ext::kFloat16: return "float16";
    case mxnet::ext::kUint8: return "uint8";
    case mxnet::ext::kInt32: return "int32";
    case mxnet::ext::kInt8: return "int8";
    case mxnet::ext::kInt64: return "int64";
    default: return "unknown";
  }
}

/*! \brief Storage inference of every operator here: all dense (needed by simple_bind). */
inline mxnet::ext::MXReturnValue infer_dense_stype(const AttrMap&, std::vector<int>* in,
                                                   std::vector<int>* out) {
  for (auto& s : *in) s = mxnet::ext::kDefaultStorage;
  for (auto& s : *out) s = mxnet::ext::kDefaultStorage;
  return mxnet::ext::MX_SUCCESS;
}

/*! \brief All inputs must be float32 (the spec computes in float32); outputs are float32. */
inline void require_float32(const std::string& op, const std::vector<const char*>& names,
                            const std::vector<int>& types);

/*! \brief Type inference of every operator here: float32 inputs (named in errors), one
 *  float32 output. */
inline mxnet::ext::MXReturnValue float32_types(const std::string& op,
                                               const std::vector<const char*>& names,
                                               std::vector<int>* in, std::vector<int>* out) {
  return guarded([&] {
    require_float32(op, names, *in);
    for (auto& t : *in) t = mxnet::ext::kFloat32;
    (*out)[0] = mxnet::ext::kFloat32;
    return mxnet::ext::MX_SUCCESS;
  });
}

inline void require_float32(const std::string& op, const std::vector<const char*>& names,
                            const std::vector<int>& types) {
  for (size_t i = 0; i < types.size(); ++i) {
    if (types[i] != mxnet::ext::kFloat32 && types[i] != -1)
      throw AttrError(op + ": input '" + names[i] + "' must be float32, got " +
                      dtype_name(types[i]));
  }
}

inline std::vector<unsigned int> shape_of(const mxnet::ext::MXTensor& t) {
  std::vector<unsigned int> s;
  for (auto d : t.shape) s.push_back(static_cast<unsigned int>(d));
  return s;
}

/*! \brief Check the tensors a forward or backward is about to read, before touching memory:
 *  float32 each, and the shapes the operator's own shape inference gives for this data.
 *  Needed because MXNet 1.9 takes a 0 in a shape for "unknown" when it infers shapes, so
 *  an input of size 0 (or a state array swapped after binding) reaches the kernel
 *  unchecked.  `ts[first ..]` are the operator's inputs in order (`names`). */
template <typename InferShape>
inline void check_inputs(const std::string& op, InferShape infer, const AttrMap& attrs,
                         const std::vector<mxnet::ext::MXTensor>& ts, size_t first,
                         const std::vector<const char*>& names) {
  if (ts.size() < first + names.size())
    throw AttrError(op + ": expected " + std::to_string(names.size()) + " inputs, got " +
                    std::to_string(ts.size() - std::min(first, ts.size())));
  std::vector<std::vector<unsigned int>> in, out(1);
  for (size_t i = 0; i < names.size(); ++i) {
    const auto& t = ts[first + i];
    if (t.dtype != mxnet::ext::kFloat32)
      throw AttrError(op + ": input '" + names[i] + "' must be float32, got " +
                      dtype_name(t.dtype));
    in.push_back(shape_of(t));
  }
  const auto given = in;
  if (infer(attrs, &in, &out) != mxnet::ext::MX_SUCCESS) throw Reported();
  for (size_t i = 1; i < names.size(); ++i)
    if (in[i] != given[i])
      throw AttrError(op + ": input '" + names[i] + "' has shape " + shape_str(given[i]) +
                      ", expected " + shape_str(in[i]) + " for data of shape " +
                      shape_str(given[0]));
}

/*! \brief The same check in a backward, whose inputs are [out_grad, inputs..., output]:
 *  the gradient must also have the data's shape. */
template <typename InferShape>
inline void check_backward_inputs(const std::string& op, InferShape infer,
                                  const AttrMap& attrs,
                                  const std::vector<mxnet::ext::MXTensor>& ts,
                                  const std::vector<const char*>& names) {
  check_inputs(op, infer, attrs, ts, 1, names);
  if (ts[0].dtype != mxnet::ext::kFloat32 || ts[0].shape != ts[1].shape)
    throw AttrError(op + ": the output gradient must be float32 of the data's shape " +
                    shape_str(shape_of(ts[1])));
}

}  // namespace qo
