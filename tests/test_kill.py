"""Commands killed at random points leave their output whole or absent, and a killed
training resumes to the model an uninterrupted run ends with."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = ROOT / "examples" / "models" / "fmnist_resnet20"
GO_FILES = {"fmnist_resnet20-quant-symbol.json", "fmnist_resnet20-quant-0000.params",
            "summary.md", "summary.json"}
EXPORT_FILES = {"m.onnx", "m.calib.cache", "m.ranges.json", "m.alignment.json"}


def _kill_after(cmd: list, delay: float, sig: int) -> int:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={"MXNET_SUBGRAPH_VERBOSE": "0", "PATH": "/usr/bin:/bin"})
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(sig)
    p.communicate(timeout=120)
    print(cmd[1].rsplit("/", 1)[-1], f"delay {delay:.2f}s -> exit {p.returncode}")
    return p.returncode


def _whole_or_absent(out: Path, files: set, rc: int, sig: int) -> None:
    visible = {f.name for f in out.iterdir() if not f.name.startswith(".")} if out.exists() \
        else set()
    if rc == 0:
        assert files <= visible, visible
        return
    assert rc in (128 + sig, -sig), rc
    # killed after its last rename the output is whole; before it, nothing is there
    assert not visible or files <= visible, f"a killed run left {sorted(visible)}"
    if sig == signal.SIGTERM:       # unwound: no staging folder left anywhere
        assert not list(out.parent.glob(f".{out.name}.staged-*"))
        assert not out.exists() or files <= visible


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_graph_optimize_killed_at_random_points(sig, tmp_path):
    rng = np.random.default_rng(int(sig))
    cmd = [sys.executable, str(ROOT / "utils" / "graph_optimize.py"),
           "--symbol", f"{PREFIX}-symbol.json", "--params", f"{PREFIX}-0000.params",
           "--input-shape", "1,1,28,28", "--calib", "fmnist", "--calib-images", "64",
           "--mean", "0.286", "--std", "0.353", "--no-draw", "--no-progress"]
    before = Path(f"{PREFIX}-0000.params").read_bytes()
    codes = []
    for i, delay in enumerate(sorted(rng.uniform(0.3, 6.0, 4))):
        out = tmp_path / f"o{i}"
        codes.append(_kill_after(cmd + ["--out", str(out)], delay, sig))
        _whole_or_absent(out, GO_FILES, codes[-1], sig)
    assert any(c != 0 for c in codes), codes      # some kills landed mid-run
    assert Path(f"{PREFIX}-0000.params").read_bytes() == before
    _run_again_after_kills(cmd, tmp_path, "o", codes, GO_FILES)


def _run_again_after_kills(cmd: list, tmp_path: Path, stem: str, codes: list,
                           files: set) -> None:
    """Each killed run, run again into the same --out, ends whole and equal to the first
    uninterrupted run (what a killed run left cannot change what the next one writes)."""
    env = {"MXNET_SUBGRAPH_VERBOSE": "0", "PATH": "/usr/bin:/bin"}
    ref = tmp_path / f"{stem}_whole"
    subprocess.run(cmd + ["--out", str(ref)], check=True, env=env, capture_output=True)
    for i, rc in enumerate(codes):
        if rc == 0:
            continue
        out = tmp_path / f"{stem}{i}"
        r = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        for f in files:
            if f.endswith((".params", ".onnx", ".cache")):
                assert (out / f).read_bytes() == (ref / f).read_bytes(), f


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_export_killed_at_random_points(sig, tmp_path):
    from quant_ops import QuantizedModel
    from quant_ops.datasets import fashion_mnist

    x = (fashion_mnist("test")[0][:64] - 0.286) / 0.353
    m = QuantizedModel.load(PREFIX).quantize("trt_int8", fold_bn="deploy")
    m.calibrate(x, "minmax", progress=False).save(tmp_path / "q")
    cmd = [sys.executable, str(ROOT / "utils" / "export_onnx.py"), "--symbol",
           str(tmp_path / "q-symbol.json"), "--params", str(tmp_path / "q-0000.params"),
           "--input-shape", "1,1,28,28", "--name", "m"]
    rng = np.random.default_rng(10 + int(sig))
    codes = []
    for i, delay in enumerate(sorted(rng.uniform(0.3, 5.0, 3))):
        out = tmp_path / f"e{i}"
        codes.append(_kill_after(cmd + ["--out", str(out)], delay, sig))
        _whole_or_absent(out, EXPORT_FILES, codes[-1], sig)
    assert any(c != 0 for c in codes), codes
    _run_again_after_kills(cmd, tmp_path, "e", codes, EXPORT_FILES)


def _worker(out: Path, *extra) -> list:
    return [sys.executable, str(ROOT / "tests" / "qat_worker.py"), "--model", "tiny",
            "--epochs", "2", "--train-limit", "512", "--test-limit", "200", "--lr", "0.05",
            "--batch-size", "64", "--calib-images", "0", "--checkpoint-every", "3",
            "--no-progress", "--out", str(out), *extra]


def _same_final_model(a_dir: Path, b_dir: Path) -> None:
    a = mx.nd.load(str(a_dir / "rank0" / "final-0000.params"))
    b = mx.nd.load(str(b_dir / "rank0" / "final-0000.params"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k].asnumpy(), a[k].asnumpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=k)


def _training(cmd: list, out: Path, sig: int | None = None, at: float = 0.0) -> tuple:
    """Run ``cmd``; with ``sig``, send it ``at`` seconds after training began (the run
    record ``checkpoint.json`` appears just before the first step).  (exit code, seconds
    from the start of training to the end)."""
    env = {"MXNET_SUBGRAPH_VERBOSE": "0", "PATH": "/usr/bin:/bin"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env)
    while p.poll() is None and not (out / "checkpoint.json").exists():
        time.sleep(0.01)
    t0 = time.time()
    if sig is not None:
        try:
            p.wait(timeout=at)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
    err = p.communicate(timeout=300)[1]
    if sig is None:
        assert p.returncode == 0, err
    return p.returncode, time.time() - t0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_training_killed_at_random_times_resumes_to_the_uninterrupted_model(sig, tmp_path):
    """Signals at random times of the training (a checkpoint every step, so some land
    inside a save), then the same command again: it resumes and ends with the
    uninterrupted run's model; SIGTERM leaves no staging or half-removed folder."""
    more = ("--checkpoint-every", "1")
    _, took = _training(_worker(tmp_path / "whole", *more), tmp_path / "whole")
    rng = np.random.default_rng(20 + int(sig))
    codes = []
    for i, at in enumerate(sorted(rng.uniform(0.05, 0.9, 3) * took)):
        out = tmp_path / f"k{i}"
        rc, _ = _training(_worker(out, *more), out, sig, at)
        print(f"qat_worker signal {sig} at {at:.2f}s of {took:.2f}s -> exit {rc}")
        codes.append(rc)
        assert rc in (0, 128 + sig, -sig), rc
        if sig == signal.SIGTERM and rc == 128 + sig:   # unwound by the handler
            left = [p.name for p in out.rglob(".*")]
            assert not left, left
        if (out / "rank0").exists():    # killed after its output was whole (exiting)
            assert {"result.json", "final-0000.params", "final-symbol.json"} <= \
                {f.name for f in (out / "rank0").iterdir()}
        else:
            _training(_worker(out, *more), out)
        _same_final_model(tmp_path / "whole", out)
    assert any(c != 0 for c in codes), codes


def test_killed_training_resumes_to_the_uninterrupted_model(tmp_path):
    env = {"MXNET_SUBGRAPH_VERBOSE": "0", "PATH": "/usr/bin:/bin"}
    whole = subprocess.run(_worker(tmp_path / "whole"), capture_output=True, text=True,
                           env=env, timeout=300)
    assert whole.returncode == 0, whole.stderr
    for step in (5, 11):                 # mid-epoch, and just after the epoch boundary (8)
        out = tmp_path / f"k{step}"
        r = subprocess.run(_worker(out, "--fail-at-step", str(step), "--fail-rank", "0"),
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == -signal.SIGKILL and not (out / "rank0").exists()
        r = subprocess.run(_worker(out), capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        a = mx.nd.load(str(tmp_path / "whole" / "rank0" / "final-0000.params"))
        b = mx.nd.load(str(out / "rank0" / "final-0000.params"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k].asnumpy(), a[k].asnumpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=k)
        res = json.loads((out / "rank0" / "result.json").read_text())
        assert res["steps"] == 16
