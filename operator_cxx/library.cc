// Entry point of the operator library: MXNet calls initialize() from mx.library.load and
// refuses the library when it returns MX_FAIL. Operators register themselves in their own
// translation units (REGISTER_OP).
#include <iostream>

#include "mxnet/lib_api.h"

using namespace mxnet::ext;

MXReturnValue initialize(int version) {
  // lib_api.h version 11 is MXNet 1.9; older engines lack the API this library was built for.
  if (version >= 10900) return MX_SUCCESS;
  MX_ERROR_MSG << "quant_ops operator library needs MXNet >= 1.9.0, found version " << version;
  return MX_FAIL;
}
