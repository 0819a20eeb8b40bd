"""Mixed precision under a budget: the allocation is the best one that fits (checked against
brute force), the sensitivities are what quantizing one layer does to the output, and the
command line writes a policy that loads and gives the model it reports."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from quant_ops.cli import mixed_precision
from quant_ops.errors import QuantOpsError
from quant_ops.model import QuantizedModel
from quant_ops.policy import QuantPolicy
from quant_ops.ptq.mixed import allocate

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "models" / "fmnist_resnet20"


def _brute(sizes, errors, widths, budget):
    best, arg = np.inf, None
    for c in itertools.product(range(len(widths)), repeat=len(sizes)):
        bits = sum(s * widths[j] for s, j in zip(sizes, c)) / sizes.sum()
        e = sum(errors[i, j] for i, j in enumerate(c))
        if bits <= budget + 1e-9 and e < best:
            best, arg = e, c
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_allocation_fits_the_budget_and_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    widths = [2, 3, 4, 8]
    sizes = rng.integers(10, 500, 6).astype(float)
    base = rng.uniform(0.1, 10, 6)[:, None]
    errors = base * np.array([2.0 ** (-2 * w) for w in widths])[None] * 1e3
    for budget in (2.5, 3.0, 4.0, 5.5):
        choice = allocate(sizes, errors, widths, budget)
        bits = float((sizes * np.array(widths)[choice]).sum() / sizes.sum())
        assert bits <= budget + 1e-9
        best, _ = _brute(sizes, errors, widths, budget)
        got = errors[np.arange(len(sizes)), choice].sum()
        assert got <= best + 1e-9, (budget, got, best)


@pytest.mark.parametrize("seed", range(3))
def test_allocation_is_exact_on_layers_of_real_size(seed):
    """Conv-sized layers (a ResNet-20's 200,000 weights): a budget equal to the narrowest
    or to a uniform width can always be met exactly, and the answer is still the optimum."""
    rng = np.random.default_rng(seed)
    widths = [2, 3, 4, 6, 8]
    sizes = np.array([9 * 3 * 16, 9 * 16 * 16, 9 * 32 * 64, 9 * 64 * 64, 9 * 128 * 128,
                      64 * 10])
    errors = rng.uniform(0.1, 10, 6)[:, None] * np.array([4.0 ** -w for w in widths])[None]
    for budget in (2.0, 3.0, 4.0, 4.5, 6.0, 8.0):
        choice = allocate(sizes, errors, widths, budget)
        bits = float((sizes * np.array(widths)[choice]).sum() / sizes.sum())
        assert bits <= budget + 1e-9
        best, _ = _brute(sizes.astype(float), errors, widths, budget)
        assert errors[np.arange(6), choice].sum() <= best + 1e-12, budget
    assert (allocate(sizes, errors, widths, 2.0) == 0).all()
    # more units than the resolution: coarser units, still within budget, narrowest fits
    choice = allocate(sizes, errors, widths, 4.0, resolution=50)
    assert float((sizes * np.array(widths)[choice]).sum() / sizes.sum()) <= 4.0
    assert (allocate(sizes, errors, widths, 2.0, resolution=50) == 0).all()


def test_allocation_refuses_a_budget_below_the_narrowest_width():
    with pytest.raises(QuantOpsError, match="below the narrowest width"):
        allocate(np.ones(2), np.ones((2, 2)), [2, 4], 1.5)


def _fmnist_calib(n=64):
    from quant_ops.datasets import FASHION_MNIST_DIR, fashion_mnist

    if not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    info = json.loads(Path(f"{BUNDLED}.json").read_text())["normalize"]
    x, y = fashion_mnist("test")
    return ((x[:n] - info["mean"]) / info["std"]).astype(np.float32), y[:n]


def test_model_mixed_precision_gives_a_policy_within_budget():
    x, _ = _fmnist_calib()
    m = QuantizedModel.load(BUNDLED)
    pol = m.mixed_precision(x, 3.5, widths=(2, 4, 8), progress=False)
    rep = m.reports["mixed_precision"]
    assert rep["average_bits"] <= 3.5 + 1e-9 and len(rep["layers"]) == 22
    assert {r["bits"] for r in rep["layers"]} <= {2, 4, 8}
    # errors fall with width for every layer (8-bit weights barely move the output)
    assert all(r["errors"]["2"] > r["errors"]["8"] for r in rep["layers"])
    q = m.copy().quantize(QuantPolicy.from_dict(pol), fold_bn="deploy")
    got = {w.name: int(w.attrs["nbits"]) for w in q.quantizers if w.is_weight}
    assert sorted(got.values()) == sorted(r["bits"] for r in rep["layers"])
    with pytest.raises(QuantOpsError, match="before quantize"):
        q.mixed_precision(x, 4)


def test_cli_writes_policy_model_and_report(tmp_path):
    x, y = _fmnist_calib(128)
    np.savez(tmp_path / "calib.npz", x=x[:64], y=y[:64])
    np.savez(tmp_path / "test.npz", x=x, y=y)
    out = tmp_path / "out"
    assert mixed_precision.main(["--model", "fmnist_resnet20", "--budget", "4", "--widths",
                                 "2,4,8", "--calib", str(tmp_path / "calib.npz"), "--test",
                                 str(tmp_path / "test.npz"), "--no-progress",
                                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["fmnist_resnet20-quant-symbol.json", "fmnist_resnet20-quant-0000.params",
         "policy.yaml", "report.json", "report.md"])
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["accuracy"]) >= {"float", "mixed", "uniform_w4"}
    pol = QuantPolicy.from_dict(yaml.safe_load((out / "policy.yaml").read_text()))
    assert len(pol.overrides) == 22
    m = QuantizedModel.load(out / "fmnist_resnet20-quant")
    assert m.evaluate(x, y) == pytest.approx(rep["accuracy"]["mixed"])


def test_cli_bad_budget_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert mixed_precision.main(["--model", "fmnist_resnet20", "--budget", "1", "--calib",
                                 "fmnist", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget must be between" in err[0] and not out.exists()
