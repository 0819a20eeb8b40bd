"""Symbol files of the seed toolkit (``_contrib_Quantization_int8`` & co. of its custom MXNet
build) convert to quant_ops operators: attributes mapped, state added, bindable, the same
output as the graph built directly with ``mx.sym.Quantization_int8``; seed operators that
have no quant_ops counterpart yet, and seed values we cannot reproduce, are clear errors."""
from __future__ import annotations

import json
import logging

import mxnet as mx
import numpy as np
import pytest

import quant_ops  # noqa: F401  (loads the operators)
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.graph.quantize import strip_quantizers
from quant_ops.graph.seed import SEED_OPS, convert_seed_graph, is_seed_graph

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


# -- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", [k for k, v in SEED_OPS.items() if v is None])
def test_seed_op_not_landed_is_a_clear_error(op):
    b = SeedJSON()
    x = b.var("data")
    gamma = b.var("relu0_pact_gamma")
    q = b.add(op, "relu0_PACT", {"nbits": "4"}, [x, gamma])
    with pytest.raises(QuantOpsError) as e:
        convert(b.json(q), source="model-symbol.json")
    assert str(e.value) == (f"model-symbol.json: node 'relu0_PACT' uses seed operator "
                            f"'{op}', whose conversion to quant_ops is not supported yet")


def test_pact_in_a_net_fails_before_anything_converts():
    b = SeedJSON()
    x = b.quant(b.var("data"), ACT_Q)
    q = b.add("_contrib_PACT", "act1_PACT", {"nbits": "4"}, [x, b.var("act1_gamma")])
    with pytest.raises(QuantOpsError, match="'act1_PACT' uses seed operator '_contrib_PACT'"):
        convert(b.json(q))


def test_custom_prototype_not_landed():
    b = SeedJSON()
    x = b.add("Custom", "relu0_pact", {"op_type": "PACT_PY", "nbits": "4"},
              [b.var("data"), b.var("gamma")])
    with pytest.raises(QuantOpsError, match="'relu0_pact' uses seed operator 'PACT_PY'"):
        convert(b.json(x))


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
