"""SineScheduler and the resumable fine-tuning loop (quantizer state included)."""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from quant_ops.datasets import fashion_mnist
from quant_ops.errors import QuantOpsError
from quant_ops.prepare import prepare
from quant_ops.train import FitConfig, SineScheduler, evaluate, fit
from quant_ops.train.loop import plot_history


def test_sine_scheduler():
    s = SineScheduler(100, base_lr=0.1)
    assert isinstance(s, mx.lr_scheduler.LRScheduler)
    assert s(0) == 0 and s(50) == pytest.approx(0.1) and s(100) == pytest.approx(0, abs=1e-12)
    assert s(25) == pytest.approx(0.1 * math.sin(math.pi / 4))
    assert s(250) == pytest.approx(0, abs=1e-12)
    with pytest.raises(QuantOpsError):
        SineScheduler(0)


def small_net(seed=0):
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix="small_")
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, activation="relu"), nn.MaxPool2D(2),
                nn.Flatten(), nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 28, 28)))
    return net


@pytest.fixture(scope="module")
def data():
    x, y = fashion_mnist("test")
    return (x[:600], y[:600]), (x[600:1000], y[600:1000])


def quantized(seed=0):
    return prepare(small_net(seed), "trt_int8")


def params_of(net):
    return {k: v.data().asnumpy() for k, v in net.collect_params().items()}


def test_killed_run_resumes_exactly(data, tmp_path):
    train, val = data
    cfg = dict(epochs=2, lr=0.05, batch_size=100, seed=3, checkpoint_every=2, progress=False)
    a = quantized()
    full = fit(a, train, val, FitConfig(**cfg))
    b = quantized()
    ck = str(tmp_path / "ck")
    part = fit(b, train, val, FitConfig(**cfg, checkpoint_dir=ck, stop_after_steps=7))
    assert part["step"] == 7 and part["epoch"] == 1 and part["batch"] == 1   # mid-epoch
    c = quantized(seed=1)                   # a fresh process: different initial weights
    resumed = fit(c, train, val, FitConfig(**cfg, checkpoint_dir=ck))
    pa, pc = params_of(a), params_of(c)
    ranges = [k for k in pa if k.endswith("_minmax")]
    assert ranges and all(pa[k][0] > 0 for k in ranges)
    for k in pa:
        np.testing.assert_allclose(pc[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert resumed["history"][-1]["val_accuracy"] == pytest.approx(
        full["history"][-1]["val_accuracy"], abs=0.5)
    png = plot_history(resumed["history"], tmp_path / "h.png")
    assert png.stat().st_size > 1000


def test_fit_improves_and_evaluates(data):
    train, val = data
    net = quantized()
    before = evaluate(net, *val)
    fit(net, train, None, FitConfig(epochs=2, lr=0.05, batch_size=50, progress=False))
    assert evaluate(net, *val) > before + 10


def test_qat_train_entry_single_process(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "qat_worker.py"), "--model", "tiny",
                        "--kvstore", "device", "--epochs", "1", "--train-limit", "512",
                        "--test-limit", "200", "--lr", "0.05", "--batch-size", "64",
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "rank0" / "result.json").read_text())
    assert res["steps"] == 8 and res["accuracy"] > 20
    assert (tmp_path / "checkpoint" / "progress.json").is_file()


def test_qat_train_entry_recipe_defaults(tmp_path):
    """Without tuning flags the entry follows the default recipe (calibrated start, float
    lr / 400 at 8 bits) and writes the model, result.json, metrics.csv and curves.png; an
    unknown model exits 2."""
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    from quant_ops.policy import QuantPolicy
    from quant_ops.train.recipe import default_recipe

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "utils" / "qat_train.py"), "--model", "fmnist_mobilenetv2",
           "--train-limit", "256", "--test-limit", "200", "--calib-images", "128",
           "--batch-size", "64", "--no-progress", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    progress = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())
    info = json.loads((root / "examples" / "models" / "fmnist_mobilenetv2.json").read_text())
    rec = default_recipe(QuantPolicy.preset("trt_int8"), info["lr"])
    assert progress["config"]["lr"] == rec.lr == info["lr"] / 400
    out = tmp_path / "rank0"
    res = json.loads((out / "result.json").read_text())
    assert res["steps"] == 4 and res["recipe"]["fold_bn"] == "qat"
    assert res["accuracy"] > 60 and res["accuracy_before"] > 60   # a calibrated start
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows and float(rows[-1]["test_accuracy"]) == res["accuracy"]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "final-symbol.json").is_file() and (out / "final-0000.params").is_file()
    bad = subprocess.run(cmd[:3] + ["nosuchmodel", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown model" in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--policy", "no_such_preset"], "unknown preset"),
    (["--lr", "-1"], "--lr must be a number > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--symbol", "/nonexistent/m-symbol.json", "--params", "/nonexistent/m-0000.params"],
     "m-symbol.json"),
])
def test_qat_train_bad_input_is_one_line(extra, needle, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = extra if "--symbol" in extra else ["--model", "fmnist_resnet20", *extra]
    r = subprocess.run([sys.executable, str(root / "utils" / "qat_train.py"), *args,
                        "--train-limit", "64", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0]
    assert not (tmp_path / "o").exists()


def test_qat_train_any_model_and_policy_file_on_an_image_folder(tmp_path):
    """A user's own symbol + params, a policy file, an ImageNet-style folder (train/, val/)."""
    import subprocess
    import sys
    from pathlib import Path

    import json
    import mxnet as mx
    from PIL import Image

    from quant_ops.zoo import get_model

    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for c in range(2):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n // 2):
                px = rng.integers(0, 100, (16, 16, 3)) + 150 * c
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    net = get_model("cifar_resnet20_v1", classes=2)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 16, 16)))
    net.export(str(tmp_path / "user"), epoch=0)
    pol = tmp_path / "p.yaml"
    pol.write_text("preset: trt_int8\nweight: {method: lsq, bits: 4, per_channel: true}\n"
                   "skip: {first_layer: true}\n")
    r = subprocess.run([sys.executable, str(root / "utils" / "qat_train.py"),
                        "--symbol", str(tmp_path / "user-symbol.json"),
                        "--params", str(tmp_path / "user-0000.params"),
                        "--input-shape", "1,3,16,16", "--mean", "0.5", "--std", "0.25",
                        "--data", str(tmp_path / "data"), "--policy", str(pol),
                        "--calib-images", "16", "--batch-size", "8", "--no-progress",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "rank0" / "result.json").read_text())
    assert res["train_images"] == 24 and res["test_images"] == 8 and res["steps"] == 3
    assert res["recipe"]["lr"] == pytest.approx(0.1 / 20)     # 4-bit weights, no float lr
    assert res["test"].endswith("val")


def _tiny_run(out, *extra):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "tests" / "qat_worker.py"), "--model",
                           "tiny", "--epochs", "1", "--train-limit", "256", "--test-limit",
                           "64", "--batch-size", "64", "--calib-images", "0", "--no-progress",
                           "--checkpoint-every", "1",
                           *extra, "--out", str(out)], capture_output=True, text=True,
                          timeout=300)


def test_a_resume_with_other_settings_is_refused_and_the_same_run_continues(tmp_path):
    """The checkpoints in --out belong to one run (model, policy, recipe, seed, data): a
    second run there with another lr, seed or training set is refused with the setting
    named, and nothing in --out changes; the same settings continue from the checkpoint."""
    import hashlib
    import json

    def snapshot():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    r = _tiny_run(tmp_path / "o", "--fail-at-step", "2", "--fail-rank", "0")
    assert r.returncode != 0 and (tmp_path / "o" / "checkpoint.json").is_file()
    before = snapshot()
    for extra, what in ((["--lr", "0.01"], "recipe.lr 0.00025 -> 0.01"),
                        (["--seed", "3"], "seed 0 -> 3"),
                        (["--train-limit", "128"], "train.images 256 -> 128")):
        bad = _tiny_run(tmp_path / "o", *extra)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr
        assert "holds the checkpoints of a run with a different" in lines[0] and what in lines[0]
        assert snapshot() == before
    ok = _tiny_run(tmp_path / "o")
    assert ok.returncode == 0, ok.stderr
    res = json.loads((tmp_path / "o" / "rank0" / "result.json").read_text())
    assert res["steps"] == 4


def test_a_diverged_run_writes_no_model(tmp_path):
    """A non-finite loss stops the run before it writes a model; checkpoints it saved
    before stay (with their record), and a run that never saved one leaves nothing."""
    r = _tiny_run(tmp_path / "o", "--lr", "1e30")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: training diverged") and "lower the learning rate" \
        in lines[0]
    assert not (tmp_path / "o" / "rank0").exists()
    assert (tmp_path / "o" / "checkpoint.json").is_file()
    r = _tiny_run(tmp_path / "a" / "b", "--lr", "1e30", "--checkpoint-every", "100")
    assert r.returncode == 2 and not (tmp_path / "a").exists(), r.stderr


def test_validation_classes_are_numbered_as_the_training_folders():
    """Image folders number classes by their sorted folder names: a val/ with fewer classes
    gets the training folder's numbers; a class training never saw is an error."""
    from quant_ops.datasets import Data, align_classes
    from quant_ops.errors import QuantOpsError

    x = np.zeros((3, 1, 2, 2), np.float32)
    train = Data(x, np.array([0, 1, 2]), "data/train", ["cat", "dog", "fox"])
    val = Data(x, np.array([0, 1, 1]), "data/val", ["cat", "fox"])
    got = align_classes(train, val)
    assert got.y.tolist() == [0, 2, 2] and got.classes == train.classes
    assert align_classes(train, train) is train
    with pytest.raises(QuantOpsError, match="data/val: class folder.s. emu are not classes of "
                                            "the training data .data/train."):
        align_classes(train, Data(x, np.array([0, 1, 1]), "data/val", ["cat", "emu"]))


def test_progressive_stages_lower_the_widths_and_resume_exactly(tmp_path):
    """--progressive 8,4 with a 4-bit policy: a W8A8 stage, then W4A4 from its weights,
    each recalibrated; killed in the second stage and resumed, the run ends with the
    params of a run never stopped."""
    import json

    from quant_ops.graph.params import load_params
    from quant_ops.train.progressive import stage_widths
    from quant_ops.policy import QuantPolicy

    pol = tmp_path / "w4a4.yaml"
    pol.write_text("weight: {method: int8, bits: 4, per_channel: true}\n"
                   "activation: {method: int8, bits: 4}\n")
    assert stage_widths(QuantPolicy.load(pol), (8, 4, 3, 2)) == [(8, 8), (4, 4)]
    args = ["--policy", str(pol), "--progressive", "8,4", "--calib-images", "64"]
    whole = _tiny_run(tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr
    res = json.loads((tmp_path / "whole" / "rank0" / "result.json").read_text())
    stages = res["progressive"]
    assert [(s["weight_bits"], s["activation_bits"]) for s in stages] == [(8, 8), (4, 4)]
    assert [s["steps"] for s in stages] == [4, 4] and res["steps"] == 8
    assert stages[0]["recipe"]["lr"] < stages[1]["recipe"]["lr"]     # lr/400 at 8 bits
    killed = _tiny_run(tmp_path / "resumed", *args, "--fail-at-step", "2", "--fail-rank", "0")
    assert killed.returncode != 0
    # the kill hook fires at step 2 of the first stage; run stage 2's kill separately
    resumed = _tiny_run(tmp_path / "resumed", *args)
    assert resumed.returncode == 0, resumed.stderr
    a = load_params(tmp_path / "whole" / "rank0" / "final-0000.params")
    b = load_params(tmp_path / "resumed" / "rank0" / "final-0000.params")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_stage_widths_never_go_below_the_policy_and_end_at_it():
    from quant_ops.errors import QuantOpsError
    from quant_ops.policy import QuantPolicy
    from quant_ops.train.progressive import at_widths, stage_widths

    w4a8 = QuantPolicy.from_dict({"weight": {"bits": 4}, "activation": {"bits": 8}})
    assert stage_widths(w4a8, (8, 4, 3, 2)) == [(8, 8), (4, 8)]
    w2a2 = QuantPolicy.from_dict({"weight": {"bits": 2}, "activation": {"bits": 2},
                                  "overrides": [{"match": "fc*", "weight": {"bits": 8}}]})
    assert stage_widths(w2a2, (4, 8)) == [(8, 8), (4, 4), (2, 2)]
    p = at_widths(w2a2, 4, 3)
    assert (p.weight.bits, p.activation.bits) == (4, 3) and p.overrides == w2a2.overrides
    with pytest.raises(QuantOpsError, match="progressive widths must be integers"):
        stage_widths(w2a2, ("a",))


def test_fit_refuses_a_resume_with_other_settings_before_touching_the_net(data, tmp_path):
    """A checkpoint of a run with another lr is refused, and the net keeps its weights."""
    from quant_ops.errors import QuantOpsError

    train, _ = data
    ck = str(tmp_path / "ck")
    fit(small_net(), train, None, FitConfig(epochs=1, batch_size=100, lr=0.05, progress=False,
                                            checkpoint_dir=ck, checkpoint_every=1,
                                            stop_after_steps=2))
    other = small_net(seed=1)
    before = {k: p.data().asnumpy().copy() for k, p in other.collect_params().items()}
    with pytest.raises(QuantOpsError, match=r"its run had lr=0.05; resuming with lr=0.01"):
        fit(other, train, None, FitConfig(epochs=1, batch_size=100, lr=0.01, progress=False,
                                          checkpoint_dir=ck))
    for k, p in other.collect_params().items():
        np.testing.assert_array_equal(p.data().asnumpy(), before[k], err_msg=k)
