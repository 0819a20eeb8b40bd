"""Layer sensitivity: the numbers follow the quantization, the suggested layers are the ones
that matter, and the report, the policy and the command line are usable as they come."""
from __future__ import annotations

import base64
import html
import json
from html.parser import HTMLParser
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
import yaml

from quant_ops.calib.graph_calib import calibrate_graph
from quant_ops.datasets import FASHION_MNIST_DIR
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.policy import QuantPolicy
from quant_ops.prepare import quantize_graph
from quant_ops.ptq.common import runner
from quant_ops.cli.sensitivity import main as sensitivity_main
from quant_ops.ptq.sensitivity import layer_sensitivity

LAYERS = ["conv0", "conv1", "conv2", "fc"]


def tiny_net(shape=(1, 8, 8), names=LAYERS, seed=0):
    """conv-BN-relu, conv-relu with a residual add, strided conv-relu, FC: BN folding, a
    tensor feeding two consumers and a conv+add that MKLDNN fuses all appear."""
    d = mx.sym.var("data")
    c0 = mx.sym.Convolution(d, num_filter=8, kernel=(3, 3), pad=(1, 1), name=names[0])
    a0 = mx.sym.relu(mx.sym.BatchNorm(c0, fix_gamma=False, name="bn0"))
    c1 = mx.sym.Convolution(a0, num_filter=8, kernel=(3, 3), pad=(1, 1), name=names[1])
    a1 = mx.sym.relu(c1 + a0)
    c2 = mx.sym.Convolution(a1, num_filter=8, kernel=(3, 3), stride=(2, 2), name=names[2])
    out = mx.sym.FullyConnected(mx.sym.relu(c2), num_hidden=10, name=names[3])
    rng = np.random.default_rng(seed)
    arg_shapes, _, aux_shapes = out.infer_shape(data=(2,) + shape)
    params = {}
    for n, s in zip(out.list_arguments(), arg_shapes):
        if n.endswith("weight"):
            params[n] = rng.normal(0, np.sqrt(2 / np.prod(s[1:])), s)
        elif n.endswith("gamma"):
            params[n] = rng.uniform(0.5, 1.5, s)
        elif n != "data":
            params[n] = rng.normal(0, 0.1, s)
    for n, s in zip(out.list_auxiliary_states(), aux_shapes):
        params[n] = rng.uniform(0.5, 1.5, s) if n.endswith("var") else rng.normal(0, 0.1, s)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    graph = Graph.from_symbol(out)
    # centre the logits over the data, so the float net's own labels use several classes
    x = rng.normal(0, 1, (400,) + shape).astype(np.float32)
    logits = runner(graph, params, x.shape)(x)[0]
    params[f"{names[3]}_bias"] -= logits.mean(0)
    labels = runner(graph, params, x.shape)(x)[0].argmax(1)
    return graph, params, x, labels


@pytest.fixture(scope="module")
def net():
    graph, params, x, y = tiny_net()
    assert len(set(y.tolist())) >= 4
    calib = [x[i:i + 25] for i in range(0, 100, 25)]
    return graph, params, calib, (x[100:], y[100:])


def low_bits(bits):
    return {"preset": "trt_int8", "overrides": [
        {"match": "conv1", "weight": {"bits": bits}, "activation": {"bits": bits}}]}


@pytest.fixture(scope="module")
def damaged(net):
    """conv1 at 2 bits, every other layer at 8: the report must single conv1 out."""
    graph, params, calib, ev = net
    return layer_sensitivity(graph, params, low_bits(2), calib, ev, progress=False)


def test_sqnr_follows_the_bits(net):
    graph, params, calib, _ = net
    r8 = layer_sensitivity(graph, params, "trt_int8", calib, progress=False)
    r4 = layer_sensitivity(graph, params, low_bits(4), calib, progress=False)
    assert [r.name for r in r8.rows] == LAYERS            # graph order
    assert all(r.sqnr_db > 25 and r.cosine > 0.99 for r in r8.rows)
    assert (r4.row("conv1").weight_bits, r4.row("conv1").activation_bits) == (4, 4)
    assert r4.row("conv1").sqnr_db < r8.row("conv1").sqnr_db - 10
    assert r4.row("conv1").cosine < r8.row("conv1").cosine
    # layers before conv1 do not see its error; the network output does
    assert r4.row("conv0").sqnr_db == pytest.approx(r8.row("conv0").sqnr_db, abs=1e-6)
    assert r4.out_sqnr_quant_db < r8.out_sqnr_quant_db - 6
    assert r8.acc_quant is None and r8.rows[0].gain is None


def test_keeping_the_damaged_layer_float_recovers_accuracy(damaged):
    rep = damaged
    assert rep.acc_float == 100.0                          # labels are the float net's own
    conv1 = rep.row("conv1")
    assert rep.acc_quant < 90
    assert conv1.acc_layer_float > rep.acc_quant + 10
    assert conv1.gain == pytest.approx(conv1.acc_layer_float - rep.acc_quant)
    assert conv1.out_sqnr_db > rep.out_sqnr_quant_db + 10  # output much closer to float
    assert all(r.gain < conv1.gain for r in rep.rows if r.name != "conv1")
    assert rep.keep_float(max_layers=1) == ["conv1"]
    assert rep.keep_float(min_gain=100) == []
    # without accuracy the network output SQNR gain ranks the layers
    rep_no_acc = type(rep)(**{**rep.__dict__, "acc_float": None, "acc_quant": None})
    assert rep_no_acc.keep_float(max_layers=1) == ["conv1"]


@pytest.mark.parametrize("policy", [low_bits(2), {
    "activation": {"method": "lsq", "bits": 4, "params": {"signed": True}},
    "overrides": low_bits(3)["overrides"]}], ids=["int8", "lsq"])
def test_numbers_match_doing_it_by_hand(net, policy):
    """Reusing the full network's calibration gives what quantizing and calibrating the
    one-layer-float network anew gives (whatever state the quantizers keep)."""
    graph, params, calib, (x, y) = net
    rep = layer_sensitivity(graph, params, policy, calib, (x, y), layers=["conv1"],
                            progress=False)
    q = quantize_graph(graph, params, rep.policy_with_skips(names=["conv1"]), fold_bn="deploy")
    qp, _ = calibrate_graph(q.graph, q.params, calib, "minmax", progress=False)
    acc = float((runner(q.graph, qp, x.shape)(x)[0].argmax(1) == y).mean() * 100)
    assert rep.row("conv1").acc_layer_float == pytest.approx(acc)
    fl, qu = runner(graph, params, calib[0].shape), runner(q.graph, qp, calib[0].shape)
    err = sig = 0.0
    for b in calib:
        f, o = fl(b)[0].astype(np.float64), qu(b)[0]
        sig, err = sig + (f ** 2).sum(), err + ((f - o) ** 2).sum()
    assert rep.row("conv1").out_sqnr_db == pytest.approx(10 * np.log10(sig / err), abs=0.01)


def test_skip_policy_round_trips_and_leaves_the_layers_float(net, damaged, tmp_path):
    graph, params, _, _ = net
    d = damaged.policy_with_skips(names=["conv1", "fc"])
    f = tmp_path / "policy_skip.yaml"
    f.write_text(yaml.safe_dump(d))
    pol = QuantPolicy.load(f)
    assert pol == QuantPolicy.from_dict(d) and pol.to_dict() == d
    assert pol.overrides == QuantPolicy.from_dict(low_bits(2)).overrides  # the rest is kept
    q = quantize_graph(graph, params, pol, fold_bn="deploy")
    assert {r["node"] for r in q.table if r["input"] in ("data", "weight")} == {"conv0", "conv2"}
    # default: the analysed policy skipping keep_float()
    assert QuantPolicy.from_dict(damaged.policy_with_skips()).skip_names == ("conv1",)


def test_html_report(tmp_path):
    names = ["c<1>&\"x*", "conv1", "conv2", "fc"]   # markup and an fnmatch wildcard
    graph, params, x, y = tiny_net(names=names)
    rep = layer_sensitivity(graph, params, "trt_int8", [x[:50]], (x[100:200], y[100:200]),
                            progress=False, model="tiny<net>")
    path = rep.write_html(tmp_path / "report.html")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<title>Layer sensitivity: tiny&lt;net&gt;</title>" in text
    for n in names:
        assert f"<td>{html.escape(n)}</td>" in text
    assert "c<1>" not in text
    images = text.split('src="data:image/png;base64,')[1:]
    assert len(images) == 2
    for img in images:
        assert base64.b64decode(img.split('"', 1)[0]).startswith(b"\x89PNG\r\n\x1a\n")

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open: list = []
            self.seen: set = set()

        def handle_starttag(self, tag, attrs):
            self.seen.add(tag)
            if tag not in ("meta", "img", "br"):
                self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open and self.open.pop() == tag, (tag, self.open[-3:])

    parser = Tags()
    parser.feed(text)
    assert parser.open == [] and {"html", "head", "body", "table", "img", "pre"} <= parser.seen
    assert "skip:" in text and "names:" in text              # the policy snippet
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left
    d = json.loads(rep.to_json())
    assert [r["name"] for r in d["rows"]] == names
    assert d["keep_float"] == rep.keep_float() and d["acc_float"] == rep.acc_float
    # the escaped skip pattern names exactly the layer
    skip = QuantPolicy.from_dict(rep.policy_with_skips(names=[names[0]]))
    q = quantize_graph(graph, params, skip, fold_bn="deploy")
    assert names[0] not in {r["node"] for r in q.table} and "conv1" in {r["node"] for r in q.table}


def test_bad_input_is_a_clear_error(net, damaged):
    graph, params, calib, (x, y) = net
    with pytest.raises(QuantOpsError, match="calibration set is empty"):
        layer_sensitivity(graph, params, "trt_int8", [], progress=False)
    with pytest.raises(QuantOpsError, match="'conv9' is not a quantized layer"):
        layer_sensitivity(graph, params, "trt_int8", calib, layers=["conv9"], progress=False)
    with pytest.raises(QuantOpsError, match="'conv9' is not a quantized layer"):
        damaged.policy_with_skips(names=["conv9"])
    with pytest.raises(QuantOpsError, match="one label per image"):
        layer_sensitivity(graph, params, "trt_int8", calib, (x, y[:-1]), progress=False)
    with pytest.raises(QuantOpsError, match="quantizes no layer"):
        layer_sensitivity(graph, params, {"skip": {"ops": ["Convolution", "FullyConnected"]}},
                          calib, progress=False)
    only = layer_sensitivity(graph, params, "trt_int8", calib, layers=["fc"], progress=False)
    assert [r.name for r in only.rows] == ["fc"]


@pytest.mark.skipif(not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed")
def test_command_line(tmp_path, capsys):
    graph, params, _, _ = tiny_net(shape=(1, 28, 28))
    prefix = tmp_path / "tiny"
    sym = graph.to_symbol()
    sym.save(f"{prefix}-symbol.json")
    aux = set(sym.list_auxiliary_states())
    mx.nd.save(f"{prefix}-0000.params",
               {f"{'aux' if k in aux else 'arg'}:{k}": mx.nd.array(v) for k, v in params.items()})
    Path(f"{prefix}.json").write_text(json.dumps({"normalize": {"mean": 0.3, "std": 0.35}}))
    out = tmp_path / "out"
    args = ["--model", str(prefix), "--calib-images", "64", "--calib-batch", "32",
            "--eval-images", "200", "--out", str(out)]
    assert sensitivity_main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["policy_skip.yaml", "report.html",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == LAYERS and report["eval_images"] == 200
    pol = QuantPolicy.load(out / "policy_skip.yaml")
    assert list(pol.skip_names) == report["keep_float"]
    assert "keep in float" in capsys.readouterr().out

    bad = [(["--model", str(tmp_path / "nothing")], "nothing.json"),
           (["--model", str(prefix), "--policy", "trt_int9"], "unknown preset"),
           (["--model", str(prefix), "--calib-images", "0"], "--calib-images must be >= 1")]
    for extra, needle in bad:
        dest = tmp_path / "bad_out"
        assert sensitivity_main(extra + ["--out", str(dest)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert not dest.exists()
