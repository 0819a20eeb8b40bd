"""Drawings of float and quantized graphs: files land atomically, the PNG is a sane size,
the SVG shows one labelled node per quantizer and hides parameters and quantizer state."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import mxnet as mx
import pytest
from PIL import Image

from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.graph.quantize import insert_quantizers
from quant_ops.ops import QUANTIZERS
from quant_ops.policy import QuantPolicy
from quant_ops.viz import draw, quantizer_label
from quant_ops.zoo import get_model

SVG = "{http://www.w3.org/2000/svg}"


def svg_info(path):
    """(texts of all <text> elements, number of quantizer node groups)."""
    root = ET.parse(path).getroot()
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    quants = [g for g in root.iter(f"{SVG}g") if "quantizer" in g.get("class", "").split()]
    return texts, len(quants)


def n_quantizers(graph):
    return sum(n.op in QUANTIZERS for n in graph.nodes)


@pytest.fixture(scope="module")
def resnet18():
    net = get_model("resnet18_v1")
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 3, 224, 224)))
    sym = net(mx.sym.var("data"))
    shapes = {p.name: p.data().shape for p in net.collect_params().values()}
    g = Graph.from_symbol(sym)
    q = insert_quantizers(g, QuantPolicy.preset("trt_int8"), shapes).graph
    return g, q


def tiny(data_name="data"):
    x = mx.sym.var(data_name)
    fc = mx.sym.FullyConnected(x, num_hidden=4, name="fc")
    act = mx.sym.Activation(fc, act_type="relu", name="act")
    out = mx.sym.elemwise_add(act, act, name="add")
    g = Graph.from_symbol(out)
    q = insert_quantizers(g, QuantPolicy.preset("trt_int8"), {"fc_weight": (4, 8)}).graph
    return g, q


def test_tiny_float_and_quantized(tmp_path):
    g, q = tiny()
    assert n_quantizers(q) == 2
    paths = draw(g, tmp_path / "float", title="tiny", formats=("svg", "png", "gv"))
    assert [p.name for p in paths] == ["float.svg", "float.png", "float.gv"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    texts, nq = svg_info(tmp_path / "float.svg")
    assert nq == 0 and "data" in texts and "FC 4" in texts and "relu" in texts
    assert not any("fc_weight" in t or "fc_bias" in t for t in texts)

    paths = draw(q, tmp_path / "quant", shapes={"data": (2, 8)})
    texts, nq = svg_info(paths[0])
    assert nq == 2
    assert "int8 W8 per-channel" in texts and "int8 A8" in texts and "2x8" in texts
    assert not any(s in t for t in texts for s in ("_minmax", "_qstate", "_qo_gradsum",
                                                    "_weight"))
    # only the outputs are left behind, no temporary directory
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["float.svg", "float.png", "float.gv", "quant.svg", "quant.png"])


def test_odd_names_are_not_markup(tmp_path):
    g, _ = tiny('in"<b>x</b>\\')
    paths = draw(g, tmp_path / "odd", title="<i>t</i> & \"q\"")
    texts, _ = svg_info(paths[0])
    assert 'in"<b>x</b>\\' in texts


def test_resnet18(tmp_path, resnet18):
    g, q = resnet18
    for graph, stem in ((g, "float"), (q, "quant")):
        for p in draw(graph, tmp_path / stem, title=f"resnet18_v1 {stem}"):
            assert p.is_file()
        with Image.open(tmp_path / f"{stem}.png") as im:
            im.load()
            assert 100 < im.width < 30000 and 100 < im.height < 30000
    texts_f, nq_f = svg_info(tmp_path / "float.svg")
    texts_q, nq_q = svg_info(tmp_path / "quant.svg")
    assert nq_f == 0 and not any("int8 W8" in t for t in texts_f)
    assert nq_q == n_quantizers(q) > 30
    weights = sum(n.attrs.get("is_weight") == "True" for n in q.nodes if n.op in QUANTIZERS)
    assert texts_q.count("int8 W8 per-channel") == weights
    assert texts_q.count("int8 A8") == n_quantizers(q) - weights
    assert not any(t.endswith(("_minmax", "_qstate", "_gamma", "_running_var"))
                   for t in texts_q)
    # same layers drawn in both: quantizers are added, nothing else changes
    assert len(texts_q) - len(texts_f) == n_quantizers(q)


def test_quantizer_label():
    _, q = tiny()
    labels = sorted(quantizer_label(n) for n in q.nodes if n.op in QUANTIZERS)
    assert labels == ["int8 A8", "int8 W8 per-channel"]


def test_missing_dot(tmp_path, monkeypatch):
    g, _ = tiny()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(QuantOpsError, match="graphviz 'dot' not found: apt-get install"):
        draw(g, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_dot_failure_leaves_nothing(tmp_path):
    g, _ = tiny()
    with pytest.raises(QuantOpsError, match="dot exited"):
        draw(g, tmp_path / "x", formats=("svg", "nosuchformat"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QuantOpsError, match="bad formats"):
        draw(g, tmp_path / "x", formats=("svg", "-O"))
