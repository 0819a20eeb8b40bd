"""The PTQ command lines (utils/dfq.py, utils/easyquant.py, utils/adaround.py,
utils/sensitivity.py) on the
bundled Fashion-MNIST model and on a user's symbol + params with an image folder, and the
data loader behind them: outputs that load, and one-line errors with exit 2 that leave
nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from quant_ops.cli import adaround, dfq, easyquant, sensitivity
from quant_ops.datasets import FASHION_MNIST_DIR, fashion_mnist, load_data
from quant_ops.errors import QuantOpsError
from quant_ops.model import QuantizedModel

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "models" / "fmnist_resnet20"
needs_fmnist = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file()
    or not Path(f"{BUNDLED}.json").is_file(),
    reason="Fashion-MNIST or the bundled model is not installed")
TINY_SHAPE = "1,3,16,16"


@pytest.fixture(scope="module")
def fmnist_npz(tmp_path_factory):
    """64 calibration images (normalized float, x/y) and 200 test images (uint8 NHWC
    pixels, data/label: normalized by the loader with the model's .json)."""
    if not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    d = tmp_path_factory.mktemp("fmnist")
    info = json.loads(Path(f"{BUNDLED}.json").read_text())["normalize"]
    xt, yt = fashion_mnist("train")
    calib = d / "calib.npz"
    np.savez(calib, x=((xt[:64] - info["mean"]) / info["std"]).astype(np.float32),
             y=yt[:64])
    xe, ye = fashion_mnist("test")
    test = d / "test.npz"
    pixels = np.rint(xe[:200, 0, :, :, None] * 255).astype(np.uint8)
    np.savez(test, data=pixels, label=ye[:200])
    return calib, test


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A user's model: conv-BN-ReLU6, conv-BN-ReLU, global pool, FC, SoftmaxOutput (3x16x16
    input), saved as symbol + params; an image folder (2 classes of 4 RGB 20x20 PNGs)."""
    d = tmp_path_factory.mktemp("tiny")
    x = mx.sym.var("data")
    c0 = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv0")
    a0 = mx.sym.clip(mx.sym.BatchNorm(c0, fix_gamma=False, name="bn0"), 0, 6)
    c1 = mx.sym.Convolution(a0, num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv1")
    a1 = mx.sym.relu(mx.sym.BatchNorm(c1, fix_gamma=False, name="bn1"))
    p = mx.sym.Pooling(a1, kernel=(1, 1), global_pool=True, pool_type="avg")
    fc = mx.sym.FullyConnected(p, num_hidden=2, name="fc")
    out = mx.sym.SoftmaxOutput(fc, name="softmax")
    rng = np.random.default_rng(0)
    arg_shapes, _, aux_shapes = out.infer_shape(data=(1, 3, 16, 16))
    params = {}
    for n, s in zip(out.list_arguments(), arg_shapes):
        if n.endswith("weight"):
            params[f"arg:{n}"] = rng.normal(0, np.sqrt(2 / np.prod(s[1:])), s)
        elif n.endswith("gamma"):
            params[f"arg:{n}"] = rng.uniform(0.5, 1.5, s)
        elif n not in ("data", "softmax_label"):
            params[f"arg:{n}"] = rng.normal(0, 0.1, s)
    for n, s in zip(out.list_auxiliary_states(), aux_shapes):
        params[f"aux:{n}"] = (rng.uniform(0.5, 1.5, s) if n.endswith("var")
                              else rng.normal(0, 0.1, s))
    out.save(str(d / "tiny-symbol.json"))
    mx.nd.save(str(d / "tiny-0000.params"), {k: mx.nd.array(v) for k, v in params.items()})
    images = d / "images"
    for c, label in enumerate(("cat", "dog")):
        (images / label).mkdir(parents=True)
        for i in range(4):
            a = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(a).save(images / label / f"{i}.png")
    return d / "tiny-symbol.json", d / "tiny-0000.params", images


def _tiny_args(tiny) -> list:
    sym, par, _ = tiny
    return ["--symbol", str(sym), "--params", str(par), "--input-shape", TINY_SHAPE,
            "--mean", "0.5", "--std", "0.25"]


def _outputs(out: Path, name: str) -> dict:
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{name}-quant-symbol.json", f"{name}-quant-0000.params", "report.json",
         "report.md"])
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# ")
    m = QuantizedModel.load(out / f"{name}-quant")
    assert m.is_quantized
    return report, m


# -- end to end ------------------------------------------------------------------------
@needs_fmnist
def test_dfq_bundled_model_with_npz(fmnist_npz, tmp_path):
    calib, test = fmnist_npz
    out = tmp_path / "out"
    assert dfq.main(["--model", "fmnist_resnet20", "--relu", "--equalize", "--correction",
                     "--clip-weight", "15", "--calib", str(calib), "--test", str(test),
                     "--no-progress", "--out", str(out)]) == 0
    rep, m = _outputs(out, "fmnist_resnet20")
    steps = rep["steps"]
    assert steps["bn_folded"] == 21 and steps["relu6_to_relu"] == 0
    assert len(steps["cle"]["pairs"]) > 0 and steps["weight_clip"] == 15
    assert steps["bias_correction"]["mode"] == "empirical"
    assert rep["calibration"]["images"] == 64
    acc = rep["accuracy"]
    assert acc["images"] == 200 and acc["float"] > 85
    assert abs(acc["float_after_dfq"] - acc["float"]) <= 1.0
    assert acc["quantized"] > acc["float"] - 3
    # per-tensor weights by default; the saved model gives the reported accuracy
    weights = [q for q in m.quantizers if q.is_weight]
    assert len(weights) == 22 and not any(q.per_channel for q in weights)
    info = json.loads(Path(f"{BUNDLED}.json").read_text())["normalize"]
    xe, ye = fashion_mnist("test")
    x = ((xe[:200] - info["mean"]) / info["std"]).astype(np.float32)
    assert m.evaluate(x, ye[:200]) == pytest.approx(acc["quantized"])


def test_dfq_user_model_distilled_ranges_image_folder(tiny, tmp_path):
    out = tmp_path / "out"
    assert dfq.main(_tiny_args(tiny) + [
        "--relu", "--equalize", "--correction", "--distill-range", "--batch-size", "8",
        "--distill-batches", "1", "--distill-steps", "5", "--test", str(tiny[2]),
        "--name", "mine", "--no-progress", "--out", str(out)]) == 0
    rep, m = _outputs(out, "mine")
    assert rep["steps"]["relu6_to_relu"] == 1
    assert rep["steps"]["bias_correction"]["mode"] == "data_free"
    assert rep["calibration"]["data"] == "ZeroQ distilled"
    assert rep["distill"]["input_range"] == pytest.approx([-2.0, 2.0])
    assert rep["accuracy"]["images"] == 8
    assert not any(n.op == "clip" for n in m.graph.nodes)
    assert m.predict(np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 2)


@needs_fmnist
def test_easyquant_bundled_int7(fmnist_npz, tmp_path):
    calib, test = fmnist_npz
    out = tmp_path / "out"
    assert easyquant.main(["--model", "fmnist_resnet20", "--bits", "7", "--calib", str(calib),
                           "--calib-images", "16", "--test", str(test), "--rounds", "1",
                           "--points", "8", "--batch-size", "16", "--no-progress",
                           "--out", str(out)]) == 0
    rep, m = _outputs(out, "fmnist_resnet20")
    assert rep["bits"] == 7 and rep["calibration"]["images"] == 16
    assert {int(q.node.attrs["nbits"]) for q in m.quantizers} == {7}
    assert all(q.per_channel for q in m.quantizers if q.is_weight)   # the preset's
    layers = rep["search"]["layers"]
    assert len(layers) == 22
    assert all(r["cosine_after"] >= r["cosine_before"] - 1e-6 for r in layers)
    assert set(rep["accuracy"]) == {"test", "images", "float", "calibrated", "easyquant"}
    assert "| cosine before | cosine after |" in (out / "report.md").read_text()


def test_easyquant_user_model_image_folder(tiny, tmp_path):
    out = tmp_path / "out"
    assert easyquant.main(_tiny_args(tiny) + [
        "--calib", str(tiny[2]), "--test", str(tiny[2]), "--points", "8", "--no-progress",
        "--out", str(out)]) == 0
    rep, m = _outputs(out, "tiny")
    assert rep["bits"] == 8 and len(rep["search"]["layers"]) == 3
    assert rep["calibration"]["images"] == 8 and rep["accuracy"]["images"] == 8


@needs_fmnist
def test_adaround_bundled_w4a8(fmnist_npz, tmp_path):
    calib, test = fmnist_npz
    out = tmp_path / "out"
    assert adaround.main(["--model", "fmnist_resnet20", "--calib", str(calib), "--test",
                          str(test), "--iters", "50", "--no-progress", "--out", str(out)]) == 0
    rep, m = _outputs(out, "fmnist_resnet20")
    bits = {(q.is_weight, int(q.node.attrs["nbits"])) for q in m.quantizers}
    assert bits == {(True, 4), (False, 8)}
    layers = rep["rounding"]["layers"]
    assert len(layers) == 22 and all(r["mse_adaround"] <= r["mse_nearest"] for r in layers)
    assert any(r["kept_learned"] for r in layers)
    acc = rep["accuracy"]
    assert set(acc) == {"test", "images", "float", "calibrated", "adaround"}
    # the saved model is what was measured: its weights are on the 4-bit grid already
    info = json.loads(Path(f"{BUNDLED}.json").read_text())["normalize"]
    xe, ye = fashion_mnist("test")
    x = ((xe[:200] - info["mean"]) / info["std"]).astype(np.float32)
    assert m.evaluate(x, ye[:200]) == pytest.approx(acc["adaround"])
    assert "| nearest | AdaRound |" in (out / "report.md").read_text()


def test_adaround_user_model_image_folder(tiny, tmp_path):
    out = tmp_path / "out"
    assert adaround.main(_tiny_args(tiny) + [
        "--weight-bits", "3", "--act-bits", "6", "--calib", str(tiny[2]), "--iters", "20",
        "--no-progress", "--out", str(out)]) == 0
    rep, m = _outputs(out, "tiny")
    assert rep["policy"].startswith("W3A6") and len(rep["rounding"]["layers"]) == 3


def test_block_reconstruction_user_model(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert adaround.main(_tiny_args(tiny) + [
        "--weight-bits", "4", "--act-bits", "4", "--calib", str(tiny[2]), "--test",
        str(tiny[2]), "--blocks", "--qdrop", "0.5", "--iters", "20", "--no-progress",
        "--out", str(out)]) == 0
    rep, m = _outputs(out, "tiny")
    assert rep["method"] == "BRECQ + QDrop" and rep["rounding"]["qdrop"] == 0.5
    blocks = rep["rounding"]["blocks"]
    assert [b["layers"] for b in blocks] == [["conv0", "conv1", "fc"]]
    assert set(rep["accuracy"]) == {"test", "images", "float", "calibrated", "brecq"}
    assert "brecq" in rep["seconds"]
    assert "| block output | layers |" in (out / "report.md").read_text()
    assert "BRECQ + QDrop" in capsys.readouterr().out
    assert {int(q.node.attrs["nbits"]) for q in m.quantizers} == {4}


def test_adaround_needs_a_calibrated_model():
    m = QuantizedModel.load(BUNDLED) if Path(f"{BUNDLED}.json").is_file() else None
    if m is None:
        pytest.skip("the bundled model is not in this checkout")
    with pytest.raises(QuantOpsError, match="quantize\\(\\) and calibrate\\(\\) first"):
        m.adaround(np.zeros((4, 1, 28, 28), np.float32))
    m.quantize("trt_int8")
    with pytest.raises(QuantOpsError, match="activation quantizers have no range"):
        m.adaround(np.zeros((4, 1, 28, 28), np.float32))


def test_sensitivity_user_model_image_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert sensitivity.main(_tiny_args(tiny) + [
        "--calib", str(tiny[2]), "--test", str(tiny[2]), "--calib-batch", "4",
        "--no-progress", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["policy_skip.yaml", "report.html",
                                                     "report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in rep["rows"]] == ["conv0", "conv1", "fc"]
    assert rep["eval_images"] == 8
    assert "keep in float" in capsys.readouterr().out


def test_wrappers_run():
    for script in ("dfq.py", "easyquant.py", "adaround.py"):
        r = subprocess.run([sys.executable, str(ROOT / "utils" / script), "--help"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--calib" in r.stdout, r.stderr


# -- bad input: one line, exit 2, nothing written ---------------------------------------
def _bad_files(d: Path, tiny) -> dict:
    np.savez(d / "rgb.npz", x=np.zeros((4, 3, 28, 28), np.float32))
    np.savez(d / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    np.savez(d / "keys.npz", images=np.zeros((4, 1, 28, 28), np.float32))
    np.savez(d / "count.npz", x=np.zeros((4, 1, 28, 28), np.float32), y=np.arange(3))
    np.save(d / "nolabels.npy", np.zeros((4, 3, 16, 16), np.float32))
    np.save(d / "rank.npy", np.zeros((4,), np.float32))
    (d / "empty").mkdir()
    pol = d / "int8.yaml"
    pol.write_text("preset: trt_int8\n")
    return {"d": d, "pol": pol}


CASES = {
    # name: (command, extra args (format with d=, tiny=), needle)
    "channels": (dfq, ["--model", "fmnist_resnet20", "--calib", "{d}/rgb.npz"],
                 "rgb.npz: the images have 3 channel(s), the model takes 1"),
    "pickled": (dfq, ["--model", "fmnist_resnet20", "--calib", "{d}/pickled.npz"],
                "pickled.npz: holds pickled"),
    "npz_keys": (easyquant, ["--model", "fmnist_resnet20", "--calib", "{d}/keys.npz"],
                 "keys.npz: no images: it holds 'images'; give the images as 'x'"),
    "label_count": (dfq, ["--model", "fmnist_resnet20", "--distill-range", "--test",
                          "{d}/count.npz"], "count.npz: 4 images but 3 labels"),
    "rank": (easyquant, ["--model", "fmnist_resnet20", "--calib", "{d}/rank.npy"],
             "rank.npy: the images have rank 1"),
    "no_images": (dfq, ["@tiny", "--calib", "{d}/empty"], "empty: no images"),
    "missing": (dfq, ["@tiny", "--calib", "{d}/nothing.npz"], "nothing.npz: no such file"),
    "no_labels": (sensitivity, ["@tiny", "--calib", "{tiny}", "--test", "{d}/nolabels.npy"],
                  "nolabels.npy: no labels for --test"),
    "no_data_sens": (sensitivity, ["@tiny"], "pass --calib DATA"),
    "no_data_dfq": (dfq, ["@tiny"], "give --calib DATA"),
    "no_calib_eq": (easyquant, ["@tiny"], "give --calib DATA"),
    "no_calib_ada": (adaround, ["@tiny"], "give --calib DATA"),
    "ada_lr": (adaround, ["@tiny", "--calib", "{tiny}", "--lr", "nan"],
               "--lr must be a finite number > 0, got nan"),
    "ada_iters": (adaround, ["@tiny", "--calib", "{tiny}", "--iters", "0"],
                  "--iters must be >= 1, got 0"),
    "qdrop_no_blocks": (adaround, ["@tiny", "--calib", "{tiny}", "--qdrop", "0.5"],
                        "--qdrop and --max-layers apply to block reconstruction"),
    "qdrop_range": (adaround, ["@tiny", "--calib", "{tiny}", "--blocks", "--qdrop", "1"],
                    "--qdrop must be a probability in [0, 1), got 1.0"),
    "folder_shape": (dfq, ["--symbol", "{sym}", "--params", "{par}", "--calib", "{tiny}"],
                     "images: an image folder needs the input shape"),
    "late_bits": (easyquant, ["@tiny", "--bits", "7", "--policy", "{pol}", "--calib",
                              "{tiny}", "--points", "4"], "but the graph's quantizers have"),
    "params": (dfq, ["--symbol", "{sym}", "--params", "{d}/int8.yaml", "--calib", "{tiny}"],
               "int8.yaml"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_no_output(case, tiny, tmp_path, capsys):
    if "fmnist_resnet20" in CASES[case][1] and not Path(f"{BUNDLED}.json").is_file():
        pytest.skip("the bundled model is not in this checkout")
    files = _bad_files(tmp_path, tiny)
    cmd, extra, needle = CASES[case]
    sym, par, images = tiny
    args = []
    for a in extra:
        if a == "@tiny":
            args += _tiny_args(tiny)
        else:
            args.append(a.format(d=tmp_path, tiny=images, sym=sym, par=par, pol=files["pol"]))
    out = tmp_path / "out"
    assert cmd.main(args + ["--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


# -- the loader --------------------------------------------------------------------------
def test_load_data_arrays_and_folders(tiny, tmp_path):
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", data=px, label=np.arange(5))
    d = load_data(tmp_path / "a.npz", (1, 3, 16, 16), normalize=([0.5, 0.4, 0.3], 0.25))
    want = (px.transpose(0, 3, 1, 2) / np.float32(255) -
            np.float32([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1)) / np.float32(0.25)
    assert d.x.dtype == np.float32 and np.allclose(d.x, want, atol=1e-6)
    assert list(d.y) == [0, 1, 2, 3, 4]
    f = load_data(tiny[2], (1, 1, 8, 8), limit=3)
    assert f.x.shape == (3, 1, 8, 8) and f.classes == ["cat", "dog"] and len(f.y) == 3
    assert 0 <= f.x.min() and f.x.max() <= 1
    np.save(tmp_path / "g.npy", np.ones((2, 28, 28), np.float32))
    assert load_data(tmp_path / "g.npy", (1, 1, 28, 28)).x.shape == (2, 1, 28, 28)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(QuantOpsError, match="junk.npy: not a .npy file"):
        load_data(tmp_path / "junk.npy")
    with pytest.raises(QuantOpsError, match="a.npz: images of shape 16x16x3, the model "
                                            "takes 3x32x32"):
        load_data(tmp_path / "a.npz", (1, 3, 32, 32))
