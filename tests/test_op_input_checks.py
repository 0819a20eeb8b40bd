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


def test_errors_are_the_calling_threads_own_under_concurrent_calls():
    """Six threads making failing calls at once: each gets its own message, whole, and a
    message never repeats an earlier error (lib_api.cc kept one list for every thread)."""
    import threading

    import mxnet as mx
    import numpy as np

    bad: list = []

    def work(k: int) -> None:
        nbits = 17 + k                        # each thread's message names its own value
        x, g = mx.nd.array([1.0, 2.0, 3.0]), mx.nd.array([2.0])
        for _ in range(1000):
            try:
                mx.nd.PACT(x, g, nbits=nbits).wait_to_read()
                bad.append((k, "no error"))
            except mx.base.MXNetError as e:
                text = str(e)
                if f"'nbits' = {nbits} is out of range" not in text or text.count("nbits") != 1:
                    bad.append((k, text[-300:]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad[:3]
    y = mx.nd.PACT(mx.nd.array([1.0, 2.0, 3.0]), mx.nd.array([2.0]), nbits=4).asnumpy()
    assert np.isfinite(y).all()          # a good call after all that still works
