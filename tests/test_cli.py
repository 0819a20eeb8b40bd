"""utils/graph_optimize.py as a user runs it: outputs, and one-line errors with exit 2 that
leave nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import quant_ops
from quant_ops.zoo import get_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "2,3,32,32"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "utils" / "graph_optimize.py"), *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=300)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("float")
    net = get_model("cifar_resnet20_v1")
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x = mx.nd.random.uniform(shape=(2, 3, 32, 32))
    y = net(x)
    net.export(str(d / "r20"), epoch=0)
    return d / "r20-symbol.json", d / "r20-0000.params", x, y


def test_quantizes_a_symbol_params_pair(float_model, tmp_path):
    sym_f, par_f, x, y = float_model
    out = tmp_path / "out"
    r = run("--symbol", str(sym_f), "--params", str(par_f), "--input-shape", SHAPE,
            "--fold-bn", "deploy", "--out", str(out))
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["r20-quant-symbol.json", "r20-quant-0000.params", "summary.md",
                            "summary.json", "r20-float.svg", "r20-float.png",
                            "r20-quantized.svg", "r20-quantized.png"])
    summary = json.loads((out / "summary.json").read_text())
    assert any("BatchNorm folded (deploy): 21 of 21" in n for n in summary["notes"])
    assert len([q for q in summary["quantizers"] if q["input"] == "weight"]) == 22
    blk = mx.gluon.SymbolBlock.imports(str(out / "r20-quant-symbol.json"), ["data"],
                                       str(out / "r20-quant-0000.params"))
    quant_ops.set_training(blk, True)
    blk(x)
    quant_ops.set_training(blk, False)
    yq = blk(x).asnumpy()
    assert np.abs(yq - y.asnumpy()).max() < 0.1 * np.abs(y.asnumpy()).max()  # 8-bit close


def test_gluoncv_model_and_policy_file(tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text("preset: trt_int8\nskip: {first_layer: true}\n"
                   "overrides:\n  - match: 'cifarresnetv10_dense*'\n    weight: {bits: 4}\n")
    r = run("--model", "cifar_resnet20_v1", "--input-shape", SHAPE, "--policy", str(pol),
            "--no-draw", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    table = json.loads((tmp_path / "o" / "summary.json").read_text())["quantizers"]
    assert "cifarresnetv10_conv0_fwd" not in {q["node"] for q in table}
    dense = [q for q in table if q["node"].startswith("cifarresnetv10_dense")]
    assert {q["bits"] for q in dense if q["input"] == "weight"} == {4}


@pytest.mark.parametrize("case", ["bad_json", "params_mismatch", "unknown_op", "no_match",
                                  "not_writable"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, float_model, tmp_path):
    sym_f, par_f, _, _ = float_model
    out = tmp_path / "out"
    args = ["--symbol", str(sym_f), "--params", str(par_f), "--input-shape", SHAPE]
    if case == "bad_json":
        bad = tmp_path / "bad-symbol.json"
        bad.write_text('{"nodes": [')
        args[1] = str(bad)
        needle = "not valid JSON"
    elif case == "params_mismatch":
        other = get_model("cifar_resnet56_v1")
        other.initialize()
        other(mx.nd.zeros((1, 3, 32, 32)))
        other.save_parameters(str(tmp_path / "other.params"))
        args[3] = str(tmp_path / "other.params")
        needle = "params do not match"
    elif case in ("unknown_op", "no_match"):
        pol = tmp_path / "p.json"
        pol.write_text(json.dumps({"quantize_ops": ["Convolutoin"]} if case == "unknown_op"
                                  else {"skip": {"names": ["nothing_like_this*"]}}))
        args += ["--policy", str(pol)]
        needle = "unknown op 'Convolutoin'" if case == "unknown_op" else "matches no node"
    else:
        blocker = tmp_path / "a_file"          # a folder cannot be made under a file,
        blocker.write_text("")                 # whoever runs the test (root included)
        out = blocker / "out"
        needle = "cannot write there"
    r = run(*args, "--out", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("module", ["quant_ops.cli.launch", "quant_ops.train.launch"])
def test_launcher_without_worker_command_exits_2(module):
    r = subprocess.run([sys.executable, "-m", module, "-n", "2", "--"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: give the worker command after --"


def test_library_leaves_command_lines_and_checkout_paths_to_cli():
    """Only quant_ops/cli/ parses arguments and knows examples/models; test hooks stay in
    tests/ (a regular pip install of the library works without the checkout)."""
    pkg = ROOT / "quant_ops"
    for path in pkg.rglob("*.py"):
        if path.parent.name == "cli" and path.parent.parent == pkg:
            continue
        text = path.read_text()
        for word in ("argparse", "examples", "fail_at_step", '"tiny"'):
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word}"


def test_missing_bundled_model_names_its_path(monkeypatch, tmp_path):
    from quant_ops.cli import common
    from quant_ops.errors import QuantOpsError

    assert common.model_prefix("fmnist_resnet20") == common.EXAMPLE_MODELS / "fmnist_resnet20"
    assert common.model_prefix("some/prefix") == Path("some/prefix")
    monkeypatch.setattr(common, "EXAMPLE_MODELS", tmp_path)
    with pytest.raises(QuantOpsError, match=f"{tmp_path}/fmnist_resnet20.json: no such model"):
        common.bundled_model("fmnist_resnet20")
    with pytest.raises(QuantOpsError, match="unknown model 'resnet20'"):
        common.bundled_model("resnet20")


def test_no_arguments_runs_the_seed_example(tmp_path):
    r = run(cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "graph_optimize_example"
    assert "out/graph_optimize_example" in r.stdout
    names = {p.name for p in out.iterdir()}
    assert {"resnet18_v1-float.svg", "resnet18_v1-quantized.svg", "summary.md",
            "resnet18_v1-quant-symbol.json"} <= names
    # the terminal gets a short summary; the table is in the files
    assert len(r.stdout.splitlines()) < 10 and "activation ranges are empty" in r.stdout
    assert "activation ranges are empty" in (out / "summary.md").read_text()
    assert (out / "summary.md").read_text().count("\n| resnetv10_") == 39


def test_a_softmaxoutput_head_is_kept_and_dropped_for_inference(tmp_path):
    data = mx.sym.var("data")
    fc = mx.sym.FullyConnected(mx.sym.relu(mx.sym.Convolution(
        data, num_filter=4, kernel=(3, 3), name="c1")), num_hidden=3, name="fc")
    head = mx.sym.SoftmaxOutput(fc, name="softmax")
    head.save(str(tmp_path / "m-symbol.json"))
    shapes = dict(zip(head.list_arguments(), head.infer_shape(data=(2, 3, 8, 8))[0]))
    rng = np.random.default_rng(0)
    mx.nd.save(str(tmp_path / "m-0000.params"),
               {f"arg:{k}": mx.nd.array(rng.normal(0, 0.3, s)) for k, s in shapes.items()
                if k not in ("data", "softmax_label")})
    r = run("--symbol", str(tmp_path / "m-symbol.json"), "--params",
            str(tmp_path / "m-0000.params"), "--input-shape", "2,3,8,8", "--no-draw",
            "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    saved = mx.sym.load(str(tmp_path / "o" / "m-quant-symbol.json"))
    assert "softmax_label" in saved.list_arguments()        # kept for training
    m = quant_ops.QuantizedModel.load(tmp_path / "o" / "m-quant")
    m.calibrate(rng.uniform(size=(4, 3, 8, 8)).astype(np.float32), "minmax", progress=False)
    p = m.predict(rng.uniform(size=(4, 3, 8, 8)).astype(np.float32))
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)     # softmax, no label needed


def test_inference_before_calibration_warns_once(caplog):
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Conv2D(4, 3), mx.gluon.nn.Dense(3))
    net.initialize()
    x = np.zeros((2, 3, 8, 8), np.float32)
    m = quant_ops.quantize(net, "trt_int8", sample=mx.nd.array(x))
    with caplog.at_level("WARNING"):
        m.predict(x)
        m.predict(x)
    assert sum("have no range yet" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", ".."])
def test_a_name_cannot_leave_out(name, float_model, tmp_path):
    sym_f, par_f, _, _ = float_model
    r = run("--symbol", str(sym_f), "--params", str(par_f), "--input-shape", SHAPE,
            "--no-draw", "--name", name, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--name" in r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.parent.glob("x*"))


def test_an_output_cannot_overwrite_an_input(tmp_path):
    import shutil

    src = tmp_path / "m"
    src.mkdir()
    net = get_model("cifar_resnet20_v1")
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.export(str(src / "r20-quant"), epoch=0)     # named as the tool's own outputs
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = run("--symbol", str(src / "r20-quant-symbol.json"), "--params",
            str(src / "r20-quant-0000.params"), "--input-shape", SHAPE, "--no-draw",
            "--name", "r20", "--out", str(src))
    assert r.returncode == 2 and "would overwrite an input" in r.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    shutil.rmtree(src)


def test_calibrates_from_data_and_keeps_float_accuracy(tmp_path):
    """--calib fills every activation range: the written model runs as INT8 at once."""
    from quant_ops import QuantizedModel
    from quant_ops.datasets import fashion_mnist

    prefix = ROOT / "examples" / "models" / "fmnist_resnet20"
    out = tmp_path / "o"
    r = run("--symbol", f"{prefix}-symbol.json", "--params", f"{prefix}-0000.params",
            "--input-shape", "1,1,28,28", "--calib", "fmnist", "--calib-images", "128",
            "--mean", "0.286", "--std", "0.353", "--no-draw", "--no-progress",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert any("calibrated (auto) on 128 images" in n for n in notes), notes
    q = QuantizedModel.load(out / "fmnist_resnet20-quant")
    assert q.quantizers and not q.uncalibrated()
    x, y = fashion_mnist("test")
    x, y = (x[:1000] - 0.286) / 0.353, y[:1000]
    f = QuantizedModel.load(prefix)
    acc_f, acc_q = f.evaluate(x, y, progress=False), q.evaluate(x, y, progress=False)
    assert acc_q > acc_f - 1.5, (acc_f, acc_q)   # percent


@pytest.mark.parametrize("case", ["missing", "wrong_shape", "mean_alone"])
def test_bad_calibration_data_is_one_line_exit_2(case, float_model, tmp_path):
    sym_f, par_f, _, _ = float_model
    data = tmp_path / "calib.npy"
    np.save(data, np.zeros((4, 3, 16, 16), np.float32))
    extra = {"missing": ["--calib", str(tmp_path / "nope.npy")],
             "wrong_shape": ["--calib", str(data)],
             "mean_alone": ["--calib", str(data), "--mean", "0.5"]}[case]
    out = tmp_path / "out"
    r = run("--symbol", str(sym_f), "--params", str(par_f), "--input-shape", SHAPE,
            "--no-draw", "--no-progress", *extra, "--out", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert ("nope.npy" in lines[0]) if case == "missing" else True
    assert ("--mean" in lines[0]) if case == "mean_alone" else True
    assert not out.exists()


def test_calibrates_from_an_npy_file(float_model, tmp_path):
    sym_f, par_f, x, _ = float_model
    data = tmp_path / "calib.npy"
    np.save(data, np.random.RandomState(0).uniform(size=(10, 3, 32, 32)).astype(np.float32))
    r = run("--symbol", str(sym_f), "--params", str(par_f), "--input-shape", SHAPE,
            "--no-draw", "--no-progress", "--calib", str(data), "--calib-method", "minmax",
            "--calib-batch", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    from quant_ops import QuantizedModel

    assert not QuantizedModel.load(tmp_path / "o" / "r20-quant").uncalibrated()
