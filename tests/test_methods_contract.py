"""The contract every registered quantization method keeps, checked on each method of
``quant_ops.methods.REGISTRY`` (a method registered later is covered without editing this
file).  Everything is derived from the method's descriptor, never from its name:

1. bad attributes: nbits just outside ``bits`` refused by the operator and by the policy,
   unknown attributes refused, every policy parameter's check refusing bad values (and the
   operator accepting what the policy accepts);
2. shapes: a wrong-sized or wrong-rank learned/state input is a clear error naming it;
3. the symbol executor: learned inputs are arguments, state inputs auxiliary states; the
   outputs in inference and training mode are finite and equal to the nd front's;
4. learned inputs' gradients: nonzero somewhere, equal to a finite difference of the forward
   where the estimator is one (else to the method's numpy reference backward), and
   accumulated under ``grad_req='add'`` (nd and symbol);
5. graph insertion: strip gives the float graph back exactly, inserting twice changes
   nothing, state variables are ``<quantizer>_<input>`` with the descriptor's shape, the
   quantized graph runs;
6. calibration fills every input ``from_range`` names with what it gives for the observed
   range;
7. export: QDQ export (and onnxruntime) for exportable methods, a clear refusal naming the
   quantizer and the descriptor's reason for the others.

A known bug is kept visible as an xfail: a state an executor's forward writes is not always
visible to a read right after it (test_state_written_by_a_forward_is_visible).

Per-method numerics (bit for bit against the references, the papers' formulas, the seed
semantics) stay in tests/test_op_*.py.  Zero-size state inputs are not tried here.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import quant_ops
from quant_ops import methods
from quant_ops.calib.graph_calib import calibrate_graph
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.graph.quantize import insert_quantizers, strip_quantizers
from quant_ops.graph.quantizers import activation_quantizers, quantizers
from quant_ops.graph.runner import run_once
from quant_ops.methods.base import MODE_INPUT, ROLES
from quant_ops.ops import OperatorError, set_training
from quant_ops.policy import QuantPolicy, QuantSpec
from quant_ops.prepare import quantize_graph

f32 = np.float32
METHODS = list(methods.REGISTRY.values())
each_method = pytest.mark.parametrize("m", METHODS, ids=[m.name for m in METHODS])

WEIGHT_SHAPE = (4, 3, 2, 2)        # 4 output channels on axis 0
ACT_SHAPE = (2, 3, 5)
# values a policy parameter may reasonably take; each parameter must accept at least one
CANDIDATES = [True, False, -1, 0, 0.1, 0.5, 1, 2, 4.0, 100]
BAD_VALUES = ["bogus", math.nan, math.inf, None]


# -- helpers ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One way to use a method's operator: its role, granularity and policy params."""
    role: str
    per_channel: bool = False
    params: tuple = ()

    @property
    def is_weight(self) -> bool:
        return self.role == "weight"

    def __str__(self) -> str:
        return f"{self.role}{'/pc' if self.per_channel else ''}{dict(self.params) or ''}"


def cases(m: methods.Method, with_flags: bool = False) -> list[Case]:
    """Every role, per channel where the method can, and (``with_flags``) each boolean
    policy parameter flipped on its own."""
    res = []
    for role in m.roles:
        res.append(Case(role))
        if role == "weight" and m.per_channel:
            res.append(Case(role, True))
    if with_flags:
        flags = [k for k, p in m.params.items() if p.attr and p.check(True) and p.check(False)]
        res += [Case(c.role, c.per_channel, ((k, v),)) for c in list(res) for k in flags
                if c.role in m.params[k].roles for v in (True, False)]
    return res


def data_for(case: Case, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.3, 1.0, WEIGHT_SHAPE if case.is_weight else ACT_SHAPE).astype(f32)


def setup(m: methods.Method, case: Case, bits: int, x: np.ndarray):
    """(attrs, channels, {input: starting value}): the descriptor's own starting values, an
    activation's from a range 0.7 * max|x| (so that some values saturate)."""
    channels = x.shape[0] if case.per_channel else 1
    params = dict(case.params)
    attrs = m.op_attrs(bits, case.per_channel, params, case.is_weight, 0)
    vals = m.initial(bits, case.per_channel, params, case.is_weight, channels,
                     x if case.is_weight else None, 0)
    if not case.is_weight:
        vals = {**vals, **m.from_range(attrs, 0.7 * float(np.abs(x).max()),
                                       bool((x < 0).any()))}
    vals = {i.name: np.asarray(vals[i.name], f32).reshape(i.size(channels)).copy()
            for i in m.inputs}
    return attrs, channels, vals


def nd_forward(m, x, vals, attrs, training: bool) -> np.ndarray:
    """The nd front on fresh copies of the inputs (state written by the op is dropped)."""
    arrays = {k: mx.nd.array(v) for k, v in vals.items()}
    set_training({"q_" + k: v for k, v in arrays.items()}, training)
    args = [arrays[i.name] for i in m.inputs]
    return getattr(mx.nd, m.op)(mx.nd.array(x), *args, **attrs).asnumpy()


def symbol(m, attrs, channels):
    vs = [mx.sym.var(f"q_{i.name}", shape=(i.size(channels),)) for i in m.inputs]
    return getattr(mx.sym, m.op)(mx.sym.var("data"), *vs, name="q", **attrs)


def bind(m, x, vals, attrs, channels, grad_req="null"):
    exe = symbol(m, attrs, channels).simple_bind(mx.cpu(), data=x.shape, grad_req=grad_req)
    exe.arg_dict["data"][:] = x
    for k, v in vals.items():
        (exe.arg_dict if f"q_{k}" in exe.arg_dict else exe.aux_dict)[f"q_{k}"][:] = v
    return exe


def learned(m) -> list:
    return [i for i in m.inputs if i.learned]


def reference_backward(m):
    """The method's numpy reference backward, ``refs/<name>.py: <name>_backward(grad, x,
    *inputs but the mode state, [attrs])`` returning (dx, d<input>...), with ``attrs`` its
    ``*Attrs`` dataclass built from the operator attributes; None if there is none."""
    try:
        mod = importlib.import_module(f"quant_ops.refs.{m.name}")
    except ImportError:
        return None
    fn = getattr(mod, f"{m.name}_backward", None)
    if fn is None:
        return None
    kinds = [c for n, c in vars(mod).items() if n.endswith("Attrs")
             and dataclasses.is_dataclass(c) and c.__module__ == mod.__name__]

    def parse(s: str):
        if s in ("True", "False"):
            return s == "True"
        for t in (int, float):
            try:
                return t(s)
            except ValueError:
                pass
        return s

    def run(g, x, vals, attrs):
        names = [i.name for i in m.inputs if i.name != MODE_INPUT]
        extra = []
        if kinds:
            fields = {f.name for f in dataclasses.fields(kinds[0])}
            extra = [kinds[0](**{k: parse(v) for k, v in attrs.items() if k in fields})]
        out = fn(g, x, *[vals[n] for n in names], *extra)
        return dict(zip(names, out[1:]))
    return run


# -- 1. bad attributes and policy params ---------------------------------------------------

@each_method
def test_nbits_outside_the_range_is_refused_by_operator_and_policy(m):
    lo, hi = m.bits
    role = m.roles[0]
    args = [mx.nd.ones((4, 3))] + [mx.nd.ones(i.size(1)) for i in m.inputs]
    for nbits in (lo - 1, hi + 1):
        with pytest.raises(OperatorError) as e:
            getattr(mx.nd, m.op)(*args, nbits=nbits).wait_to_read()
        assert f"{m.op}: " in str(e.value), str(e.value)
        assert f"'nbits' = {nbits} is out of range [{lo}, {hi}]" in str(e.value), str(e.value)
        with pytest.raises(QuantOpsError) as e:
            QuantPolicy.from_dict({role: {"method": m.name, "bits": nbits}})
        assert f"{role}.bits = {nbits} is out of range [{lo}, {hi}]" in str(e.value)
    for nbits in (lo, hi):   # the ends are in
        QuantPolicy.from_dict({role: {"method": m.name, "bits": nbits}})
        getattr(mx.nd, m.op)(*args, nbits=nbits).wait_to_read()


@each_method
def test_unknown_attribute_is_refused(m):
    args = [mx.nd.ones((4, 3))] + [mx.nd.ones(i.size(1)) for i in m.inputs]
    with pytest.raises(OperatorError) as e:
        getattr(mx.nd, m.op)(*args, colour="red").wait_to_read()
    assert f"{m.op}: unknown attribute 'colour'" in str(e.value), str(e.value)
    # an input-only policy parameter is no operator attribute
    for k, p in m.params.items():
        if not p.attr:
            with pytest.raises(OperatorError, match=f"unknown attribute '{k}'"):
                getattr(mx.nd, m.op)(*args, **{k: 1}).wait_to_read()


@each_method
def test_role_defaults_are_valid_policy_params_and_the_operator_takes_them(m):
    for role, params in m.defaults.items():
        assert role in m.roles, role
        for k, v in params.items():
            assert k in m.params and m.params[k].check(v), (role, k, v)
        attrs = m.op_attrs(m.default_bits, False, {}, role == "weight")
        args = [mx.nd.ones((4, 3))] + [mx.nd.ones(i.size(1)) for i in m.inputs]
        getattr(mx.nd, m.op)(*args, **attrs).wait_to_read()
        # a policy value wins over the default
        k, v = next(iter(params.items()))
        if isinstance(v, bool):
            assert m.op_attrs(m.default_bits, False, {k: not v}, role == "weight")[k] == \
                str(not v)


@each_method
def test_training_params_are_valid_for_their_role_and_the_operator_takes_them(m):
    """What ``QuantPolicy.for_training`` adds is a policy param the role accepts, and the
    operator runs with it (training forward, then inference)."""
    for role in m.roles:
        is_weight = role == "weight"
        for bits in range(m.bits[0], min(m.bits[1], 8) + 1):
            params = m.training_params(bits, is_weight)
            for k, v in params.items():
                assert k in m.params and m.params[k].check(v) and role in m.params[k].roles
            if not params:
                continue
            attrs = m.op_attrs(bits, False, params, is_weight)
            x = mx.nd.array(np.linspace(-2, 2, 12, dtype=np.float32).reshape(4, 3))
            init = m.initial(bits, False, params, is_weight, 1, x.asnumpy(), 0)
            args = [x] + [mx.nd.array(init[i.name]) for i in m.inputs]
            with autograd.record():
                getattr(mx.nd, m.op)(*args, **attrs).wait_to_read()
            getattr(mx.nd, m.op)(*args, **attrs).wait_to_read()


@each_method
def test_policy_params_refuse_bad_values_and_the_operator_takes_good_ones(m):
    args = [mx.nd.ones((4, 3))] + [mx.nd.ones(i.size(1)) for i in m.inputs]
    for k, p in m.params.items():
        role = next(r for r in m.roles if r in p.roles)   # a role the param is for
        if set(m.roles) - set(p.roles):
            other = next(r for r in m.roles if r not in p.roles)
            with pytest.raises(QuantOpsError, match=rf"{other}.params.{k}: .* for "
                                                    rf"{role}s only"):
                QuantPolicy.from_dict({other: {"method": m.name, "bits": m.default_bits,
                                               "params": {k: next(v for v in CANDIDATES
                                                                  if p.check(v))}}})
        for bad in BAD_VALUES:
            with pytest.raises(QuantOpsError) as e:
                QuantPolicy.from_dict({role: {"method": m.name, "bits": m.default_bits,
                                              "params": {k: bad}}})
            assert f"{role}.params.{k} = {bad!r} must be {p.what}" in str(e.value)
        quoted = re.findall(r"'([^']*)'", p.what)   # a choice's options
        good = [v for v in CANDIDATES + quoted if p.check(v)]
        assert good, f"{m.name}: no plausible value passes the check of params.{k}"
        for v in good:   # what the policy lets through, the operator takes
            pol = QuantPolicy.from_dict({role: {"method": m.name, "bits": m.default_bits,
                                                "params": {k: v}}})
            attrs = getattr(pol, role).op_attrs(is_weight=role == "weight")
            assert (k in attrs) == p.attr
            y = getattr(mx.nd, m.op)(*args, **attrs).asnumpy()
            assert y.shape == (4, 3)
        if p.attr:
            attrs = m.op_attrs(m.default_bits, False, {}, role == "weight")
            with pytest.raises(OperatorError, match=f"{m.op}: attribute '{k}'"):
                getattr(mx.nd, m.op)(*args, **{**attrs, k: "bogus"}).wait_to_read()
    role = m.roles[0]
    with pytest.raises(QuantOpsError, match=rf"unknown key '{role}\.params\.colour'"):
        QuantPolicy.from_dict({role: {"method": m.name, "bits": m.default_bits,
                                      "params": {"colour": 1}}})


# -- 2. shapes ------------------------------------------------------------------------------

@each_method
def test_wrong_shaped_inputs_are_clear_errors(m):
    if not m.inputs:
        pytest.skip(f"{m.op} has no input after data")
    for case in cases(m):
        x = data_for(case)
        attrs, channels, vals = setup(m, case, m.default_bits, x)
        for inp in m.inputs:
            size = inp.size(channels)
            for shape in ((size + 2,), (size, 1), (1, size)):
                bad = {**vals, inp.name: np.ones(shape, f32)}
                args = [mx.nd.array(bad[i.name]) for i in m.inputs]
                with pytest.raises(mx.base.MXNetError) as e:   # OperatorError is one
                    getattr(mx.nd, m.op)(mx.nd.array(x), *args, **attrs).wait_to_read()
                assert isinstance(e.value, OperatorError), str(e.value)
                assert f"'{inp.name}'" in str(e.value), (case, inp.name, str(e.value))
                # the symbol front refuses it at shape inference
                vs = [mx.sym.var(f"q_{i.name}", shape=np.shape(bad[i.name]))
                      for i in m.inputs]
                sym = getattr(mx.sym, m.op)(mx.sym.var("data"), *vs, **attrs)
                with pytest.raises(mx.base.MXNetError, match=f"'{inp.name}'"):
                    sym.infer_shape(data=x.shape)


# -- 3. symbol executor ---------------------------------------------------------------------

@each_method
def test_symbol_executor_equals_nd_in_inference_and_training(m):
    sym = symbol(m, {}, 1)
    assert sym.list_arguments() == ["data"] + [f"q_{i.name}" for i in m.inputs if i.learned]
    assert sym.list_auxiliary_states() == [f"q_{i.name}" for i in m.inputs if not i.learned]
    for case in cases(m):
        x = data_for(case, 1)
        attrs, channels, vals = setup(m, case, m.default_bits, x)
        # variables without a shape: the wrapper gives them the descriptor's rank and the
        # operator infers their size from the data
        vs = [mx.sym.var(f"q_{i.name}") for i in m.inputs]
        arg_shapes, out_shapes, aux_shapes = getattr(mx.sym, m.op)(
            mx.sym.var("data"), *vs, **attrs).infer_shape(data=x.shape)
        assert out_shapes == [x.shape]
        assert arg_shapes[1:] == [(i.size(channels),) for i in m.inputs if i.learned]
        assert aux_shapes == [(i.size(channels),) for i in m.inputs if not i.learned]
        for training in (False, True):
            exe = bind(m, x, vals, attrs, channels)
            assert set_training(exe.aux_dict, training) == int(MODE_INPUT in m.input_names)
            arrays = {k: mx.nd.array(v) for k, v in vals.items()}
            set_training({f"q_{k}": v for k, v in arrays.items()}, training)
            for step in range(2):   # the second pass runs on the state the first one wrote
                # (the output is read first: see test_state_written_by_a_forward_is_visible)
                y = exe.forward(is_train=training)[0].asnumpy()
                want = getattr(mx.nd, m.op)(mx.nd.array(x), *[arrays[i.name] for i in m.inputs],
                                            **attrs).asnumpy()
                where = f"{case} training={training} pass {step}"
                assert y.shape == x.shape and np.isfinite(y).all(), where
                assert np.array_equal(y, want), where
                for i in m.inputs:   # the same state written
                    if not i.learned:
                        assert np.array_equal(exe.aux_dict[f"q_{i.name}"].asnumpy(),
                                              arrays[i.name].asnumpy()), (where, i.name)


@pytest.mark.parametrize("m", [m for m in METHODS if MODE_INPUT in m.input_names],
                         ids=[m.name for m in METHODS if MODE_INPUT in m.input_names])
@pytest.mark.xfail(strict=False, reason=(
    "known bug: the graph executor does not order a read of an auxiliary state after the "
    "forward that writes it (exe.aux_dict[...].asnumpy() right after exe.forward() returns "
    "the state from before the pass, most of the time); the nd and Gluon fronts are fine"))
def test_state_written_by_a_forward_is_visible(m):
    case = Case(m.roles[-1])
    x = np.random.default_rng(9).normal(0, 1, (64, 256)).astype(f32)
    attrs, channels, vals = setup(m, case, m.default_bits, x)
    stale = 0
    for _ in range(20):
        exe = bind(m, x, vals, attrs, channels)
        set_training(exe.aux_dict, True)
        exe.forward(is_train=True)
        stale += exe.aux_dict[f"q_{MODE_INPUT}"].asnumpy()[0] != 1   # one training pass
    assert stale == 0, f"{stale} of 20 reads saw the state from before the pass"


# -- 4. gradients of learned inputs ---------------------------------------------------------

def _fd(m, x, vals, attrs, r, name: str, k: int) -> float:
    """Central difference of L = sum(y * r) in component k of input ``name``, with a step
    far above the quantization step at the top bit width (the loss is piecewise constant
    below it) and far below the input's scale."""
    h = 2e-3 * max(1.0, abs(float(vals[name][k])))

    def loss(d):
        v = vals[name].copy()
        v[k] = f32(v[k] + d)
        return float((nd_forward(m, x, {**vals, name: v}, attrs, True).astype(np.float64)
                      * r).sum())
    return (loss(h) - loss(-h)) / (2 * h)


@each_method
def test_learned_gradients_flow_and_are_right(m):
    if not learned(m):
        pytest.skip(f"{m.op} learns nothing")
    ref = reference_backward(m)
    nonzero = {i.name: False for i in learned(m)}
    for case in cases(m, with_flags=True):
        x = data_for(case, 2)
        r = np.random.default_rng(3).uniform(0.5, 1.5, x.shape).astype(f32)
        attrs, channels, vals = setup(m, case, m.bits[1], x)   # top bits: FD sees the clip
        exe = bind(m, x, vals, attrs, channels, grad_req="write")
        set_training(exe.aux_dict, True)
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(r))
        grads = {i.name: exe.grad_dict[f"q_{i.name}"].asnumpy() for i in learned(m)}
        want_ref = ref(r, x, vals, attrs) if ref is not None else None
        for i in learned(m):
            g = grads[i.name]
            assert g.shape == (i.size(channels),) and np.isfinite(g).all()
            nonzero[i.name] |= bool(np.any(g != 0))
            fd = np.array([_fd(m, x, vals, attrs, r, i.name, k) for k in range(g.size)])
            scale = max(float(np.abs(fd).max()), float(np.abs(g).max()))
            if np.allclose(g, fd, rtol=0.05, atol=0.02 * scale + 1e-6):
                continue
            # the estimator is a deliberate surrogate (an STE, a soft function, a gradient
            # scale), not the derivative of the hard forward: the reference is the spec
            assert want_ref is not None, (
                f"{m.name} {case}: d/d{i.name} = {g}, finite difference {fd}, and no "
                f"reference backward in quant_ops/refs/{m.name}.py to say it is meant")
            want = np.asarray(want_ref[i.name], f32).reshape(g.shape)
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7 * float(np.abs(want).max()),
                                       err_msg=f"{m.name} {case} d/d{i.name}")
    assert all(nonzero.values()), f"no gradient ever reaches {nonzero}"


@each_method
def test_grad_req_add_accumulates(m):
    """Two backward passes under grad_req='add' give twice one pass's gradient, for data
    and every learned input, in the symbol and the nd front (the ops.py wrappers)."""
    for case in cases(m):
        x = data_for(case, 4)
        r = np.random.default_rng(5).normal(0, 1, x.shape).astype(f32)
        attrs, channels, vals = setup(m, case, m.default_bits, x)
        names = ["data"] + [f"q_{i.name}" for i in learned(m)]
        once = {}
        for req in ("write", "add"):
            exe = bind(m, x, vals, attrs, channels, grad_req=req)
            for k in names:
                exe.grad_dict[k][:] = 0
            for _ in range(1 if req == "write" else 2):
                exe.forward(is_train=True)
                exe.backward(mx.nd.array(r))
            got = {k: exe.grad_dict[k].asnumpy() for k in names}
            if req == "write":
                once = got
            else:
                for k in names:
                    np.testing.assert_allclose(got[k], 2 * once[k], rtol=1e-6, atol=1e-30,
                                               err_msg=f"symbol {case} {k}")
        # nd: leaves attached with grad_req='add'
        arrays = {"data": mx.nd.array(x), **{f"q_{k}": mx.nd.array(v) for k, v in vals.items()}}
        for k in names:
            arrays[k].attach_grad(grad_req="add")
        for _ in range(2):
            with autograd.record():
                y = getattr(mx.nd, m.op)(*[arrays["data"]] +
                                         [arrays[f"q_{i.name}"] for i in m.inputs], **attrs)
            y.backward(mx.nd.array(r))
        for k in names:
            np.testing.assert_allclose(arrays[k].grad.asnumpy(), 2 * once[k], rtol=1e-6,
                                       atol=1e-30, err_msg=f"nd {case} {k}")


# -- 5. graph insertion ---------------------------------------------------------------------

def float_net(signed_input: bool = False):
    """Every layer reads a ReLU's output, so that unsigned activation methods may quantize
    it (on a tensor that can be negative they take their signed form or are refused:
    test_signed_tensors_get_a_signed_form_or_a_refusal); ``signed_input``: the first layer
    reads the network input itself."""
    data = mx.sym.var("data")
    y = data if signed_input else mx.sym.relu(data, name="relu_in")
    y = mx.sym.Convolution(y, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv0")
    y = mx.sym.relu(y, name="relu0")
    y = mx.sym.Convolution(y, num_filter=6, kernel=(3, 3), name="conv1")
    y = mx.sym.relu(y, name="relu1")
    y = mx.sym.FullyConnected(y, num_hidden=5, name="fc")
    shapes = dict(zip(y.list_arguments(), y.infer_shape(data=(2, 3, 6, 6))[0]))
    rng = np.random.default_rng(7)
    params = {k: rng.normal(0, 0.3, s).astype(f32) for k, s in shapes.items() if k != "data"}
    return Graph.from_symbol(y), params


def policy_for(m, bits: int | None = None) -> QuantPolicy:
    """This method for every role it has (weights per channel where it can); roles it has
    not stay float."""
    bits = m.default_bits if bits is None else bits
    d, float_roles = {}, {}
    for role in ROLES:
        if role in m.roles:
            d[role] = {"method": m.name, "bits": bits,
                       "per_channel": role == "weight" and m.per_channel}
        else:
            float_roles[role] = None
    if float_roles:
        d["overrides"] = [{"match": "*", **float_roles}]
    return QuantPolicy.from_dict(d)


def batches(n=2):
    rng = np.random.default_rng(8)
    return [rng.normal(0.2, 1, (2, 3, 6, 6)).astype(f32) for _ in range(n)]


@each_method
def test_insert_strip_and_reinsert(m):
    g, params = float_net()
    pol = policy_for(m)
    q = quantize_graph(g, params, pol)
    assert strip_quantizers(q.graph).to_json() == g.to_json()
    shapes = {k: np.shape(v) for k, v in params.items()}
    again = insert_quantizers(q.graph, pol, shapes, params)
    assert again.graph.to_json() == q.graph.to_json() and not again.new_params
    qs = quantizers(q.graph)
    layers = sum(n.op in pol.quantize_ops for _, n in g.ops())
    assert len(qs) == layers * len(m.roles)
    assert all(q_.method is m for q_ in qs)
    variables = {n.name: n for n in q.graph.nodes if n.is_var}
    for qz in qs:
        assert qz.is_weight == (qz.tensor.endswith("_weight"))
        channels = params[qz.tensor].shape[qz.channel_axis] \
            if qz.is_weight and m.per_channel else 1
        assert qz.per_channel == (qz.is_weight and m.per_channel)
        assert set(qz.inputs) == {i.name for i in m.inputs}
        for inp in m.inputs:
            name = f"{qz.name}_{inp.name}"
            assert qz.inputs[inp.name] == name
            assert q.params[name].shape == (inp.size(channels),), name
            assert variables[name].attrs["__shape__"] == str((inp.size(channels),))
        assert set(qz.learned()) == {i.name for i in learned(m)}
    x = batches(1)[0]
    (y,) = run_once(q.graph, q.params, {"data": x})
    assert y.shape == (2, 5) and np.isfinite(y).all()


# -- 6. calibration -------------------------------------------------------------------------

def _observed(graph: Graph, params: dict, tensors: list, xs: list) -> dict:
    """{tensor: (max |t|, any t < 0)} over the batches, in the float graph."""
    fg = strip_quantizers(graph)
    names = set(fg.to_symbol().get_internals().list_outputs())
    keys = [t if t in names else f"{t}_output" for t in tensors]
    res = {t: (0.0, False) for t in tensors}
    for x in xs:
        outs = run_once(fg, params, {"data": x}, outputs=keys)
        for t, v in zip(tensors, outs):
            a, neg = res[t]
            res[t] = (max(a, float(np.abs(v).max())), neg or bool((v < 0).any()))
    return res


@each_method
def test_calibration_fills_every_range_input(m):
    if "activation" not in m.roles:
        pytest.skip(f"{m.name} quantizes no activation")
    pol = policy_for(m)
    # a signed network input where the method can quantize one (signed, or a signed form)
    signed = not m.unsigned(pol.activation.op_attrs(is_weight=False)) \
        or m.signed_params({}) is not None
    g, params = float_net(signed_input=signed)
    q = quantize_graph(g, params, pol)
    xs = batches()
    qp, ranges = calibrate_graph(q.graph, q.params, xs, "minmax", progress=False)
    acts = activation_quantizers(q.graph)
    assert acts and set(ranges) == {a.name for a in acts}
    seen = _observed(q.graph, q.params, sorted({a.tensor for a in acts}), xs)
    assert any(neg for _, neg in seen.values()) == signed
    assert not all(neg for _, neg in seen.values())
    for a in acts:
        amax, negative = seen[a.tensor]
        assert ranges[a.name] == pytest.approx(amax, rel=1e-6)
        want = m.from_range(a.attrs, amax, negative)
        filled = []
        if [i for i in m.inputs if i.name != MODE_INPUT]:
            assert want, f"{m.name}: calibration sets none of {m.input_names[1:]}"
        for key, value in want.items():
            assert key in a.inputs, (a.name, key)
            got = np.asarray(qp[a.inputs[key]])
            assert got.shape == q.params[a.inputs[key]].shape
            np.testing.assert_allclose(got, np.asarray(value).reshape(got.shape), rtol=1e-6,
                                       err_msg=f"{a.name} {key}")
            filled.append(np.any(got != 0))
        assert not want or any(filled), (a.name, want)   # a range, not zeros
    (y,) = run_once(q.graph, qp, {"data": xs[0]})
    assert np.isfinite(y).all()


# -- 7. export ------------------------------------------------------------------------------

def _calibrated(m, bits):
    g, params = float_net()
    q = quantize_graph(g, params, policy_for(m, bits))
    xs = batches()
    qp = q.params
    if "activation" in m.roles:
        qp, _ = calibrate_graph(q.graph, q.params, xs, "minmax", progress=False)
    return q.graph, qp, xs


@each_method
def test_export_or_a_clear_refusal(m, tmp_path):
    from quant_ops.export.align import check_alignment
    from quant_ops.export.onnx_qdq import check_exportable, export_onnx

    if not m.exportable:
        graph, params, xs = _calibrated(m, m.default_bits)
        first = quantizers(graph)[0]
        with pytest.raises(QuantOpsError) as e:
            check_exportable(graph, params)
        assert f"'{first.name}'" in str(e.value) and m.qdq_reason in str(e.value)
        with pytest.raises(QuantOpsError, match=re.escape(m.qdq_reason)):
            export_onnx(graph, params, tmp_path / "m.onnx", {"data": xs[0].shape})
        return
    # 8 bits from opset 13, 4 bits from opset 21 (ONNX's INT4/UINT4), where the method has them
    widths = [(b, o) for b, o in ((8, 13), (4, 21)) if m.bits[0] <= b <= m.bits[1]]
    assert widths
    for bits, opset in widths:
        graph, params, xs = _calibrated(m, bits)
        check_exportable(graph, params, opset)
        if opset > 13:
            with pytest.raises(QuantOpsError, match=f"opset >= {opset}"):
                check_exportable(graph, params, 13)
        path, dgraph, dparams = export_onnx(graph, params, tmp_path / f"m{bits}.onnx",
                                            {"data": xs[0].shape}, opset=opset)
        r = check_alignment(path, dgraph, dparams, {"data": xs[0]})
        assert r["isolated_identical_min"] == 1.0, (bits, r["quantizers_isolated"])
        assert r["identical_all"] > 0.99, (bits, r["quantizers"])
        assert r["outputs"][0]["cosine"] > 0.9999, (bits, r["outputs"])


# -- the registry is the one source ---------------------------------------------------------

def test_every_stage_derives_from_the_registry():
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph

    from quant_ops.export.onnx_qdq import OPSETS

    assert quant_ops.ops.OP_INPUTS == {m.op: m.input_names for m in METHODS}
    assert set(quant_ops.ops.QUANTIZERS) == set(methods.quantizer_ops()) \
        == {m.op for m in METHODS}
    assert quant_ops.ops.LEARNED_INPUTS == {i.name for m in METHODS for i in learned(m)}
    for m in METHODS:
        assert methods.get(m.name) is m and methods.of_op(m.op) is m
        for mod in (mx.nd, mx.sym):   # the gradient-accumulation wrappers are installed
            assert hasattr(getattr(mod, m.op), "__qo_raw__"), (m.op, mod.__name__)
        QuantSpec(m.name, m.default_bits)   # the policy knows it
        for opset in OPSETS:
            registered = m.op in MXNetGraph.registry_.get(opset, {})
            assert registered == m.exportable, (m.name, opset)
    with pytest.raises(QuantOpsError) as e:
        QuantSpec("no_such_method")
    assert all(m.name in str(e.value) for m in METHODS)
    with pytest.raises(QuantOpsError, match="already registered"):
        methods.register(METHODS[0])


@each_method
def test_descriptor_is_consistent(m):
    lo, hi = m.bits
    assert 1 <= lo <= m.default_bits <= hi <= 16
    assert m.roles and set(m.roles) <= set(ROLES)
    assert m.per_channel == (m.channel_attr is not None)
    assert len({i.name for i in m.inputs}) == len(m.inputs)
    assert "data" not in {i.name for i in m.inputs}
    for i in m.inputs:
        assert i.domain is None or i.learned, i.name   # only SGD moves a value out
        if i.name == MODE_INPUT:
            assert not i.learned and i.size(7) == 2
    if m.range_input is not None:
        assert m.range_input in m.input_names
    if m.exportable:
        assert m.range_input is not None, "export reads the range input"
    else:
        assert isinstance(m.qdq_reason, str) and m.qdq_reason
    for role in m.roles:
        attrs = m.op_attrs(m.default_bits, False, {}, role == "weight")
        assert set(m.from_range(attrs, 2.0, True)) <= set(m.input_names[1:])
        init = m.initial(m.default_bits, False, {}, role == "weight", 1, None, 0)
        assert set(init) == set(m.input_names[1:])


@each_method
def test_signed_tensors_get_a_signed_form_or_a_refusal(m):
    """An activation method that represents [0, a] only, put on a tensor that can be
    negative (the network input), switches to its signed form where it has one and says so,
    or is refused naming the node; a signed method is placed as it is."""
    data = mx.sym.var("data")
    y = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="conv0")
    shapes = dict(zip(y.list_arguments(), y.infer_shape(data=(2, 3, 6, 6))[0]))
    params = {k: np.ones(s, f32) for k, s in shapes.items() if k != "data"}
    if "activation" not in m.roles:
        pytest.skip(f"{m.name} has no activation role")
    pol = QuantPolicy.from_dict({"activation": {"method": m.name, "bits": m.default_bits},
                                 "weight": {"method": "int8", "bits": 8}})
    spec_attrs = pol.activation.op_attrs(is_weight=False)
    if not m.unsigned(spec_attrs):
        q = quantize_graph(Graph.from_symbol(y), params, pol)
        assert not any("signed form" in n for n in q.notes)
        return
    if m.signed_params({}) is None:
        with pytest.raises(QuantOpsError, match="input of 'conv0', can be negative"):
            quantize_graph(Graph.from_symbol(y), params, pol)
        return
    q = quantize_graph(Graph.from_symbol(y), params, pol)
    (act,) = [qz for qz in quantizers(q.graph) if not qz.is_weight]
    assert not act.unsigned and any("signed form" in n for n in q.notes)
