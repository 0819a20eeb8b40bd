"""Symbol files of the seed toolkit (``_contrib_Quantization_int8`` & co. of its custom MXNet
build) convert to quant_ops operators: attributes mapped, state added, bindable, the same
output as the graph built directly with ``mx.sym.Quantization_int8``; each of the other five
seed operators (and the Python prototypes) built as the seed's graph_optimize.py wrote it,
converted, run, and compared with a numpy re-implementation of the seed's forward (FQN,
whose grid starts at min without zero point or clamp, as FQN(seed_grid=True), also in
training and through the API and the command line); the API and the command line on a seed
checkpoint, and on their own output; bad or missing state and values we cannot reproduce
(e.g. PACT_PY's one-sided clip off a ReLU) are one clear error naming the node."""
from __future__ import annotations

import json
import logging

import mxnet as mx
import numpy as np
import pytest

import quant_ops  # noqa: F401  (loads the operators)
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph, Node
from quant_ops.graph.quantize import strip_quantizers
from quant_ops.graph.seed import convert_seed_graph, is_seed_graph, seed_ops

f32 = np.float32
DATA = (2, 3, 6, 6)
SHAPES = {
    "conv0_weight": (4, 3, 3, 3), "conv0_bias": (4,),
    "deconv0_weight": (4, 2, 2, 2),                    # (in, out/groups, kh, kw)
    "fc0_weight": (5, 2 * 12 * 12), "fc0_bias": (5,),
}
# the seed's int8 preset (its utils/graph_optimize.py): nbits=7 means 2^7 - 1 levels
WEIGHT_Q = {"nbits": "7", "quant_mode": "minmax", "is_weight": "True",
            "is_weight_perchannel": "True", "delay_quant": "0", "ema_decay": "0.99",
            "grad_mode": "ste", "fix_act_scale": "False"}
ACT_Q = dict(WEIGHT_Q, is_weight="False", is_weight_perchannel="False", grad_mode="clip")


class SeedJSON:
    """Builds a seed-style symbol file node by node."""

    def __init__(self):
        self.nodes: list = []

    def add(self, op, name, attrs=None, inputs=()) -> int:
        row = {"op": op, "name": name, "inputs": [[i, 0, 0] for i in inputs]}
        if attrs:
            row["attrs"] = {k: str(v) for k, v in attrs.items()}
        self.nodes.append(row)
        return len(self.nodes) - 1

    def var(self, name, shape=None) -> int:
        attrs = {"__shape__": str(tuple(shape))} if shape else None
        return self.add("null", name, attrs)

    def quant(self, src: int, attrs: dict, op="_contrib_Quantization_int8") -> int:
        name = self.nodes[src]["name"]
        mm = self.add("null", f"{name}_minmax", {"__init__": '["constant", {"value": 0}]'})
        return self.add(op, f"{name}_Quantization_int8", attrs, [src, mm])

    @staticmethod
    def one(op: str, attrs: dict, shape, states=(), name="q") -> str:
        """data (with its shape) -> one seed node ``name`` whose state variables are
        ``<name>_<state>``."""
        b = SeedJSON()
        x = b.var("data", shape)
        return b.json(b.add(op, name, attrs, [x] + [b.var(f"{name}_{k}") for k in states]))

    def json(self, head: int) -> str:
        return json.dumps({
            "nodes": self.nodes,
            "arg_nodes": [i for i, n in enumerate(self.nodes) if n["op"] == "null"],
            "heads": [[head, 0, 0]], "attrs": {"mxnet_version": ["int", 10500]}})


def seed_net(weight_q=WEIGHT_Q, act_q=ACT_Q, fc_q=None) -> str:
    """data -> Q(act) -> conv(Q(w) per channel) -> relu -> Q(act) -> deconv(Q(w) per
    channel) -> fc(Q(w) per tensor)."""
    b = SeedJSON()
    x = b.quant(b.var("data"), act_q)
    w = b.quant(b.var("conv0_weight", SHAPES["conv0_weight"]), weight_q)
    conv = b.add("Convolution", "conv0", {"kernel": (3, 3), "pad": (1, 1), "num_filter": 4},
                 [x, w, b.var("conv0_bias", SHAPES["conv0_bias"])])
    relu = b.quant(b.add("Activation", "relu0", {"act_type": "relu"}, [conv]), act_q)
    w = b.quant(b.var("deconv0_weight", SHAPES["deconv0_weight"]), weight_q)
    deconv = b.add("Deconvolution", "deconv0", {"kernel": (2, 2), "stride": (2, 2),
                                                "num_filter": 2, "no_bias": True}, [relu, w])
    w = b.quant(b.var("fc0_weight", SHAPES["fc0_weight"]),
                fc_q or dict(weight_q, is_weight_perchannel="False"))
    fc = b.add("FullyConnected", "fc0", {"num_hidden": 5},
               [deconv, w, b.var("fc0_bias", SHAPES["fc0_bias"])])
    return b.json(fc)


def seed_params(rng) -> dict:
    """What a seed checkpoint holds: weights, and ranges in the seed's shapes (a deconv
    weight's per-channel range along its axis 0)."""
    p = {k: rng.normal(0, 0.3, s).astype(f32) for k, s in SHAPES.items()}
    p["data_minmax"] = np.array([1.7], f32)
    p["relu0_minmax"] = np.array([2.5], f32)
    p["conv0_weight_minmax"] = np.abs(p["conv0_weight"]).max(axis=(1, 2, 3))
    p["deconv0_weight_minmax"] = np.abs(p["deconv0_weight"]).max(axis=(1, 2, 3))
    p["fc0_weight_minmax"] = np.array([np.abs(p["fc0_weight"]).max()], f32)
    return p


def direct_net():
    """The same network written with quant_ops' operator (seed nbits 7 == ours 8)."""
    Q = mx.sym.Quantization_int8
    qv = mx.sym.var

    def wq(name, **kw):
        return Q(qv(name, shape=SHAPES[name]), qv(f"{name}_minmax"),
                 qv(f"{name}_Quantization_int8_qstate"), name=f"{name}_Quantization_int8",
                 nbits=8, is_weight=True, ema_decay=0.99, **kw)

    def aq(x, tensor):
        return Q(x, qv(f"{tensor}_minmax"), qv(f"{tensor}_Quantization_int8_qstate"),
                 name=f"{tensor}_Quantization_int8", nbits=8, is_weight=False,
                 ema_decay=0.99, grad_mode="clip")

    x = aq(qv("data"), "data")
    conv = mx.sym.Convolution(x, wq("conv0_weight", is_weight_perchannel=True),
                              qv("conv0_bias", shape=SHAPES["conv0_bias"]), kernel=(3, 3),
                              pad=(1, 1), num_filter=4, name="conv0")
    relu = aq(mx.sym.Activation(conv, act_type="relu", name="relu0"), "relu0")
    deconv = mx.sym.Deconvolution(relu, wq("deconv0_weight", is_weight_perchannel=True,
                                           channel_axis=1),
                                  kernel=(2, 2), stride=(2, 2), num_filter=2, no_bias=True,
                                  name="deconv0")
    return mx.sym.FullyConnected(deconv, wq("fc0_weight"),
                                 qv("fc0_bias", shape=SHAPES["fc0_bias"]), num_hidden=5,
                                 name="fc0")


def run(sym, values: dict, x: np.ndarray) -> np.ndarray:
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req="null")
    for name, arr in list(exe.arg_dict.items()) + list(exe.aux_dict.items()):
        arr[:] = x if name == "data" else values[name]
    return exe.forward(is_train=False)[0].asnumpy()


def convert(text: str, params=None, source="seed.json"):
    return convert_seed_graph(Graph.from_json(text, source), params)


# -- conversion ------------------------------------------------------------------------

def test_converts_ops_attrs_and_state():
    g = Graph.from_json(seed_net(), "seed.json")
    before = g.to_json()
    assert is_seed_graph(g)
    params = seed_params(np.random.default_rng(0))
    new, arrays = convert_seed_graph(g, params)
    assert g.to_json() == before                       # the input graph is left alone
    assert not is_seed_graph(new)
    assert not any(n.op.startswith("_contrib_") for n in new.nodes)

    index = {n.name: i for i, n in enumerate(new.nodes)}
    qs = {n.name: n for n in new.nodes if n.op == "Quantization_int8"}
    assert set(qs) == {f"{t}_Quantization_int8" for t in
                       ("data", "conv0_weight", "relu0", "deconv0_weight", "fc0_weight")}
    for name, q in qs.items():
        a = q.attrs
        assert a["nbits"] == "8"                       # seed 7: 127 levels, ours 8
        assert "quant_mode" not in a
        assert (a["delay_quant"], a["ema_decay"], a["fix_act_scale"]) == ("0", "0.99", "False")
        # three inputs: data (a leaf through the grad-sum identity), minmax, qstate
        assert len(q.inputs) == 3
        src = new.nodes[q.inputs[0][0]]
        assert new.nodes[q.inputs[1][0]].name == name[: -len("_Quantization_int8")] + "_minmax"
        st = new.nodes[q.inputs[2][0]]
        assert st.op == "null" and st.name == f"{name}_qstate"
        assert st.attrs["__shape__"] == "(2,)"
        assert index[st.name] == index[name] - 1       # right before its quantizer
        assert all(e[0] < index[name] for e in q.inputs)
        np.testing.assert_array_equal(arrays[st.name], np.zeros(2, f32))
        if name.startswith(("data", "relu0")):
            assert (a["is_weight"], a["is_weight_perchannel"], a["grad_mode"]) == \
                ("False", "False", "clip")
        else:
            assert a["is_weight"] == "True" and a["grad_mode"] == "ste"
            assert src.op == "_copy" and src.name.endswith("_qo_gradsum")
    assert qs["conv0_weight_Quantization_int8"].attrs["is_weight_perchannel"] == "True"
    assert qs["fc0_weight_Quantization_int8"].attrs["is_weight_perchannel"] == "False"
    assert qs["deconv0_weight_Quantization_int8"].attrs["channel_axis"] == "1"
    assert all("channel_axis" not in q.attrs for n, q in qs.items() if "deconv" not in n)

    mm = {n.name: n.attrs["__shape__"] for n in new.nodes if n.name.endswith("_minmax")}
    assert mm == {"data_minmax": "(1,)", "relu0_minmax": "(1,)", "conv0_weight_minmax": "(4,)",
                  "deconv0_weight_minmax": "(2,)", "fc0_weight_minmax": "(1,)"}
    # the deconv weight's range now runs along its axis 1; nothing else needed re-making
    assert set(arrays) == {f"{q}_qstate" for q in qs} | {"deconv0_weight_minmax"}
    np.testing.assert_array_equal(arrays["deconv0_weight_minmax"],
                                  np.abs(params["deconv0_weight"]).max(axis=(0, 2, 3)))
    # the layers now read the quantizers' outputs, heads renumbered
    assert new.nodes[new.heads[0][0]].name == "fc0"
    conv = new.nodes[index["conv0"]]
    assert [new.nodes[e[0]].name for e in conv.inputs] == \
        ["data_Quantization_int8", "conv0_weight_Quantization_int8", "conv0_bias"]
    # strip gives back a float graph without any state
    flat = strip_quantizers(new)
    assert not any(n.name.endswith(("_minmax", "_qstate", "_qo_gradsum")) for n in flat.nodes)


def test_converted_symbol_loads_binds_and_matches_direct_build():
    rng = np.random.default_rng(1)
    params = seed_params(rng)
    new, arrays = convert(seed_net(), params)
    sym = mx.sym.load_json(new.to_json())
    assert set(sym.list_auxiliary_states()) == {
        f"{t}_{s}" for t in ("data", "conv0_weight", "relu0", "deconv0_weight", "fc0_weight")
        for s in ("minmax", "Quantization_int8_qstate")}
    x = rng.uniform(-1.5, 1.5, DATA).astype(f32)
    # ranges as a calibrated seed checkpoint holds them: the float tensors' max |x|
    float_sym = strip_quantizers(new).to_symbol()
    relu = float_sym.get_internals()["relu0_output"]
    params["data_minmax"] = np.array([np.abs(x).max()], f32)
    params["relu0_minmax"] = np.array([run(relu, params, x).max()], f32)
    values = {**params, **arrays}
    y = run(sym, values, x)
    y_direct = run(direct_net(), values, x)
    np.testing.assert_array_equal(y, y_direct)
    assert np.abs(y).max() > 0
    # it really quantized, and stays close to the float network
    y_float = run(float_sym, params, x)
    assert not np.array_equal(y, y_float)
    assert np.abs(y - y_float).max() < 0.05 * np.abs(y_float).max()


def test_converts_without_params_and_binds():
    new, arrays = convert(seed_net())
    mm = {n.name: n.attrs["__shape__"] for n in new.nodes if n.name.endswith("_minmax")}
    # per-channel sizes come from the weights' own __shape__, the rest has one value
    assert mm == {"data_minmax": "(1,)", "relu0_minmax": "(1,)", "conv0_weight_minmax": "(4,)",
                  "deconv0_weight_minmax": "(2,)", "fc0_weight_minmax": "(1,)"}
    assert all(k.endswith("_qstate") for k in arrays)
    exe = new.to_symbol().simple_bind(mx.cpu(), data=DATA, grad_req="null")
    assert exe.aux_dict["deconv0_weight_minmax"].shape == (2,)
    assert exe.forward(is_train=False)[0].shape == (2, 5)


def test_unknown_weight_shape_gives_minmax_rank_only():
    b = SeedJSON()
    w = b.quant(b.var("w"), WEIGHT_Q)
    new, _ = convert(b.json(w))
    mm = next(n for n in new.nodes if n.name == "w_minmax")
    assert mm.attrs["__shape__"] == "(0,)"
    exe = new.to_symbol().simple_bind(mx.cpu(), w=(3, 4), grad_req="null")
    assert exe.aux_dict["w_minmax"].shape == (3,)


def test_prefixed_params_are_found():
    params = seed_params(np.random.default_rng(2))
    prefixed = {("aux:" if k.endswith("_minmax") else "arg:") + k: mx.nd.array(v)
                for k, v in params.items()}
    _, arrays = convert(seed_net(), prefixed)
    assert "deconv0_weight_minmax" in arrays
    assert isinstance(arrays["deconv0_weight_minmax"], np.ndarray)


def test_seed_nbits_is_levels_2_pow_n_minus_1():
    """The seed's step was amax / (2^nbits - 1): seed nbits 3 is quant_ops nbits 4."""
    b = SeedJSON()
    w = b.quant(b.var("w", (2, 5)), dict(WEIGHT_Q, nbits="3"))
    new, arrays = convert(b.json(w))
    assert new.nodes[-1].attrs["nbits"] == "4"
    rng = np.random.default_rng(3)
    wv = rng.normal(0, 1, (2, 5)).astype(f32)
    y = run_weight(new, wv, arrays)
    amax = np.abs(wv).max(axis=1, keepdims=True)
    unit = amax / 7                                   # seed: QUANT_LEVEL = 2^3 - 1
    np.testing.assert_allclose(y, np.round(wv / unit) * unit, rtol=1e-6, atol=1e-7)


def run_weight(graph, wv, arrays):
    exe = graph.to_symbol().simple_bind(mx.cpu(), grad_req="null")
    exe.arg_dict["w"][:] = wv
    for k, v in arrays.items():
        exe.aux_dict[k][:] = v
    return exe.forward(is_train=False)[0].asnumpy()


def test_seed_defaults_and_dropped_attributes(caplog):
    b = SeedJSON()
    x = b.quant(b.var("data"), {"quant_mode": "minmax", "workspace": "512"})
    with caplog.at_level(logging.INFO, logger="quant_ops.graph.seed"):
        new, _ = convert(b.json(x))
    a = new.nodes[-1].attrs
    # seed defaults: nbits 8 (255 levels -> ours 9), is_weight True
    assert a["nbits"] == "9" and a["is_weight"] == "True"
    assert "quant_mode" not in a and "workspace" not in a
    text = caplog.text
    assert "quant_mode" in text and "workspace" in text and "nbits" in text
    assert "data_Quantization_int8" in text


def test_value_spellings_are_mapped():
    b = SeedJSON()
    x = b.quant(b.var("data"), {"nbits": " 7", "is_weight": "false", "fix_act_scale": "1",
                                "is_weight_perchannel": "TRUE", "delay_quant": "-5",
                                "ema_decay": "9.9e-1"})
    new, _ = convert(b.json(x))
    a = new.nodes[-1].attrs
    assert a["is_weight"] == "False" and a["fix_act_scale"] == "True"
    assert a["is_weight_perchannel"] == "False"      # the seed ignored it on activations
    assert a["delay_quant"] == "0" and a["nbits"] == "8" and a["ema_decay"] == "9.9e-1"
    new.to_symbol()  # our operator takes the values


def test_custom_python_prototype_converts():
    b = SeedJSON()
    x = b.quant(b.var("data"), dict(ACT_Q, op_type="Quantization_int8_PY",
                                    bias_correct="False"), op="Custom")
    g = Graph.from_json(b.json(x))
    assert is_seed_graph(g)
    new, _ = convert_seed_graph(g)
    q = new.nodes[-1]
    assert q.op == "Quantization_int8" and "op_type" not in q.attrs
    assert "bias_correct" not in q.attrs


def test_already_converted_graph_is_unchanged():
    new, _ = convert(seed_net())
    again, arrays = convert_seed_graph(new)
    assert again.to_json() == new.to_json() and arrays == {}


# -- the other seed operators: built as the seed's utils/graph_optimize.py wrote them ---------
#
# create_quant_node() named a quantizer ``<tensor>_<Op>`` and its state ``<tensor>_pact_gamma``
# (PACT, an argument) / ``<tensor>_alpha`` (GDRQ, an auxiliary state), with the attributes of
# the setting written as strings; FQN's aux states got MXNet's names ``<quantizer>_min`` /
# ``_max``.  QIL (not in graph_optimize.py) is written as ``mx.sym.contrib.QIL`` writes it: its
# center/distance/gamma arguments named ``<quantizer>_<input>``.  Each test runs the converted
# node here and compares it with a numpy re-implementation of the SEED's forward
# (operator_cxx/contrib/*-inl.h, operator_py/*.py), which rounds half away from zero; ours
# round half to even, so inputs whose quotient lies within 1e-3 of a half-integer are left
# out (and that is the only rounding difference).

def const_init(v) -> str:
    return '["constant", {"value": ' + str(v) + '}]'   # graph_optimize.get_constant


def go_pact(b: SeedJSON, src: int, **attrs) -> int:
    name = b.nodes[src]["name"]
    g = b.add("null", f"{name}_pact_gamma", {"__init__": const_init(8.0)})
    return b.add("_contrib_PACT", f"{name}_PACT", attrs, [src, g])


def go_dorefa(b: SeedJSON, src: int, **attrs) -> int:
    return b.add("_contrib_DoReFa", f"{b.nodes[src]['name']}_DoReFa", attrs, [src])


def go_gdrq(b: SeedJSON, src: int, **attrs) -> int:
    name = b.nodes[src]["name"]
    a = b.add("null", f"{name}_alpha", {"__dtype__": "0", "__init__": const_init(1.0)})
    return b.add("_contrib_GDRQ", f"{name}_GDRQ", attrs, [src, a])


def go_fqn(b: SeedJSON, src: int, **attrs) -> int:
    q = f"{b.nodes[src]['name']}_FQN"
    return b.add("_contrib_FQN", q, attrs, [src, b.var(f"{q}_min"), b.var(f"{q}_max")])


def contrib_qil(b: SeedJSON, src: int, **attrs) -> int:
    q = f"{b.nodes[src]['name']}_QIL"
    return b.add("_contrib_QIL", q, attrs,
                 [src] + [b.var(f"{q}_{k}") for k in ("center", "distance", "gamma")])


def custom(b: SeedJSON, src: int, op_type: str, states=(), **attrs) -> int:
    q = f"{b.nodes[src]['name']}_{op_type}"
    return b.add("Custom", q, dict(attrs, op_type=op_type),
                 [src] + [b.var(f"{q}_{k}") for k in states])


def round_away(v) -> np.ndarray:
    """C's roundf / mx.nd.round: half away from zero (exact: float32 in float64)."""
    v = np.asarray(v, f32)
    return np.copysign(np.floor(np.abs(v.astype(np.float64)) + 0.5), v).astype(f32)


def off_ties(q) -> np.ndarray:
    """Quotients at least 1e-3 away from a rounding tie."""
    q = np.abs(np.asarray(q, np.float64))
    return np.abs(q - np.floor(q) - 0.5) > 1e-3


def mshadow_clip(x, a):
    """mshadow_op::clip(x, a): a above a, -a below -a."""
    return np.where(x > a, a, np.where(x < -a, -a, x)).astype(f32)


def seed_pact(x, gamma, nbits):
    """_contrib_PACT (PACT-inl.h): u = gamma * f32(1 / (2^n - 1)); round(clip(x, gamma) / u) * u."""
    g = f32(gamma)
    u = f32(g * f32(1.0 / (2 ** nbits - 1)))
    c = mshadow_clip(x, g)
    return (round_away(c / u) * u).astype(f32), c / u


def seed_pact_v2(x, gamma, nbits):
    """PACT_V2_PY: where(|x| < gamma, x, gamma * sign(x)); u = gamma / (2^n - 1)."""
    g = f32(gamma)
    u = f32(g / f32(2 ** nbits - 1))
    c = np.where(np.abs(x) < g, x, g * np.sign(x)).astype(f32)
    return (round_away(c / u) * u).astype(f32), c / u


def seed_dorefa(x, nbits, py=False):
    """_contrib_DoReFa (DoReFa-Inl.h; DoReFa_PY with ``py``): t = tanh(x), r = t / (2 max|t|)
    + 0.5, 2 * round(r / u) * u - 1 with u = f32(1 / L) (py: round(L r) / L)."""
    lv = 2 ** nbits - 1
    t = np.tanh(x.astype(np.float64)).astype(f32)      # tanhf: within an ulp
    r = (t / (f32(2) * np.abs(t).max()) + f32(0.5)).astype(f32)
    if py:
        q = (round_away(f32(lv) * r) / f32(lv)).astype(f32)
    else:
        u = f32(1.0 / lv)
        q = (round_away(r / u) * u).astype(f32)
    return (f32(2) * q - f32(1)).astype(f32), r * lv


def seed_qil(x, c, d, nbits):
    """_contrib_QIL (QIL-inl.h, fix_gamma): the signed transformer on every tensor, then
    round(t * L) / L, L = 2^n - 1."""
    c, d, lv = f32(c), f32(d), f32(2 ** nbits - 1)
    low, high = f32(c - d), f32(c + d)
    sign = np.where(x < 0, f32(-1), f32(1))
    a = np.abs(x)
    mid = sign * (f32(0.5) * (a - c) / d + f32(0.5))
    t = np.where(a < low, f32(0), np.where(a > high, sign, mid)).astype(f32)
    return (round_away(t * lv) / lv).astype(f32), t * lv


def seed_qil_py(x, p, q, nbits):
    """QIL_PY: pruning/clipping points (clamped to >= 0 / <= 1), alpha |x| + beta inside."""
    p, q, lv = max(f32(p), f32(0)), min(f32(q), f32(1)), f32(2 ** nbits - 1)
    center, distance = f32(0.5) * (q + p), f32(0.5) * (q - p)
    alpha, beta = f32(0.5) / distance, f32(-0.5) * center / distance + f32(0.5)
    a, s = np.abs(x), np.sign(x)
    inside = (a >= p) & (a <= q)
    t = (s * (a > q) + s * (alpha * a + beta) * inside).astype(f32)
    return (round_away(t * lv) / lv).astype(f32), t * lv


def seed_gdrq(x, alpha, nbits, is_weight, fix_alpha=False, lamda=0.001, ktimes=2.0, py=False):
    """_contrib_GDRQ (GDRQ-inl.h) in inference (do_quant or not): unless fix_alpha, t =
    ktimes * mean|x|, alpha = t (weights) or alpha + lamda (alpha - t) (activations, also in
    inference); u = alpha * f32(1 / L) (py: alpha / L); round(clip(x, alpha) / u) * u.
    GDRQ_PY: ktimes 3, never fixed."""
    a = f32(alpha)
    if not fix_alpha:
        t = f32(f32(ktimes) * f32(f32(np.abs(x).astype(np.float64).sum())
                                  * f32(1.0 / x.size)))
        a = t if is_weight else f32(a + f32(lamda) * (a - t))
    lv = 2 ** nbits - 1
    u = f32(a / f32(lv)) if py else f32(a * f32(1.0 / lv))
    c = mshadow_clip(x, a)
    return (round_away(c / u) * u).astype(f32), c / u, a


def run_node(graph: Graph, values: dict, **shapes) -> np.ndarray:
    """The graph's output in inference, every argument and state from ``values``."""
    exe = graph.to_symbol().simple_bind(mx.cpu(), grad_req="null", **shapes)
    for name, arr in list(exe.arg_dict.items()) + list(exe.aux_dict.items()):
        arr[:] = values[name]
    return exe.forward(is_train=False)[0].asnumpy()


def quantizer(graph: Graph, name: str) -> Node:
    return next(n for n in graph.nodes if n.name == name)


def inputs_of(graph: Graph, node: Node) -> list:
    """Input names, a leaf's gradient-sum identity seen through."""
    return [graph.nodes[e[0]].name.removesuffix("_qo_gradsum") for e in node.inputs]


@pytest.mark.parametrize("nbits", [1, 2, 4, 7])
def test_pact_is_signed_pact_with_the_seeds_bit_count(nbits):
    """_contrib_PACT clipped to [-gamma, gamma] (mshadow_op::clip) with 2^n - 1 levels each
    side: PACT(signed=True, nbits=n + 1), gamma kept."""
    b = SeedJSON()
    q = go_pact(b, b.var("data"), nbits=nbits)
    rng = np.random.default_rng(nbits)
    params = {"data_pact_gamma": np.array([2.5], f32)}
    new, arrays = convert(b.json(q), params)
    n = quantizer(new, "data_PACT")
    assert n.op == "PACT" and n.attrs == {"nbits": str(nbits + 1), "signed": "True"}
    assert inputs_of(new, n) == ["data", "data_pact_gamma"]
    gvar = quantizer(new, "data_pact_gamma")
    assert gvar.attrs["__shape__"] == "(1,)" and gvar.attrs["__init__"] == const_init(8.0)
    assert arrays == {}                              # the stored gamma is used as it is
    x = rng.normal(0, 2, (4, 3, 5, 5)).astype(f32)
    y = run_node(new, {**params, "data": x}, data=x.shape)
    want, quot = seed_pact(x, 2.5, nbits)
    ok = off_ties(quot)
    assert ok.mean() > 0.99 and (x < -2.5).any() and (x > 2.5).any()
    # the same codes; the step is gamma / L here, gamma * f32(1 / L) in the seed (an ulp)
    s = f32(2.5) / f32(2 ** nbits - 1)
    np.testing.assert_array_equal(np.rint(y / s)[ok], round_away(quot)[ok])
    np.testing.assert_allclose(y[ok], want[ok], rtol=1e-6, atol=0)
    assert y.min() == -y.max() == -np.float32(2 ** nbits - 1) * s


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_pact_v2_prototype_is_signed_pact_bit_for_bit(nbits):
    b = SeedJSON()
    q = custom(b, b.var("data"), "PACT_V2_PY", ["gamma"], nbits=nbits)
    new, _ = convert(b.json(q), {"data_PACT_V2_PY_gamma": np.array([1.7], f32)})
    n = quantizer(new, "data_PACT_V2_PY")
    assert n.op == "PACT" and n.attrs == {"nbits": str(nbits + 1), "signed": "True"}
    x = np.random.default_rng(5).normal(0, 1.5, (3, 40)).astype(f32)
    y = run_node(new, {"data": x, "data_PACT_V2_PY_gamma": np.array([1.7], f32)},
                 data=x.shape)
    want, quot = seed_pact_v2(x, 1.7, nbits)
    ok = off_ties(quot)
    np.testing.assert_array_equal(y[ok], want[ok])


def test_pact_on_a_relu_output_is_unsigned_pact():
    """After a ReLU the seed's clip [-gamma, gamma] is [0, gamma]: the unsigned PACT at the
    seed's nbits, the same values (and an unsigned QDQ form); the prototypes PACT_PY (upper
    clip only) and CLIP_RELU_PY (fixed clip) map there too."""
    b = SeedJSON()
    relu = b.add("Activation", "relu0", {"act_type": "relu"}, [b.var("data")])
    pool = b.add("Pooling", "pool0", {"kernel": (1, 1), "pool_type": "max"}, [relu])
    q1 = go_pact(b, pool, nbits=3)
    q2 = custom(b, relu, "PACT_PY", ["gamma"], nbits=3)
    q3 = custom(b, relu, "CLIP_RELU_PY", nbits=3, threshold=2.5)
    add = b.add("elemwise_add", "add0", None, [q1, q2])
    head = b.add("elemwise_add", "add1", None, [add, q3])
    params = {"pool0_pact_gamma": np.array([2.5], f32),
              "relu0_PACT_PY_gamma": np.array([2.5], f32)}
    new, arrays = convert(b.json(head), params)
    for name in ("pool0_PACT", "relu0_PACT_PY", "relu0_CLIP_RELU_PY"):
        assert quantizer(new, name).op == "PACT" and quantizer(new, name).attrs == {"nbits": "3"}
    # CLIP_RELU_PY's threshold became the (learned) clip value, a new variable
    assert inputs_of(new, quantizer(new, "relu0_CLIP_RELU_PY"))[1] == "relu0_CLIP_RELU_PY_gamma"
    np.testing.assert_array_equal(arrays["relu0_CLIP_RELU_PY_gamma"], [2.5])
    x = np.random.default_rng(6).normal(0, 2, (2, 3, 4, 4)).astype(f32)
    y = run_node(new, {**params, **arrays, "data": x}, data=x.shape)
    r = np.maximum(x, 0)
    u = f32(2.5) / f32(7)
    one = (round_away(np.minimum(r, f32(2.5)) / u) * u).astype(f32)   # PACT_PY / CLIP_RELU
    ok = off_ties(np.minimum(r, 2.5) / u)
    np.testing.assert_allclose(y[ok], (3 * one)[ok], rtol=1e-6)


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_dorefa_is_the_weight_form_with_the_seeds_bits(nbits):
    """_contrib_DoReFa applied the tanh weight form to whatever it was put on: DoReFa(
    is_weight=True, nbits=n), on a weight and on an activation alike."""
    b = SeedJSON()
    x = go_dorefa(b, b.var("data"), nbits=nbits)
    w = go_dorefa(b, b.var("conv0_weight", (4, 3, 3, 3)), nbits=nbits)
    conv = b.add("Convolution", "conv0", {"kernel": (3, 3), "num_filter": 4, "no_bias": True},
                 [x, w])
    new, arrays = convert(b.json(conv), {})
    for name in ("data_DoReFa", "conv0_weight_DoReFa"):
        n = quantizer(new, name)
        assert n.op == "DoReFa" and n.attrs == {"nbits": str(nbits), "is_weight": "True"}
    assert arrays == {}
    rng = np.random.default_rng(7)
    for xv in (rng.normal(0, 1, (2, 3, 4, 4)).astype(f32),
               rng.normal(0, 0.2, (4, 3, 3, 3)).astype(f32)):
        single, _ = convert(SeedJSON.one("_contrib_DoReFa", {"nbits": nbits}, xv.shape))
        y = run_node(single, {"data": xv}, data=xv.shape)
        want, quot = seed_dorefa(xv, nbits)
        ok = off_ties(quot)
        assert ok.mean() > 0.98
        # the same codes; the values within float32 noise (the seed's tanhf and f32(1 / L))
        np.testing.assert_allclose(y[ok], want[ok], rtol=0, atol=2e-6)
        lv = 2 ** nbits - 1
        np.testing.assert_array_equal(np.rint((y + 1) / 2 * lv)[ok],
                                      np.rint((want + 1) / 2 * lv)[ok])


def test_dorefa_prototype_and_one_bit():
    xv = np.random.default_rng(8).normal(0, 1, (3, 50)).astype(f32)
    new, _ = convert(SeedJSON.one("Custom", {"op_type": "DoReFa_PY"}, xv.shape))
    assert new.nodes[-1].attrs == {"nbits": "8", "is_weight": "True"}   # the prototype's 8
    y = run_node(new, {"data": xv}, data=xv.shape)
    want, quot = seed_dorefa(xv, 8, py=True)
    ok = off_ties(quot)
    np.testing.assert_allclose(y[ok], want[ok], rtol=0, atol=2e-6)
    with pytest.raises(QuantOpsError, match=r"node 'q' \(_contrib_DoReFa\): attribute "
                                            r"'nbits' = 1.*sign\(w\) \* mean\|w\|"):
        convert(SeedJSON.one("_contrib_DoReFa", {"nbits": 1}, (2, 3)))


@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_qil_is_the_signed_transform_with_the_seeds_levels(nbits):
    """_contrib_QIL: |x| and sign on every tensor, round(t * (2^n - 1)) / (2^n - 1): QIL(
    is_weight=True, nbits=n + 1, fix_gamma=True) with the stored interval, bit for bit away
    from ties, except an input of exactly 0 (the seed's sign(0) = +1)."""
    b = SeedJSON()
    q = contrib_qil(b, b.var("data"), nbits=nbits, is_weight=False)
    c, d = 0.5, 0.9                                 # the interval [c - d, c + d] holds 0
    params = {"data_QIL_center": np.array([c], f32), "data_QIL_distance": np.array([d], f32),
              "data_QIL_gamma": np.array([1.0], f32)}
    new, arrays = convert(b.json(q), params)
    n = quantizer(new, "data_QIL")
    assert n.op == "QIL" and arrays == {}
    assert n.attrs == {"nbits": str(nbits + 1), "is_weight": "True", "fix_gamma": "True"}
    assert inputs_of(new, n) == ["data", "data_QIL_center", "data_QIL_distance",
                                 "data_QIL_gamma"]
    x = np.random.default_rng(9).normal(0, 1.2, (2, 3, 8, 8)).astype(f32)
    x[0, 0, 0, :2] = [0.0, -0.0]
    y = run_node(new, {**params, "data": x}, data=x.shape)
    want, quot = seed_qil(x, c, d, nbits)
    ok = off_ties(quot) & (x != 0)
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(y[ok], want[ok])
    lv = 2 ** nbits - 1       # the documented difference: 0 -> +round(L (0.5 - 0.5 c/d)) / L
    assert (y[x == 0] == 0).all()
    assert (want[x == 0] == f32(np.floor(lv * (0.5 - 0.5 * c / d) + 0.5) / lv)).all()
    assert (want[x == 0] > 0).all()


def test_qil_on_a_relu_output_is_the_activation_form_zero_included():
    b = SeedJSON()
    relu = b.add("relu", "relu0", None, [b.var("data")])
    q = contrib_qil(b, relu, nbits=3)
    c, d = 0.6, 0.9
    params = {"relu0_QIL_center": np.array([c], f32), "relu0_QIL_distance": np.array([d], f32),
              "relu0_QIL_gamma": np.array([1.0], f32)}
    new, _ = convert(b.json(q), params)
    assert quantizer(new, "relu0_QIL").attrs == {"nbits": "3", "is_weight": "False",
                                                 "fix_gamma": "True"}
    x = np.random.default_rng(10).normal(0, 1.2, (4, 64)).astype(f32)
    y = run_node(new, {**params, "data": x}, data=x.shape)
    want, quot = seed_qil(np.maximum(x, 0), c, d, 3)
    ok = off_ties(quot)
    assert (x < 0).sum() > 50 and ok[x < 0].all()   # the zeros are in, and match
    np.testing.assert_array_equal(y[ok], want[ok])


def test_qil_prototype_points_become_center_and_distance():
    b = SeedJSON()
    q = custom(b, b.var("data"), "QIL_PY", ["pruning_point", "clipping_point", "gamma"],
               nbits=3, is_weight=True)
    p, c = 0.2, 1.4                                 # the seed clamped the clip point to 1
    params = {"data_QIL_PY_pruning_point": np.array([p], f32),
              "data_QIL_PY_clipping_point": np.array([c], f32),
              "data_QIL_PY_gamma": np.array([1.0], f32)}
    new, arrays = convert(b.json(q), params)
    n = quantizer(new, "data_QIL_PY")
    assert n.attrs == {"nbits": "4", "is_weight": "True", "fix_gamma": "True"}
    assert inputs_of(new, n) == ["data", "data_QIL_PY_center", "data_QIL_PY_distance",
                                 "data_QIL_PY_gamma"]
    # the points are not read any more: their variables are gone, new ones hold the interval
    assert not any("point" in v.name for v in new.nodes)
    np.testing.assert_array_equal(arrays["data_QIL_PY_center"], [f32(0.5) * f32(1.2)])
    np.testing.assert_array_equal(arrays["data_QIL_PY_distance"], [f32(0.5) * f32(0.8)])
    x = np.random.default_rng(11).uniform(-1.3, 1.3, (5, 60)).astype(f32)
    x = x[:, (np.abs(np.abs(x) - 0.2).min(0) > 1e-4) & (np.abs(np.abs(x) - 1).min(0) > 1e-4)]
    y = run_node(new, {**params, **arrays, "data": x}, data=x.shape)
    want, quot = seed_qil_py(x, p, c, 3)
    ok = off_ties(quot)
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(y[ok], want[ok])


@pytest.mark.parametrize("nbits", [1, 3, 4])
def test_gdrq_keeps_the_seeds_attributes_and_alpha(nbits):
    """_contrib_GDRQ (inference): a weight's clip value is ktimes * mean|w| at every forward,
    an activation's the stored one (fix_alpha, or lamda 0: the seed's update then keeps
    it); the clip [-alpha, alpha] on 2^n - 1 levels each side."""
    b = SeedJSON()
    x = go_gdrq(b, b.var("data"), nbits=nbits, is_weight=False, fix_alpha=True,
                do_quant=False, lamda=0.001)
    w = go_gdrq(b, b.var("conv0_weight", (4, 3, 3, 3)), nbits=nbits, is_weight=True)
    conv = b.add("Convolution", "conv0", {"kernel": (3, 3), "num_filter": 4, "no_bias": True},
                 [x, w])
    rng = np.random.default_rng(12)
    params = {"data_alpha": np.array([1.3], f32), "conv0_weight_alpha": np.array([0.4], f32),
              "conv0_weight": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(f32)}
    new, arrays = convert(b.json(conv), params)
    act, wq = quantizer(new, "data_GDRQ"), quantizer(new, "conv0_weight_GDRQ")
    assert act.op == wq.op == "GDRQ"
    assert act.attrs == {"nbits": str(nbits), "group_size": "-1", "is_weight": "False",
                         "lamda": "0.001", "do_quant": "False", "fix_alpha": "True",
                         "ktimes": "2", "grad_mode": "ste"}
    assert wq.attrs["is_weight"] == "True" and wq.attrs["fix_alpha"] == "False"
    assert inputs_of(new, act) == ["data", "data_alpha", "data_GDRQ_qstate"]
    assert quantizer(new, "data_alpha").attrs["__shape__"] == "(1,)"
    assert set(arrays) == {"data_GDRQ_qstate", "conv0_weight_GDRQ_qstate"}
    assert all((v == 0).all() for v in arrays.values())          # step 0, inference
    # each quantizer alone, on the seed's forward
    xv = rng.normal(0, 1, (2, 3, 6, 6)).astype(f32)
    for one_attrs, v, alpha, is_w in (
            ({"nbits": nbits, "is_weight": False, "fix_alpha": True}, xv, 1.3, False),
            ({"nbits": nbits, "is_weight": False, "lamda": 0}, xv, 1.3, False),
            ({"nbits": nbits, "is_weight": True}, params["conv0_weight"], 0.4, True)):
        single, st = convert(SeedJSON.one("_contrib_GDRQ", one_attrs, v.shape, ["alpha"]),
                             {"q_alpha": np.array([alpha])})
        y = run_node(single, {"data": v, "q_alpha": np.array([alpha], f32), **st},
                     data=v.shape)
        want, quot, a = seed_gdrq(v, alpha, nbits, is_w, one_attrs.get("fix_alpha", False),
                                  one_attrs.get("lamda", 0.001))
        ok = off_ties(quot) & (np.abs(np.abs(v) - a) > 1e-5 * a)
        assert ok.mean() > 0.98, one_attrs
        np.testing.assert_allclose(y[ok], want[ok], rtol=1e-5, atol=1e-7, err_msg=str(one_attrs))
        lv = 2 ** nbits - 1
        np.testing.assert_array_equal(np.rint(y / (a / lv))[ok], round_away(quot)[ok])


def test_gdrq_prototype_is_ktimes_3_always_quantizing():
    w = np.random.default_rng(13).normal(0, 0.5, (6, 20)).astype(f32)
    new, st = convert(SeedJSON.one("Custom", {"op_type": "GDRQ_PY", "is_weight": "True",
                                              "nbits": 3}, w.shape, ["alpha"]),
                      {"q_alpha": np.zeros(1, f32)})
    q = new.nodes[-1]
    assert q.op == "GDRQ" and q.attrs == {"nbits": "3", "group_size": "-1", "is_weight": "True",
                                          "lamda": "0.99", "do_quant": "True",
                                          "fix_alpha": "False", "ktimes": "3",
                                          "grad_mode": "ste"}
    y = run_node(new, {"data": w, "q_alpha": np.zeros(1, f32), **st}, data=w.shape)
    want, quot, a = seed_gdrq(w, 0.0, 3, True, ktimes=3.0, py=True)
    ok = off_ties(quot) & (np.abs(np.abs(w) - a) > 1e-5 * a)
    np.testing.assert_allclose(y[ok], want[ok], rtol=1e-5, atol=1e-7)


# FQN: the seed's grid starts at the stored min, has no zero point and no clamp (FQN-inl.h,
# FQN_PY.py); it converts to FQN(seed_grid=True).  Rounding differs only at exact ties (half
# away from zero there, half to even here), and the C++ seed's step was (max - min) *
# float(1 / L) where ours (and FQN_PY's) is (max - min) / L: an ulp in the step.  The data
# below is built, or checked, to hold no quotient within 1e-3 of a tie.

def seed_fqn(x, mn, mx_, nbits, perchannel=False, py=False):
    """The seed's FQN forward with the range [mn, mx] (per channel: along axis 0):
    round_away((x - mn) / u) * u + mn, u = (mx - mn) * f32(1 / L) (py: (mx - mn) / L)."""
    x = np.asarray(x, f32)
    shape = (-1,) + (1,) * (x.ndim - 1) if perchannel else (1,) * x.ndim
    mn = np.asarray(mn, f32).reshape(shape)
    mx_ = np.asarray(mx_, f32).reshape(shape)
    lv = 2 ** nbits - 1
    u = ((mx_ - mn) / f32(lv) if py else (mx_ - mn) * f32(1.0 / lv)).astype(f32)
    quot = ((x - mn) / u).astype(f32)
    return (round_away(quot) * u + mn).astype(f32), quot


def seed_fqn_train_range(x, perchannel=False):
    """The range the seed stored in a training forward: the batch's min and max; per channel
    (axis 0) the channel's, with 1e-6 added to each max (in float32)."""
    x = np.asarray(x, f32)
    if not perchannel:
        return np.array([x.min()], f32), np.array([x.max()], f32)
    rows = x.reshape(x.shape[0], -1)
    return rows.min(axis=1), (rows.max(axis=1) + f32(1e-6)).astype(f32)


def off_tie_values(x, mn, mx_, nbits, perchannel=False):
    """x with every value whose seed quotient lies within 1e-3 of a tie moved by 0.01 of a
    step (so neither rounding nor an ulp of the step can tell the two apart)."""
    _, quot = seed_fqn(x, mn, mx_, nbits, perchannel)
    shape = (-1,) + (1,) * (x.ndim - 1) if perchannel else (1,) * x.ndim
    u = ((np.asarray(mx_, f32) - np.asarray(mn, f32)) / f32(2 ** nbits - 1)).reshape(shape)
    x = np.where(off_ties(quot), x, x + f32(0.01) * u).astype(f32)
    assert off_ties(seed_fqn(x, mn, mx_, nbits, perchannel)[1]).all()
    return x


FQN_SHAPES = {"conv0_weight": (4, 3, 3, 3), "fc0_weight": (5, 4 * 6 * 6)}


def seed_fqn_net(nbits, op="_contrib_FQN") -> str:
    """graph_optimize.py with FQN settings: act {nbits, is_perchannel: False}, weight {nbits,
    is_perchannel: True} (the fc weight per tensor): data -> FQN -> conv(FQN w) -> relu -> FQN
    -> fc(FQN w).  ``op="FQN_PY"``: the prototype in the same places."""
    b = SeedJSON()

    def q(src, perchannel):
        if op == "FQN_PY":
            return custom(b, src, "FQN_PY", ["min", "max"], nbits=nbits,
                          is_perchannel=perchannel)
        return go_fqn(b, src, nbits=nbits, is_perchannel=perchannel)

    x = q(b.var("data"), False)
    w = q(b.var("conv0_weight", FQN_SHAPES["conv0_weight"]), True)
    conv = b.add("Convolution", "conv0", {"kernel": (3, 3), "pad": (1, 1), "num_filter": 4,
                                          "no_bias": True}, [x, w])
    relu = q(b.add("Activation", "relu0", {"act_type": "relu"}, [conv]), False)
    fw = q(b.var("fc0_weight", FQN_SHAPES["fc0_weight"]), False)
    return b.json(b.add("FullyConnected", "fc0", {"num_hidden": 5, "no_bias": True},
                        [relu, fw]))


def seed_fqn_checkpoint(rng, nbits, op="_contrib_FQN"):
    """(params, x): the ranges the seed stored at its last training forward, on the weights
    *before* the last update (so the final weights leave their ranges: no clamp), and an
    input off ties (it goes beyond the stored activation range too)."""
    q = "FQN_PY" if op == "FQN_PY" else "FQN"
    p = {}
    for name, shape in FQN_SHAPES.items():
        before = rng.normal(0, 0.3, shape).astype(f32)
        pc = name == "conv0_weight"
        mn, mx_ = seed_fqn_train_range(before, pc)
        w = (before + rng.normal(0, 0.05, shape)).astype(f32)
        rows = w.reshape(len(mn), -1)            # and one value per range far beyond it
        rows[:, 0] = mx_ + f32(0.75) * (mx_ - mn)
        p[name] = off_tie_values(w, mn, mx_, nbits, pc)
        p[f"{name}_{q}_min"], p[f"{name}_{q}_max"] = mn, mx_
    p[f"data_{q}_min"], p[f"data_{q}_max"] = np.array([-1.2], f32), np.array([1.9], f32)
    p[f"relu0_{q}_min"], p[f"relu0_{q}_max"] = np.array([0.0], f32), np.array([0.8], f32)
    x = off_tie_values(rng.normal(0, 1.2, (2, 3, 6, 6)).astype(f32), [-1.2], [1.9], nbits)
    return p, x


def seed_fqn_forward(p, x, nbits, op="_contrib_FQN"):
    """The seed network in inference, numpy quantizers and MXNet's own conv/relu/fc; checks
    that the relu output has no quotient near a tie either."""
    q, py = ("FQN_PY", True) if op == "FQN_PY" else ("FQN", False)
    xq, _ = seed_fqn(x, p[f"data_{q}_min"], p[f"data_{q}_max"], nbits, py=py)
    wq, _ = seed_fqn(p["conv0_weight"], p[f"conv0_weight_{q}_min"],
                     p[f"conv0_weight_{q}_max"], nbits, True, py)
    fq, _ = seed_fqn(p["fc0_weight"], p[f"fc0_weight_{q}_min"], p[f"fc0_weight_{q}_max"],
                     nbits, py=py)
    r = mx.nd.relu(mx.nd.Convolution(mx.nd.array(xq), mx.nd.array(wq), kernel=(3, 3),
                                     pad=(1, 1), num_filter=4, no_bias=True)).asnumpy()
    rq, quot = seed_fqn(r, p[f"relu0_{q}_min"], p[f"relu0_{q}_max"], nbits, py=py)
    assert off_ties(quot).all()   # the fixture holds no tie the roundings could tell apart
    return mx.nd.FullyConnected(mx.nd.array(rq), mx.nd.array(fq), num_hidden=5,
                                no_bias=True).asnumpy()


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_fqn_is_seed_grid_fqn_with_the_stored_range(nbits):
    """_contrib_FQN as graph_optimize.py wrote it: FQN(seed_grid=True) at the seed's nbits
    (2^n - 1 steps from min to max in both), per channel where the seed was, its min/max
    variables and values kept, a qstate added, the seed's STE backward; each quantizer and
    the network give the seed's values (inference: the stored ranges, not clamped)."""
    rng = np.random.default_rng(20 + nbits)
    params, x = seed_fqn_checkpoint(rng, nbits)
    new, arrays = convert(seed_fqn_net(nbits), params)
    base = {"nbits": str(nbits), "seed_grid": "True", "grad_mode": "ste"}
    for name, is_w, pc, shape in (("data_FQN", False, False, "(1,)"),
                                  ("conv0_weight_FQN", True, True, "(4,)"),
                                  ("relu0_FQN", False, False, "(1,)"),
                                  ("fc0_weight_FQN", True, False, "(1,)")):
        n = quantizer(new, name)
        assert n.op == "FQN" and n.attrs == {**base, "is_weight": str(is_w),
                                             "is_perchannel": str(pc)}, name
        assert inputs_of(new, n) == [name[:-4], f"{name}_min", f"{name}_max", f"{name}_qstate"]
        assert quantizer(new, f"{name}_min").attrs["__shape__"] == shape
        assert quantizer(new, f"{name}_max").attrs["__shape__"] == shape
    assert set(arrays) == {f"{t}_FQN_qstate" for t in ("data", "conv0_weight", "relu0",
                                                       "fc0_weight")}
    assert all(np.array_equal(v, [0, 0]) for v in arrays.values())   # step 0, inference
    values = {**params, **arrays, "data": x}
    y = run_node(new, values, data=x.shape)
    np.testing.assert_allclose(y, seed_fqn_forward(params, x, nbits), rtol=1e-5, atol=1e-5)
    # each quantizer alone: the seed's codes, values within the step's ulp
    internals = new.to_symbol().get_internals()
    for name, src, pc in (("data_FQN", x, False), ("conv0_weight_FQN", params["conv0_weight"],
                                                   True), ("fc0_weight_FQN",
                                                           params["fc0_weight"], False)):
        shapes = {"data": x.shape} if name == "data_FQN" else {}
        exe = internals[f"{name}_output"].simple_bind(mx.cpu(), grad_req="null", **shapes)
        for k, arr in list(exe.arg_dict.items()) + list(exe.aux_dict.items()):
            arr[:] = values[k]
        got = exe.forward(is_train=False)[0].asnumpy()
        mn, mx_ = params[f"{name}_min"], params[f"{name}_max"]
        want, quot = seed_fqn(src, mn, mx_, nbits, pc)
        shape = (-1,) + (1,) * (src.ndim - 1) if pc else (1,) * src.ndim
        u = ((mx_ - mn) / f32(2 ** nbits - 1)).reshape(shape)
        np.testing.assert_array_equal(np.rint((got - mn.reshape(shape)) / u), round_away(quot))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(mx_ - mn).max())
        if name != "data_FQN":   # the final weights left the stored range: not clamped
            assert (src < mn.reshape(shape)).any() or (src > mx_.reshape(shape)).any()
            assert (round_away(quot) < 0).any() or (round_away(quot) > 2 ** nbits - 1).any()


def test_fqn_training_forward_stores_the_seeds_ranges():
    """After conversion, a training forward writes what the seed wrote: the batch's min/max,
    per channel with 1e-6 on the max; the gradient passes straight through (the seed's)."""
    nbits = 4
    params, x = seed_fqn_checkpoint(np.random.default_rng(30), nbits)
    new, arrays = convert(seed_fqn_net(nbits), params)
    exe = new.to_symbol().simple_bind(mx.cpu(), data=x.shape, grad_req="write")
    for k, arr in list(exe.arg_dict.items()) + list(exe.aux_dict.items()):
        arr[:] = {**params, **arrays, "data": x}[k]
    quant_ops.set_training(exe.aux_dict, True)
    exe.forward(is_train=True)
    g = np.random.default_rng(31).normal(0, 1, exe.outputs[0].shape).astype(f32)
    exe.backward(mx.nd.array(g))
    for t, v, pc in (("data", x, False), ("conv0_weight", params["conv0_weight"], True),
                     ("fc0_weight", params["fc0_weight"], False)):
        mn, mx_ = seed_fqn_train_range(v, pc)
        np.testing.assert_array_equal(exe.aux_dict[f"{t}_FQN_min"].asnumpy(), mn)
        np.testing.assert_array_equal(exe.aux_dict[f"{t}_FQN_max"].asnumpy(), mx_)
        assert exe.aux_dict[f"{t}_FQN_qstate"].asnumpy().tolist() == [1, 1]
    assert np.isfinite(exe.grad_dict["conv0_weight"].asnumpy()).all()
    assert np.abs(exe.grad_dict["fc0_weight"].asnumpy()).max() > 0


@pytest.mark.parametrize("nbits", [2, 4])
def test_fqn_prototype_is_seed_grid_bit_for_bit(nbits):
    """FQN_PY (the same grid, its step divided by L as ours is): the same bits off ties."""
    params, x = seed_fqn_checkpoint(np.random.default_rng(40 + nbits), nbits, "FQN_PY")
    new, arrays = convert(seed_fqn_net(nbits, "FQN_PY"), params)
    n = quantizer(new, "conv0_weight_FQN_PY")
    assert n.op == "FQN" and n.attrs == {"nbits": str(nbits), "seed_grid": "True",
                                         "grad_mode": "ste", "is_weight": "True",
                                         "is_perchannel": "True"}
    assert inputs_of(new, n)[1:] == ["conv0_weight_FQN_PY_min", "conv0_weight_FQN_PY_max",
                                     "conv0_weight_FQN_PY_qstate"]
    internals = new.to_symbol().get_internals()
    values = {**params, **arrays, "data": x}
    for name, src, pc in (("data_FQN_PY", x, False),
                          ("conv0_weight_FQN_PY", params["conv0_weight"], True),
                          ("fc0_weight_FQN_PY", params["fc0_weight"], False)):
        shapes = {"data": x.shape} if name == "data_FQN_PY" else {}
        exe = internals[f"{name}_output"].simple_bind(mx.cpu(), grad_req="null", **shapes)
        for k, arr in list(exe.arg_dict.items()) + list(exe.aux_dict.items()):
            arr[:] = values[k]
        got = exe.forward(is_train=False)[0].asnumpy()
        want, _ = seed_fqn(src, params[f"{name}_min"], params[f"{name}_max"], nbits, pc,
                           py=True)
        np.testing.assert_array_equal(got, want)
    y = run_node(new, values, data=x.shape)
    np.testing.assert_allclose(y, seed_fqn_forward(params, x, nbits, "FQN_PY"), rtol=1e-5,
                               atol=1e-5)


def test_fqn_without_params_and_per_channel_off_a_weight():
    """No checkpoint: the state keeps the seed's shapes (per channel: the data's axis 0 where
    known, else inferred); per channel on a tensor that is not a layer's weight is kept along
    axis 0 (is_weight=True: the seed grid's range rule is the same), with a note."""
    b = SeedJSON()
    q1 = go_fqn(b, b.var("data", (2, 3, 4, 4)), nbits=3, is_perchannel=True)
    q2 = custom(b, q1, "FQN_PY", ["min", "max"], nbits=1)
    new, arrays = convert(b.json(q2))
    n1, n2 = quantizer(new, "data_FQN"), quantizer(new, "data_FQN_FQN_PY")
    assert n1.attrs["is_weight"] == "True" and n1.attrs["is_perchannel"] == "True"
    assert quantizer(new, "data_FQN_min").attrs["__shape__"] == "(2,)"
    assert n2.attrs == {"nbits": "1", "is_weight": "False", "is_perchannel": "False",
                        "seed_grid": "True", "grad_mode": "ste"}
    x = np.random.default_rng(50).normal(0, 1, (2, 3, 4, 4)).astype(f32)
    st = {"data_FQN_min": np.array([-1.0, -2.0], f32), "data_FQN_max": np.array([1.0, 0.5], f32),
          "data_FQN_FQN_PY_min": np.array([-0.5], f32),
          "data_FQN_FQN_PY_max": np.array([0.7], f32)}
    y = run_node(new, {**st, **arrays, "data": x}, data=x.shape)
    a, quot1 = seed_fqn(x, st["data_FQN_min"], st["data_FQN_max"], 3, True)
    want, quot = seed_fqn(a, [-0.5], [0.7], 1, py=True)
    ok = off_ties(quot) & off_ties(quot1)
    codes = (want.astype(np.float64) + 0.5) / 1.2   # 1 bit: the levels -0.5 + 1.2 k, unclamped
    assert ok.mean() > 0.99 and np.allclose(codes, np.rint(codes), atol=1e-5)
    assert {-1, 0, 1, 2} <= set(np.rint(codes).astype(int).ravel().tolist())
    np.testing.assert_allclose(y[ok], want[ok], rtol=1e-6, atol=1e-6)
    b = SeedJSON()
    q = go_fqn(b, b.var("data"), nbits=3, is_perchannel=True)   # shape unknown: inferred
    new, _ = convert(b.json(q))
    assert quantizer(new, "data_FQN_min").attrs["__shape__"] == "(0,)"


def test_fqn_degenerate_stored_range_is_warned(caplog):
    with caplog.at_level(logging.INFO, logger="quant_ops.graph.seed"):
        convert(SeedJSON.one("_contrib_FQN", {"nbits": 4}, (2, 3), ["min", "max"]),
                {"q_min": np.array([0.5], f32), "q_max": np.array([0.5], f32)})
    assert any(r.levelno == logging.WARNING and "min == max (0.5)" in r.getMessage()
               and "NaN" in r.getMessage() for r in caplog.records)
    assert any("seed_grid=True, nbits=4" in r.getMessage() for r in caplog.records)


def test_fqn_checkpoint_through_the_api_and_the_command_line(tmp_path):
    """A seed FQN checkpoint, loaded by QuantizedModel and by utils/graph_optimize.py: the
    FQN(seed_grid) nodes, the stored ranges as they were, and the seed's output."""
    from quant_ops.model import QuantizedModel

    nbits = 3
    params, x = seed_fqn_checkpoint(np.random.default_rng(60), nbits)
    want = seed_fqn_forward(params, x, nbits)
    sym, prm = _save_seed_checkpoint(tmp_path, seed_fqn_net(nbits), params)
    m = QuantizedModel.from_symbol(sym, prm)
    assert [n.attrs.get("seed_grid") for n in m.graph.nodes if n.op == "FQN"] == ["True"] * 4
    for k in ("conv0_weight_FQN_min", "conv0_weight_FQN_max", "data_FQN_max"):
        np.testing.assert_array_equal(m.params[k], params[k])
    np.testing.assert_allclose(run_node(m.graph, {**m.params, "data": x}, data=x.shape), want,
                               rtol=1e-5, atol=1e-5)
    out = tmp_path / "o"
    r = _cli("--symbol", str(sym), "--params", str(prm), "--input-shape", "2,3,6,6",
             "--no-draw", "--name", "net", "--out", str(out))
    assert r.returncode == 0, r.stderr
    g = Graph.from_json((out / "net-quant-symbol.json").read_text())
    assert {n.name: n.attrs.get("seed_grid") for n in g.nodes if n.op == "FQN"} == {
        f"{t}_FQN": "True" for t in ("data", "conv0_weight", "relu0", "fc0_weight")}
    saved = {k.split(":", 1)[1]: v.asnumpy()
             for k, v in mx.nd.load(str(out / "net-quant-0000.params")).items()}
    for k in params:
        np.testing.assert_array_equal(saved[k], params[k])
    np.testing.assert_allclose(run_node(g, {**saved, "data": x}, data=x.shape), want,
                               rtol=1e-5, atol=1e-5)


def test_every_seed_operator_is_claimed_by_one_method():
    table = seed_ops()
    assert {k for k in table if k.startswith("_contrib_")} == {
        "_contrib_Quantization_int8", "_contrib_PACT", "_contrib_DoReFa", "_contrib_QIL",
        "_contrib_GDRQ", "_contrib_FQN"}
    assert {k.split(":", 1)[1] for k in table if k.startswith("Custom:")} == {
        "Quantization_int8_PY", "PACT_PY", "PACT_V2_PY", "DoReFa_PY", "QIL_PY", "GDRQ_PY",
        "FQN_PY", "QUANT_STE_PY", "CLIP_RELU_PY"}
    for key, m in table.items():
        assert m.seed_ops[key][0] == "data"


def test_quant_ste_prototype_on_a_weight():
    w = np.random.default_rng(14).normal(0, 1, (4, 9)).astype(f32)
    b = SeedJSON()
    q = custom(b, b.var("fc0_weight", w.shape), "QUANT_STE_PY", nbits=4)
    fc = b.add("FullyConnected", "fc0", {"num_hidden": 4, "no_bias": True}, [b.var("data"), q])
    new, arrays = convert(b.json(fc), {"fc0_weight": w})
    n = quantizer(new, "fc0_weight_QUANT_STE_PY")
    assert n.op == "Quantization_int8" and n.attrs["nbits"] == "4"   # 2^(4-1) - 1 levels
    assert inputs_of(new, n)[1:] == ["fc0_weight_QUANT_STE_PY_minmax",
                                     "fc0_weight_QUANT_STE_PY_qstate"]
    np.testing.assert_array_equal(arrays["fc0_weight_QUANT_STE_PY_minmax"], [np.abs(w).max()])
    internals = new.to_symbol().get_internals()
    exe = internals["fc0_weight_QUANT_STE_PY_output"].simple_bind(mx.cpu(), grad_req="null")
    exe.arg_dict["fc0_weight"][:] = w
    for k, v in arrays.items():
        exe.aux_dict[k][:] = v
    y = exe.forward(is_train=False)[0].asnumpy()
    u = f32(np.abs(w).max() / f32(7))
    ok = off_ties(w / u)
    np.testing.assert_array_equal(y[ok], (round_away(w / u) * u)[ok])
    b = SeedJSON()
    relu = b.add("relu", "relu0", None, [b.var("data")])
    with pytest.raises(QuantOpsError, match=r"'relu0_QUANT_STE_PY' \(Custom\).*activation"):
        convert(b.json(custom(b, relu, "QUANT_STE_PY")))


# -- a whole seed network: API, command line, idempotence -------------------------------------

def seed_mixed_net():
    """data -> PACT -> conv(DoReFa weight) -> relu -> GDRQ -> fc(int8 weight) -> QIL, as
    graph_optimize.py wrote the settings (w: DoReFa/int8, act: PACT/GDRQ)."""
    b = SeedJSON()
    x = go_pact(b, b.var("data"), nbits=4)
    w = go_dorefa(b, b.var("conv0_weight", SHAPES["conv0_weight"]), nbits=4)
    conv = b.add("Convolution", "conv0", {"kernel": (3, 3), "pad": (1, 1), "num_filter": 4},
                 [x, w, b.var("conv0_bias", SHAPES["conv0_bias"])])
    relu = go_gdrq(b, b.add("Activation", "relu0", {"act_type": "relu"}, [conv]), nbits=4,
                   is_weight=False, lamda=0.001, do_quant=False, fix_alpha=True, ktimes=2)
    fw = b.quant(b.var("fc0_weight", (5, 4 * 6 * 6)), dict(WEIGHT_Q, is_weight_perchannel="False"))
    fc = b.add("FullyConnected", "fc0", {"num_hidden": 5}, [relu, fw,
                                                            b.var("fc0_bias", SHAPES["fc0_bias"])])
    return b.json(contrib_qil(b, fc, nbits=4))


def seed_mixed_params(rng) -> dict:
    return {"conv0_weight": rng.normal(0, 0.3, SHAPES["conv0_weight"]).astype(f32),
            "conv0_bias": rng.normal(0, 0.1, (4,)).astype(f32),
            "fc0_weight": rng.normal(0, 0.1, (5, 144)).astype(f32),
            "fc0_bias": rng.normal(0, 0.1, (5,)).astype(f32),
            "data_pact_gamma": np.array([2.0], f32), "relu0_alpha": np.array([1.5], f32),
            "fc0_weight_minmax": np.array([0.3], f32),
            "fc0_QIL_center": np.array([1.0], f32), "fc0_QIL_distance": np.array([1.5], f32),
            "fc0_QIL_gamma": np.array([1.0], f32)}


def test_mixed_net_converts_runs_and_is_idempotent():
    rng = np.random.default_rng(15)
    params = seed_mixed_params(rng)
    g = Graph.from_json(seed_mixed_net(), "mixed.json")
    new, arrays = convert_seed_graph(g, params)
    assert not is_seed_graph(new)
    assert [n.op for n in new.nodes if n.name.endswith(("_PACT", "_DoReFa", "_GDRQ",
                                                          "_Quantization_int8", "_QIL"))] == \
        ["PACT", "DoReFa", "GDRQ", "Quantization_int8", "QIL"]
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(f32)
    y = run_node(new, {**params, **arrays, "data": x}, data=x.shape)
    assert y.shape == (2, 5) and np.isfinite(y).all() and np.abs(y).max() > 0
    again, more = convert_seed_graph(new, {**params, **arrays})
    assert again.to_json() == new.to_json() and more == {}
    # strip gives back the float network, without any seed state
    flat = strip_quantizers(new)
    assert {n.op for n in flat.nodes} == {"null", "Convolution", "Activation", "FullyConnected"}


def _save_seed_checkpoint(tmp_path, text: str, params: dict, prefix="seed"):
    """symbol + params as the seed's Module.save_checkpoint wrote them (arg:/aux: names)."""
    aux = {n for n in params if n.endswith(("_alpha", "_minmax", "_min", "_max"))}
    (tmp_path / f"{prefix}-symbol.json").write_text(text)
    mx.nd.save(str(tmp_path / f"{prefix}-0000.params"),
               {("aux:" if k in aux else "arg:") + k: mx.nd.array(v) for k, v in params.items()})
    return tmp_path / f"{prefix}-symbol.json", tmp_path / f"{prefix}-0000.params"


def test_api_loads_a_seed_checkpoint(tmp_path):
    from quant_ops.model import QuantizedModel

    rng = np.random.default_rng(16)
    sym, prm = _save_seed_checkpoint(tmp_path, seed_mixed_net(), seed_mixed_params(rng))
    m = QuantizedModel.from_symbol(sym, prm)
    assert not is_seed_graph(m.graph)
    ops = {n.op for n in m.graph.nodes}
    assert {"PACT", "DoReFa", "GDRQ", "Quantization_int8", "QIL"} <= ops
    assert "data_GDRQ_qstate" not in m.params and "relu0_GDRQ_qstate" in m.params


def _cli(*args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "utils" / "graph_optimize.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_command_line_imports_a_seed_checkpoint_and_reruns_on_its_output(tmp_path):
    rng = np.random.default_rng(17)
    sym, prm = _save_seed_checkpoint(tmp_path, seed_mixed_net(), seed_mixed_params(rng))
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    r = _cli("--symbol", str(sym), "--params", str(prm), "--input-shape", "1,3,6,6",
             "--no-draw", "--name", "net", "--out", str(out1))
    assert r.returncode == 0, r.stderr
    first = (out1 / "net-quant-symbol.json").read_text()
    g1 = Graph.from_json(first)
    assert {"PACT", "DoReFa", "GDRQ", "QIL"} <= {n.op for n in g1.nodes}
    r = _cli("--symbol", str(out1 / "net-quant-symbol.json"), "--params",
             str(out1 / "net-quant-0000.params"), "--input-shape", "1,3,6,6", "--no-draw",
             "--name", "net", "--out", str(out2))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (out2 / "net-quant-symbol.json").read_text() == first


def test_command_line_refusal_is_one_error_line_naming_the_node(tmp_path):
    b = SeedJSON()
    q = custom(b, b.var("data"), "PACT_PY", ["gamma"], nbits=4)   # upper clip, not on a ReLU
    conv = b.add("Convolution", "conv0", {"kernel": (1, 1), "num_filter": 2, "no_bias": True},
                 [q, b.var("conv0_weight", (2, 3, 1, 1))])
    sym, prm = _save_seed_checkpoint(tmp_path, b.json(conv), {
        "conv0_weight": np.ones((2, 3, 1, 1), f32), "data_PACT_PY_gamma": np.ones(1, f32)})
    r = _cli("--symbol", str(sym), "--params", str(prm), "--input-shape", "1,3,4,4",
             "--no-draw", "--out", str(tmp_path / "o"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "node 'data_PACT_PY'" in lines[0]
    assert not (tmp_path / "o").exists()


# -- errors ----------------------------------------------------------------------------

def test_unconvertible_node_fails_before_anything_converts():
    b = SeedJSON()
    x = b.quant(b.var("data"), ACT_Q)
    q = custom(b, x, "PACT_PY", ["gamma"], nbits=4)   # its input is not a ReLU's output
    g = Graph.from_json(b.json(q), "net.json")
    before = g.to_json()
    with pytest.raises(QuantOpsError, match="^net.json: node 'data_Quantization_int8_PACT_PY'"):
        convert_seed_graph(g)
    assert g.to_json() == before


def test_pact_prototype_upper_clip_only_is_refused_off_a_relu():
    b = SeedJSON()
    x = custom(b, b.var("data"), "PACT_PY", ["gamma"], nbits=4)
    with pytest.raises(QuantOpsError, match=r"node 'data_PACT_PY' \(Custom\): PACT_PY clipped "
                                            r"only above"):
        convert(b.json(x))


@pytest.mark.parametrize("op,attrs,states,params,needle", [
    ("_contrib_PACT", {"nbits": 4}, ["gamma"], {}, "'q_gamma') is not in the params"),
    ("_contrib_PACT", {"nbits": 4}, ["gamma"], {"q_gamma": np.ones(2)}, "has shape (2,)"),
    ("_contrib_PACT", {"nbits": 4}, ["gamma"], {"q_gamma": np.array([np.nan])}, "not finite"),
    ("_contrib_PACT", {"nbits": 4}, ["gamma"], {"q_gamma": np.array([0.0])}, "gamma > 0"),
    ("_contrib_GDRQ", {}, ["alpha"], {}, "'q_alpha') is not in the params"),
    ("_contrib_GDRQ", {}, ["alpha"], {"q_alpha": np.ones(4)}, "has shape (4,)"),
    ("_contrib_QIL", {}, ["center", "distance", "gamma"],
     {"q_center": np.ones(1), "q_gamma": np.ones(1)}, "distance ('q_distance')"),
    ("Custom", {"op_type": "QIL_PY"}, ["p", "c", "gamma"],
     {"q_p": np.array([0.5]), "q_c": np.array([0.4]), "q_gamma": np.ones(1)},
     "pruning point 0.5 is not below clipping point 0.4"),
    ("_contrib_FQN", {}, ["min", "max"], {"q_min": np.zeros(1)}, "'q_max') is not in the params"),
    ("_contrib_FQN", {}, ["min", "max"], {"q_min": np.zeros(2), "q_max": np.ones(2)},
     "range minimum 'min' ('q_min') has shape (2,); the seed operator keeps 1 value"),
    ("_contrib_FQN", {"is_perchannel": True}, ["min", "max"],
     {"q_min": np.zeros(3), "q_max": np.ones(3)}, "has shape (3,); the seed operator keeps 2"),
    ("Custom", {"op_type": "FQN_PY", "nbits": 4}, ["min", "max"],
     {"q_min": np.zeros(1), "q_max": np.array([np.inf])}, "holds inf: not finite"),
])
def test_bad_or_missing_state_is_one_error_naming_the_node(op, attrs, states, params, needle):
    with pytest.raises(QuantOpsError) as e:
        convert(SeedJSON.one(op, attrs, (2, 3), states), params, source="ck.json")
    assert str(e.value).startswith(f"ck.json: node 'q' ({op}): "), str(e.value)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("op,attrs,states,key", [
    ("_contrib_PACT", {"nbits": "four"}, ["gamma"], "nbits"),
    ("_contrib_PACT", {"nbits": 16}, ["gamma"], "nbits"),
    ("_contrib_PACT", {"nbits": 4, "colour": "red"}, ["gamma"], "colour"),
    ("_contrib_DoReFa", {"nbits": 0}, [], "nbits"),
    ("_contrib_GDRQ", {"grad_mode": "sgd"}, ["alpha"], "grad_mode"),
    ("_contrib_GDRQ", {"group_size": 4}, ["alpha"], "group_size"),
    ("_contrib_GDRQ", {"lamda": 1.5}, ["alpha"], "lamda"),
    ("_contrib_GDRQ", {"ktimes": -1}, ["alpha"], "ktimes"),
    ("_contrib_GDRQ", {"is_weight": "maybe"}, ["alpha"], "is_weight"),
    ("_contrib_QIL", {"fix_gamma": False}, ["center", "distance", "gamma"], "fix_gamma"),
    ("_contrib_FQN", {"nbits": "x"}, ["min", "max"], "nbits"),
    ("_contrib_FQN", {"nbits": 0}, ["min", "max"], "nbits"),
    ("_contrib_FQN", {"nbits": 17}, ["min", "max"], "nbits"),
    ("_contrib_FQN", {"is_perchannel": "maybe"}, ["min", "max"], "is_perchannel"),
    ("_contrib_FQN", {"ema_decay": 0.9}, ["min", "max"], "ema_decay"),
    ("Custom", {"op_type": "FQN_PY"}, ["min", "max"], "nbits"),
    ("Custom", {"op_type": "CLIP_RELU_PY", "threshold": 0}, [], "threshold"),
])
def test_unknown_attribute_value_is_one_error_naming_node_and_attribute(op, attrs, states, key):
    with pytest.raises(QuantOpsError) as e:
        convert(SeedJSON.one(op, attrs, (2, 3), states), source="ck.json")
    assert str(e.value).startswith(f"ck.json: node 'q' ({op}): "), str(e.value)
    assert f"'{key}'" in str(e.value), str(e.value)


def test_wrong_input_count_names_the_seed_inputs():
    with pytest.raises(QuantOpsError, match=r"node 'q' \(_contrib_GDRQ\): has 1 inputs; the seed "
                                            r"operator takes 2 \(data, alpha\)"):
        convert(SeedJSON.one("_contrib_GDRQ", {}, (2, 3)))


def test_new_state_name_clash():
    b = SeedJSON()
    b.var("data_GDRQ_qstate")
    q = go_gdrq(b, b.var("data"))
    with pytest.raises(QuantOpsError, match="'data_GDRQ_qstate' would clash"):
        convert(b.json(q))


@pytest.mark.parametrize("attrs,key", [
    ({"nbits": "eight"}, "nbits"),
    ({"nbits": "7.0"}, "nbits"),
    ({"nbits": "16"}, "nbits"),
    ({"nbits": "0"}, "nbits"),
    ({"is_weight": "yes"}, "is_weight"),
    ({"ema_decay": "1.5"}, "ema_decay"),
    ({"ema_decay": "nan"}, "ema_decay"),
    ({"delay_quant": "1e3"}, "delay_quant"),
    ({"quant_mode": "power2"}, "quant_mode"),
    ({"is_weight": "False", "grad_mode": "sgd"}, "grad_mode"),
    ({"is_weight": "True", "fix_act_scale": "True"}, "fix_act_scale"),
    ({"channel_axis": "1"}, "channel_axis"),
    ({"op_type": "X"}, "op_type"),
])
def test_bad_seed_value_names_node_and_attribute(attrs, key):
    b = SeedJSON()
    x = b.quant(b.var("data"), attrs)
    with pytest.raises(QuantOpsError) as e:
        convert(b.json(x), source="bad.json")
    msg = str(e.value)
    assert msg.startswith("bad.json: node 'data_Quantization_int8'")
    assert f"'{key}'" in msg


def test_bias_correct_prototype_is_an_error():
    b = SeedJSON()
    x = b.quant(b.var("data"), dict(ACT_Q, op_type="Quantization_int8_PY",
                                    bias_correct="True"), op="Custom")
    with pytest.raises(QuantOpsError, match="'bias_correct'"):
        convert(b.json(x))


def test_wrong_input_count_and_name_clash():
    b = SeedJSON()
    q = b.add("_contrib_Quantization_int8", "q0", ACT_Q, [b.var("data")])
    with pytest.raises(QuantOpsError, match="node 'q0'.*2"):
        convert(b.json(q))
    b = SeedJSON()
    b.var("data_Quantization_int8_qstate")
    x = b.quant(b.var("data"), ACT_Q)
    with pytest.raises(QuantOpsError, match="data_Quantization_int8_qstate"):
        convert(b.json(x))


def test_activation_range_of_wrong_size_is_an_error():
    b = SeedJSON()
    x = b.quant(b.var("data"), ACT_Q)
    with pytest.raises(QuantOpsError, match="data_minmax"):
        convert(b.json(x), {"data_minmax": np.ones(3, f32)})


def test_not_a_seed_graph():
    x = mx.sym.Convolution(mx.sym.var("data"), kernel=(1, 1), num_filter=2, name="c")
    g = Graph.from_symbol(x)
    assert not is_seed_graph(g)
    new, arrays = convert_seed_graph(g)
    assert new.to_json() == g.to_json() and arrays == {}
