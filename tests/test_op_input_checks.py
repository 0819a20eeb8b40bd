"""No input of any size crashes an operator: a zero-size state or learned input (which
MXNet's shape inference takes for "unknown") is refused with the input named, both through
the Python front and when the kernel is reached directly."""
from __future__ import annotations

import numpy as np
import pytest

import mxnet as mx
import quant_ops
from quant_ops import methods
from quant_ops.ops import OperatorError, raw_op

CASES = [(m, i) for m in methods.REGISTRY.values() for i in m.inputs]


def _args(m, empty: str | None):
    x = mx.nd.array(np.linspace(-1, 1, 6, dtype=np.float32))
    args = [x]
    for i in m.inputs:
        v = np.zeros(0, np.float32) if i.name == empty else np.full(i.size(1), 0.5, np.float32)
        args.append(mx.nd.array(v))
    return args


@pytest.mark.parametrize("m,inp", CASES, ids=[f"{m.name}-{i.name}" for m, i in CASES])
def test_zero_size_input_is_refused(m, inp):
    with pytest.raises(OperatorError, match=f"{m.op}: input '{inp.name}' is empty"):
        getattr(mx.nd, m.op)(*_args(m, inp.name))
    # the operator as registered (no Python front): the kernel refuses it before reading
    with pytest.raises(mx.base.MXNetError, match=f"{m.op}: '?{inp.name}"):
        raw_op(mx.nd, m.op)(*_args(m, inp.name)).asnumpy()


@pytest.mark.parametrize("m", list(methods.REGISTRY.values()), ids=lambda m: m.name)
def test_the_same_call_with_sized_inputs_runs(m):
    y = getattr(mx.nd, m.op)(*_args(m, None)).asnumpy()
    assert y.shape == (6,) and np.isfinite(y).all()
    assert quant_ops.LIBRARY_PATH
