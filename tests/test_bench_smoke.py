"""Smoke tests of the benches (bench_ops.py, ptq_table.py): they run end to end and write
well-formed JSON.

No timing thresholds: timings on a shared CI machine are not a test of correctness.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"act_infer_fwd", "act_train_fwd", "act_train_fwdbwd", "w_pt_fwd", "w_pc_fwd",
         "w_pt_fwdbwd", "w_pc_fwdbwd"}
ALWAYS = ("quant_ops", "quant_ops_prealloc", "copy_floor", "alloc_copy", "composed_nd")


def test_bench_quick_run_writes_json(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_ops.py"), "--quick", "--repeats", "2",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quant_ops" in proc.stdout and "copy floor" in proc.stdout
    assert "summary: ratios under each engine" in proc.stdout

    data = json.loads(out.read_text())
    assert {"machine", "config", "notes", "verification", "rows"} <= set(data)
    assert data["config"]["quick"] is True
    assert data["machine"]["cpu_count"] >= 1
    for key in ("mxnet", "numpy", "torch"):
        assert key in data["machine"]
    rows = {r["case"]: r for r in data["rows"]}
    assert set(rows) == CASES

    has_torch = data["machine"]["torch"] is not None
    for name, row in rows.items():
        ms = row["ms"]
        for col in ALWAYS + (("torch",) if has_torch else ()):
            assert isinstance(ms[col], float) and ms[col] > 0, (name, col, ms[col])
        if not has_torch:
            assert ms["torch"] is None
        for key in ("quant_ops/copy", "composed/quant_ops"):
            assert row["ratios"][key] > 0, (name, key)
        assert row["timings"]["quant_ops"]["samples_ms"]
    if not has_torch:
        assert any("torch" in n for n in data["notes"])

    # --engine both (the default): this process ran the synchronous engine, a child process
    # the threaded one, and the child's rows are kept beside
    assert data["machine"]["mxnet_engine"] == "NaiveEngine"
    threaded = data["threaded_engine"]
    assert threaded["machine"]["mxnet_engine"] == "ThreadedEnginePerDevice"
    assert {r["case"] for r in threaded["rows"]} == CASES
    assert all(r["ratios"]["quant_ops/copy"] > 0 for r in threaded["rows"])

    # the fused operator and the composed nd version both equal the reference exactly
    assert set(data["verification"]) == {"act_infer_fwd", "act_train_fwd", "w_pt_fwd",
                                         "w_pc_fwd"}
    for name, v in data["verification"].items():
        assert v["quant_ops"]["equal_fraction"] == 1.0, name
        assert v["composed_nd"]["equal_fraction"] == 1.0, name
        assert v["quant_ops_grad_is_dy"], name


def test_ptq_table_runs_every_peer(tmp_path):
    """bench/ptq_table.py end to end on a small slice: quant_ops, MXNet's quantize_net_v2 and
    onnxruntime's quantize_static all produce an accuracy (none fails), and the section is
    written into an existing results file without touching its other sections."""
    out, js = tmp_path / "results.md", tmp_path / "ptq.json"
    out.write_text("# Results\n\n## QAT on Fashion-MNIST\n\nkept\n")
    cmd = [sys.executable, str(ROOT / "bench" / "ptq_table.py"), "--models", "resnet20",
           "--extras", "dfq", "--calib-images", "64", "--test-images", "300",
           "--out", str(out), "--json", str(js)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    rows = json.loads(js.read_text())["results"][0]["rows"]
    tools = {r["tool"] for r in rows}
    assert tools == {"quant_ops", "mxnet quantize_net_v2", "onnxruntime quantize_static"}
    assert all(r["accuracy"] is not None and 50 < r["accuracy"] <= 100 for r in rows), rows
    text = out.read_text()
    assert "## QAT on Fashion-MNIST\n\nkept" in text and "## PTQ on Fashion-MNIST" in text
