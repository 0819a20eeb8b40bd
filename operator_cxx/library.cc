// Entry point of the operator library: MXNet calls initialize() from mx.library.load and
// refuses the library when it returns MX_FAIL. Operators register themselves in their own
// translation units (REGISTER_OP).
#include <cstdint>
#include <iostream>

#include "mxnet/lib_api.h"

using namespace mxnet::ext;

MXReturnValue initialize(int version) {
  // lib_api.h version 11 is MXNet 1.9; older engines lack the API this library was built for.
  if (version >= 10900) return MX_SUCCESS;
  MX_ERROR_MSG << "quant_ops operator library needs MXNet >= 1.9.0, found version " << version;
  return MX_FAIL;
}

// The kernels behind the operators, callable without MXNet (ctypes): for the benchmark's
// "kernel alone" rows, which separate the operator's own work from MXNet's per-call cost.
#include "kernels/fake_quant.h"

extern "C" void qo_kernel_weight_per_channel(const float* x, float* y, int64_t channels,
                                             int64_t inner, float* amax, int nbits) {
  qo::fake_quant_channels_own_range(x, y, channels, inner, amax, qo::qrange(nbits, true));
}

extern "C" void qo_kernel_activation(const float* x, float* y, int64_t n, float amax,
                                     int nbits) {
  qo::fake_quant_tensor(x, y, n, amax, qo::qrange(nbits, false));
}

// Output size from which fake_quant_tensor streams its stores (tests reach that path with it).
extern "C" int64_t qo_stream_threshold_bytes() { return qo::stream_threshold_bytes(); }
