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
                        "--test-limit", "200", "--lr", "0.05", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "rank0" / "result.json").read_text())
    assert res["steps"] == 8 and res["accuracy"] > 20
    assert (tmp_path / "checkpoint" / "progress.json").is_file()


def test_qat_train_entry_seed_recipe_defaults(tmp_path):
    """Without --lr the entry uses the seed recipe (float lr / 2); it can start from
    calibrated ranges and freeze BatchNorm after N steps; an unknown model exits 2."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "utils" / "qat_train.py"), "--model", "fmnist_mobilenetv2",
           "--epochs", "1", "--train-limit", "256", "--test-limit", "200",
           "--calib-images", "128", "--freeze-bn-after", "2", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    progress = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())
    info = json.loads((root / "examples" / "models" / "fmnist_mobilenetv2.json").read_text())
    assert progress["config"]["lr"] == info["lr"] / 2
    assert progress["bn_frozen_at"] == 2
    res = json.loads((tmp_path / "rank0" / "result.json").read_text())
    assert res["steps"] == 4 and res["accuracy"] > 60   # started from a calibrated float model
    bad = subprocess.run(cmd[:3] + ["nosuchmodel", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown model" in bad.stderr
