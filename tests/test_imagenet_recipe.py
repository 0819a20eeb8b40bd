"""The ImageNet ResNet-18 QAT recipe on a tiny synthetic ImageNet-style folder, and the
Dataset / DataLoader inputs of ``fit`` it relies on."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon
from mxnet.gluon import nn

from quant_ops.errors import QuantOpsError
from quant_ops.train import FitConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location(
        "qat_imagenet_resnet18", ROOT / "examples" / "qat_imagenet_resnet18.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_folder(root: Path, classes=("n01440764", "n01443537"), per_class=4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{c}_{i}.JPEG", quality=90)
    return root


def test_smoke_run_trains_checkpoints_and_exports(recipe, tmp_path):
    data = write_folder(tmp_path / "imagenet")
    out = tmp_path / "out"
    rc = recipe.main(["--data", str(data), "--random-init", "--image-size", "64",
                      "--batch-size", "4", "--epochs", "1", "--limit", "2",
                      "--freeze-bn-after", "1", "--workers", "0", "--no-progress",
                      "--out", str(out)])
    assert rc == 0
    ck = out / "checkpoint"
    assert (ck / "net.params").is_file() and (ck / "optimizer.npz").is_file()
    progress = json.loads((ck / "progress.json").read_text())
    assert progress["step"] == 2 and progress["epoch"] == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and s["bn_frozen_at"] == 1
    assert math.isfinite(s["final_loss"]) and s["final_loss"] > 0
    assert s["lr"] == pytest.approx(0.05 * 4 / 256)          # half the float lr, scaled
    assert 0 <= s["int8_accuracy"] <= 100
    for f in ("resnet18_v1_int8-symbol.json", "resnet18_v1_int8-0000.params",
              "resnet18_v1_int8.onnx", "resnet18_v1_int8.calib.cache"):
        assert (out / f).stat().st_size > 0, f
    nodes = json.loads((out / "resnet18_v1_int8-symbol.json").read_text())["nodes"]
    layers = [n for n in nodes if n["op"] in ("Convolution", "FullyConnected")]
    assert len(layers) == 21      # ResNet-18: 20 convolutions, 1 classifier
    for n in layers:              # data and weight of every layer pass through a quantizer
        assert [nodes[e[0]]["op"] for e in n["inputs"][:2]] == ["Quantization_int8"] * 2
    assert s["onnxruntime"]["int8_codes_identical_min"] == 1.0
    # the exported params load into the exported graph and classify 2 classes
    blk = gluon.SymbolBlock.imports(str(out / "resnet18_v1_int8-symbol.json"), ["data"],
                                    str(out / "resnet18_v1_int8-0000.params"))
    assert blk(mx.nd.zeros((1, 3, 64, 64))).shape == (1, 2)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_classes", "no class folders"),
    ("no_val", "no val folder"),
    ("no_params", "nothing can be downloaded"),
])
def test_bad_input_is_one_line_and_exit_2(recipe, tmp_path, capsys, case, message):
    data = tmp_path / "data"
    if case == "no_classes":
        (data / "train").mkdir(parents=True)
        (data / "val").mkdir()
    elif case in ("no_val", "no_params"):
        write_folder(data)
        if case == "no_val":
            for f in (data / "val").rglob("*"):
                if f.is_file():
                    f.unlink()
            for d in sorted((data / "val").rglob("*"), reverse=True):
                d.rmdir()
            (data / "val").rmdir()
    argv = ["--data", str(data), "--out", str(tmp_path / "out")]
    if case == "no_params":
        argv += ["--params", str(tmp_path / "resnet18_v1-a0666292.params")]
    else:
        argv += ["--random-init"]
    assert recipe.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- fit on a Dataset / DataLoader -----------------------------------------------------

def tiny_net(seed=0):
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix="tiny_")
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, padding=1, use_bias=False), nn.BatchNorm(),
                nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dense(2))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 8, 8)))
    net.hybridize()
    return net


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.float32)
    return x, y


def params_of(net):
    return {k: p.data().asnumpy() for k, p in net.collect_params().items()}


CFG = dict(epochs=2, lr=0.05, batch_size=8, seed=2, progress=False, checkpoint_every=2)


def test_dataset_gives_the_array_run_and_resumes_exactly(arrays, tmp_path):
    x, y = arrays
    ref = tiny_net()
    fit(ref, (x, y), None, FitConfig(**CFG, freeze_bn_after=3))
    ds = gluon.data.ArrayDataset(mx.nd.array(x), mx.nd.array(y))
    ck = str(tmp_path / "ck")
    part = fit(tiny_net(), ds, None,
               FitConfig(**CFG, freeze_bn_after=3, checkpoint_dir=ck, stop_after_steps=6))
    assert part["step"] == 6 and part["batch"] == 1              # killed mid-epoch 2
    net = tiny_net(seed=5)
    done = fit(net, ds, ds, FitConfig(**CFG, freeze_bn_after=3, checkpoint_dir=ck))
    assert done["step"] == 10 and "val_accuracy" in done["history"][-1]
    pr, pn = params_of(ref), params_of(net)
    for k in pr:
        np.testing.assert_allclose(pn[k], pr[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_dataloader_epochs_are_its_length(arrays, tmp_path):
    x, y = arrays
    ds = gluon.data.ArrayDataset(mx.nd.array(x), mx.nd.array(y))
    loader = gluon.data.DataLoader(ds, batch_size=16, shuffle=True, last_batch="discard")
    net = tiny_net()
    ck = str(tmp_path / "ck")
    part = fit(net, loader, None, FitConfig(**CFG, checkpoint_dir=ck, stop_after_steps=3))
    assert part["step"] == 3 and part["epoch"] == 1 and part["batch"] == 1
    done = fit(tiny_net(seed=3), loader, loader, FitConfig(**CFG, checkpoint_dir=ck))
    assert done["step"] == 4 and len(done["history"]) == 2
    assert math.isfinite(done["history"][-1]["loss"])
    with pytest.raises(QuantOpsError, match="empty"):
        fit(tiny_net(), gluon.data.ArrayDataset([], []), None, FitConfig(**CFG))


def test_evaluate_agrees_across_inputs(arrays):
    x, y = arrays
    net = tiny_net()
    ds = gluon.data.ArrayDataset(mx.nd.array(x), mx.nd.array(y))
    a = evaluate(net, x, y, batch_size=7)
    assert evaluate(net, ds, batch_size=7) == a
    assert evaluate(net, gluon.data.DataLoader(ds, batch_size=9)) == a


def test_float_weights_load_and_bad_files_are_named(recipe, tmp_path, monkeypatch):
    from quant_ops.zoo import get_model

    src = get_model("resnet18_v1", classes=2)
    src.initialize(mx.init.Xavier())
    src(mx.nd.zeros((1, 3, 32, 32)))
    src.save_parameters(str(tmp_path / "r18.params"))
    monkeypatch.setattr(recipe, "IMAGENET_CLASSES", 2)   # a 2-class "pretrained" head
    args = recipe.parse_args(["--data", str(tmp_path), "--params", str(tmp_path / "r18.params")])
    net = recipe.float_model(args, 2)
    w = [p for k, p in net.collect_params().items() if k.endswith("dense0_weight")][0]
    w0 = [p for k, p in src.collect_params().items() if k.endswith("dense0_weight")][0]
    np.testing.assert_array_equal(w.data().asnumpy(), w0.data().asnumpy())
    with pytest.raises(recipe.UsageError, match="3 class folders"):
        recipe.float_model(args, 3)
    (tmp_path / "bad.params").write_bytes(b"not params")
    args.params = tmp_path / "bad.params"
    with pytest.raises(recipe.UsageError, match="bad.params: not resnet18_v1 weights"):
        recipe.float_model(args, 2)
