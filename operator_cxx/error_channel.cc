// The two entry points through which MXNet reads this library's error messages, answered
// per thread (see qo::detail::report_error in common/op_utils.h). lib_api.cc's own versions
// are compiled under other names (quant_ops/_build.py) and still answer for errors that
// lib_api.cc itself raises (MX_ERROR_MSG), when the calling thread has none of ours.

#include "common/op_utils.h"

extern "C" {
int qo_lib_api_msgSize();
void qo_lib_api_msgGet(int idx, const char** msg);

int _msgSize() {
  const qo::detail::ThreadError& e = qo::detail::thread_error();
  return e.set ? 1 : qo_lib_api_msgSize();
}

void _msgGet(int idx, const char** msg) {
  const qo::detail::ThreadError& e = qo::detail::thread_error();
  if (e.set) {
    *msg = e.text.c_str();   // valid until this thread's next error
    return;
  }
  qo_lib_api_msgGet(idx, msg);
}
}
