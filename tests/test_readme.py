"""Every snippet of README.md runs as written, so the README cannot drift from the code.

Python blocks run in a fresh interpreter; YAML blocks are policies applied to the model the
README names; shell blocks run command by command (``.venv/bin/python`` is this
interpreter, placeholder inputs are made first, ``out/`` goes to a temporary folder).  A
block that is too long for the suite is listed in ``NOT_HERE`` with the test that covers
it; a new block that is neither run nor listed fails ``test_every_block_is_covered``.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MXNET_SUBGRAPH_VERBOSE": "0"}

#: a command (its first words) -> where it is exercised instead, and why not here
NOT_HERE = {
    "bash scripts/demo.sh": "the main job, minutes: test_readme.py::test_main_job (slow)",
    "bash scripts/test.sh": "the suite itself (CI runs it)",
    ".venv/bin/python -m quant_ops.cli.launch": "hours of training: test_distributed.py",
    ".venv/bin/pip install torch": "an optional peer for bench_ops.py",
    "OMP_NUM_THREADS=2 .venv/bin/python bench/bench_ops.py": "minutes: test_bench_smoke.py",
    ".venv/bin/python utils/qat_train.py": "an epoch of training each: test_train.py's "
                                           "test_qat_train_* run the same entry on subsets",
}


def blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of README.md."""
    return re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(),
                      flags=re.S | re.M)


def commands(text: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments dropped."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.startswith("#") else ""
        if line:
            out.append(line)
    return out


def _exempt(cmd: str) -> bool:
    return any(cmd.startswith(k) for k in NOT_HERE)


def _python_blocks():
    return [t for lang, t in blocks() if lang == "python"]


def _shell_commands():
    return [c for lang, t in blocks() if lang == "bash" for c in commands(t) if not _exempt(c)]


def test_every_block_is_covered():
    langs = {lang for lang, _ in blocks()}
    assert langs <= {"python", "bash", "yaml"}, langs
    for lang, text in blocks():
        if lang == "bash":
            for c in commands(text):
                assert _exempt(c) or c.startswith(".venv/bin/python utils/"), c


@pytest.mark.parametrize("code", _python_blocks(), ids=lambda c: c.splitlines()[0][:40])
def test_python_block(code, tmp_path):
    code = code.replace('"out/', f'"{tmp_path}/out/')
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if "INT8 top-1" in code:   # the API section: the whole flow, as promised
        assert len([ln for ln in code.splitlines() if ln.strip()]) < 15
        assert float(r.stdout.split("INT8 top-1:")[1].split("%")[0]) > 93.0   # float 93.50
        assert (tmp_path / "out" / "api" / "deploy" / "resnet20-int8.onnx").is_file()
        assert (tmp_path / "out" / "api" / "resnet20-int8-symbol.json").is_file()


def test_yaml_policy_applies_to_the_model_it_names():
    from quant_ops import QuantizedModel, QuantPolicy

    (text,) = [t for lang, t in blocks() if lang == "yaml"]
    policy = QuantPolicy.from_dict(yaml.safe_load(text), "README.md")
    m = QuantizedModel.from_zoo("resnet18_v1", (1, 3, 32, 32)).quantize(policy)
    table = {(r["node"], r["input"]): r for r in m.table}
    assert table[("resnetv10_stage4_conv0_fwd", "weight")]["bits"] == 6
    assert ("resnetv10_conv0_fwd", "data") not in table
    assert not any(n.endswith("_dense0_fwd") for n, _ in table)


def _placeholders(cwd: Path) -> None:
    """The inputs the shell snippets name: a float model, a policy, a QAT output."""
    import mxnet as mx

    from quant_ops import QuantizedModel
    from quant_ops.datasets import fashion_mnist
    from quant_ops.zoo import get_model

    (cwd / "examples").symlink_to(ROOT / "examples")   # paths as from the checkout's root
    mx.random.seed(0)
    net = get_model("resnet18_v1")
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 224, 224)))
    net.export(str(cwd / "model"), epoch=0)
    (yaml_text,) = [t for lang, t in blocks() if lang == "yaml"]
    (cwd / "my_policy.yaml").write_text(yaml_text)
    x = (fashion_mnist("test")[0][:64] - 0.286) / 0.353
    m = QuantizedModel.load(ROOT / "examples" / "models" / "fmnist_resnet20")
    m.quantize("trt_int8", fold_bn="deploy").calibrate(x, "minmax", progress=False)
    (cwd / "out" / "qat_fashion_mnist").mkdir(parents=True)
    m.save(cwd / "out" / "qat_fashion_mnist" / "qat_int8")
    cpu = QuantizedModel.load(ROOT / "examples" / "models" / "fmnist_resnet20")
    cpu.quantize("cpu_int8", fold_bn="deploy").calibrate(x, "minmax", progress=False)
    (cwd / "out" / "cpu").mkdir()
    cpu.save(cwd / "out" / "cpu" / "fmnist_resnet20-quant")


@pytest.mark.parametrize("cmd", _shell_commands(), ids=lambda c: " ".join(c.split()[:2]))
def test_shell_command(cmd, tmp_path):
    _placeholders(tmp_path)
    argv = shlex.split(cmd)
    assert argv[0] == ".venv/bin/python"
    argv = [sys.executable, str(ROOT / argv[1])] + argv[2:]
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [a for a in argv if a.startswith("out/")]
    assert out and (tmp_path / out[-1]).is_dir() and any((tmp_path / out[-1]).iterdir())


@pytest.mark.slow
def test_main_job(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "qat_fashion_mnist.py"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       env=ENV, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "o" / "report.md").is_file()
