"""The package's own error types, so callers can catch toolkit failures apart from MXNet's."""

import re


class QuantOpsError(Exception):
    """Any error the toolkit raises on bad input, configuration or environment."""


class BuildError(QuantOpsError):
    """The C++ operator library could not be found, built or loaded."""


def mxnet_message(err: Exception) -> str:
    """The line of an MXNetError that says what is wrong (MXNet prepends a C++ traceback
    and file names): its last ``MXNetError:`` / ``Check failed`` line, whitespace folded."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("MXNetError:") or "Check failed" in ln or "Error in operator" in ln:
            return _SOURCE_LOCATION.sub("", " ".join(ln.removeprefix("MXNetError:").split()))
    return " ".join(lines[-1].split()) if lines else type(err).__name__


#: "[02:21:40] ../src/operator/nn/convolution.cc:151: ": when and where in MXNet's C++
_SOURCE_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
