"""The symbol-JSON reader refuses every entry MXNet would crash on, naming it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mxnet as mx
import pytest

from quant_ops import QuantOpsError
from quant_ops.graph.ir import Graph

ROOT = Path(__file__).resolve().parents[1]


def _json(**change):
    d = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=3, name="fc")
    s = mx.sym.SliceChannel(d, num_outputs=3, name="sl")
    j = json.loads(mx.sym.Group([s[2], d]).tojson())
    j.update(change)
    return json.dumps(j)


def test_a_real_graph_reads_back():
    g = Graph.from_json(_json())
    assert g.heads == [[4, 2, 0], [3, 0, 0]]
    assert g.to_symbol().list_outputs() == ["sl_output2", "fc_output"]


@pytest.mark.parametrize("heads,needle", [
    ([[3, 3, 0]], "output 3 of 'fc' \\(FullyConnected\\), which has 1"),
    ([[4, 3, 0]], "output 3 of 'sl' \\(SliceChannel\\), which has 3"),
    ([[0, 1, 0]], "output 1 of 'data'"),
    ([[3, -5, 0]], "bad head \\[3, -5, 0\\]"),
    ([[3, 0, -1]], "bad head"),
    ([[9, 0, 0]], "bad head"),
    ([[3, True, 0]], "bad head"),
    ([], "no output"),
])
def test_bad_heads_are_refused(heads, needle):
    with pytest.raises(QuantOpsError, match=needle):
        Graph.from_json(_json(heads=heads), "net.json")


def test_bad_node_inputs_are_refused():
    j = json.loads(_json())
    j["nodes"][3]["inputs"][0] = [0, 2, 0]
    with pytest.raises(QuantOpsError, match="input of node 'fc' reads output 2 of 'data'"):
        Graph.from_json(json.dumps(j), "net.json")
    j["nodes"][3]["inputs"][0] = [0, -5]
    with pytest.raises(QuantOpsError, match="node 'fc' has a bad input \\[0, -5\\]"):
        Graph.from_json(json.dumps(j), "net.json")
    j["nodes"][3]["inputs"] = "x"
    with pytest.raises(QuantOpsError, match="inputs that are not a list"):
        Graph.from_json(json.dumps(j), "net.json")


def test_a_symbol_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    """Found by bench/fuzz_readers.py: a flipped byte made a UnicodeDecodeError traceback."""
    import pytest

    from quant_ops.errors import QuantOpsError
    from quant_ops.graph.ir import load_graph

    f = tmp_path / "m-symbol.json"
    f.write_bytes(b'{"nodes": [{"op": "null", "name": "da\x84ta"}], "heads": [[0, 0, 0]]}')
    with pytest.raises(QuantOpsError, match=r"m-symbol.json: not a symbol JSON \(not UTF-8"):
        load_graph(f)


def test_a_quantizer_node_without_its_inputs_is_refused_before_mxnet_sees_it(tmp_path):
    """Found by bench/fuzz_readers.py: a variable turned into a Quantization_int8 node with
    no inputs crashed MXNet (segfault) when the symbol was loaded."""
    import json

    import pytest

    from quant_ops.errors import QuantOpsError
    from quant_ops.graph.ir import load_graph

    f = tmp_path / "q-symbol.json"
    f.write_text(json.dumps({"nodes": [
        {"op": "null", "name": "data", "inputs": []},
        {"op": "Quantization_int8", "name": "w", "inputs": []},
        {"op": "FullyConnected", "name": "fc", "attrs": {"num_hidden": "2", "no_bias": "True"},
         "inputs": [[0, 0, 0], [1, 0, 0]]}], "heads": [[2, 0, 0]], "arg_nodes": [0]}))
    with pytest.raises(QuantOpsError, match=r"node 'w' \(Quantization_int8\) has 0 inputs; "
                                            r"the operator takes 3 \(data, minmax, qstate\)"):
        load_graph(f)


@pytest.mark.parametrize("op, attrs, inputs, takes", [
    ("BatchNorm", {}, 0, "5 (data, gamma, beta, moving_mean, moving_var)"),
    ("BatchNorm", {}, 6, "5 (data, gamma, beta, moving_mean, moving_var)"),
    ("Convolution", {"kernel": "(1,1)", "num_filter": "2"}, 2, "3 (data, weight, bias)"),
    ("Concat", {"num_args": "3"}, 2, "3 (arg0, arg1, arg2)"),
])
def test_a_builtin_operator_with_the_wrong_number_of_inputs_is_refused(tmp_path, op, attrs,
                                                                       inputs, takes):
    """Found by bench/fuzz_readers.py (13 crashes in an hour): a variable turned into a
    BatchNorm with no inputs segfaulted MXNet when the symbol was read.  The count an
    operator takes is MXNet's own for the node's attributes."""
    import json

    from quant_ops.errors import QuantOpsError
    from quant_ops.graph.ir import load_graph

    nodes = [{"op": "null", "name": f"v{i}", "inputs": []} for i in range(max(inputs, 1))]
    nodes.append({"op": op, "name": "bad", "attrs": attrs,
                  "inputs": [[i, 0, 0] for i in range(inputs)]})
    f = tmp_path / "b-symbol.json"
    f.write_text(json.dumps({"nodes": nodes, "heads": [[len(nodes) - 1, 0, 0]]}))
    with pytest.raises(QuantOpsError, match=rf"b-symbol.json: node 'bad' \({op}\) has "
                                            rf"{inputs} inputs; the operator takes "
                                            + re.escape(takes)):
        load_graph(f)


def test_every_saved_fuzz_crash_is_now_a_clean_error():
    """The cases bench/fuzz_readers.py kept (each crashed the process before)."""
    from quant_ops import QuantizedModel
    from quant_ops.errors import QuantOpsError

    cases = sorted((ROOT / "bench" / "results" / "fuzz_cases").glob("case*"))
    if not cases:
        pytest.skip("no saved fuzz cases in this checkout")
    for d in cases:
        with pytest.raises(QuantOpsError, match="the operator takes"):
            QuantizedModel.from_symbol(d / "m-symbol.json", d / "m-0000.params")


def test_unicode_node_names_survive_the_round_trip_through_mxnet(tmp_path):
    """MXNet reads UTF-8 names but not JSON's \\u escapes: the graph writes them as text."""
    x = mx.sym.Convolution(mx.sym.var("data"), kernel=(1, 1), num_filter=2, name="cü中1")
    g = Graph.from_symbol(x)
    assert "cü中1_weight" in g.to_symbol().list_arguments()
    path = tmp_path / "u-symbol.json"
    path.write_text(g.to_json(), encoding="utf-8")
    assert mx.sym.load(str(path)).list_arguments() == x.list_arguments()


def test_json_nested_past_the_recursion_limit_is_a_clear_error():
    with pytest.raises(QuantOpsError, match="deep.json: not an MXNet symbol file"):
        Graph.from_json("[" * 100_000 + "]" * 100_000, "deep.json")


def test_partitioned_graphs_are_refused_before_mxnet_builds_their_operators():
    """A fused or native INT8 graph (oneDNN subgraph ops) is not a model this toolkit reads;
    building such an operator without its subgraph crashes MXNet, so even a hand-written
    node naming one is refused by name."""
    x = mx.sym.Convolution(mx.sym.var("data"), kernel=(3, 3), num_filter=4, name="c")
    x = mx.sym.Activation(x, act_type="relu", name="r")
    fused = json.loads(x.get_backend_symbol("MKLDNN").tojson())
    assert any(n["op"].startswith("_sg_") for n in fused["nodes"])
    with pytest.raises(QuantOpsError, match=r"fused-symbol.json: node '.*' \(_sg_mkldnn_conv\) "
                                            r"runs a subgraph"):
        Graph.from_json(json.dumps(fused), "fused-symbol.json")
    bare = {"nodes": [{"op": "null", "name": "data", "inputs": []},
                      {"op": "_sg_mkldnn_conv", "name": "c", "inputs": [[0, 0, 0]]}],
            "arg_nodes": [0], "heads": [[1, 0, 0]]}
    with pytest.raises(QuantOpsError, match=r"node 'c' \(_sg_mkldnn_conv\) runs a subgraph"):
        Graph.from_json(json.dumps(bare), "bare-symbol.json")


def test_control_flow_graphs_are_read_without_building_their_operators_alone():
    """A Gluon net's graph with contrib control flow (foreach) still reads: its operator
    holds a subgraph, so MXNet is never asked to build it alone (that would crash)."""
    data = mx.sym.var("data")
    out, _ = mx.sym.contrib.foreach(lambda x, s: (x * 2, s), data, [mx.sym.var("s")])
    g = Graph.from_symbol(out)
    assert any(n.op == "_foreach" for n in g.nodes)
