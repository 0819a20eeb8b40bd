"""Checkpoints: whole or absent, no pickle, every part from one save, exact resume."""
from __future__ import annotations

import json
import os
import pickle

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from quant_ops import QuantOpsError
from quant_ops.prepare import quantize_block
from quant_ops.train import FitConfig, fit
from quant_ops.train import checkpoint


def _net():
    mx.random.seed(0)
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Conv2D(4, 3, activation="relu"), gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 8, 8)))
    return quantize_block(net, "trt_int8")


def _data():
    rng = np.random.default_rng(0)
    return rng.uniform(size=(64, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 64)


def _cfg(tmp_path, **kw):
    return FitConfig(**{"epochs": 2, "lr": 0.05, "batch_size": 16, "progress": False,
                        "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 2, **kw})


def _values(net):
    return {k: p.data().asnumpy() for k, p in net.collect_params().items()}


def test_resume_is_exact_and_holds_no_pickle(tmp_path):
    x, y = _data()
    ref = _net()
    fit(ref, (x, y), None, _cfg(tmp_path / "ref"))
    net = _net()
    fit(net, (x, y), None, _cfg(tmp_path, stop_after_steps=3))
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["net.params", "optimizer.npz",
                                                     "progress.json"]
    with np.load(ck / "optimizer.npz", allow_pickle=False) as z:   # arrays only
        assert z.files and all(z[k].dtype == np.float32 for k in z.files)
    resumed = _net()
    progress = fit(resumed, (x, y), None, _cfg(tmp_path))
    assert progress["step"] == 8
    for k, v in _values(ref).items():
        np.testing.assert_array_equal(_values(resumed)[k], v, err_msg=k)


def test_a_part_from_another_save_is_refused(tmp_path):
    x, y = _data()
    fit(_net(), (x, y), None, _cfg(tmp_path, stop_after_steps=2))
    ck = tmp_path / "ck"
    other = tmp_path / "other"
    fit(_net(), (x, y), None, _cfg(other, stop_after_steps=4))
    (ck / "optimizer.npz").write_bytes((other / "ck" / "optimizer.npz").read_bytes())
    with pytest.raises(QuantOpsError, match="optimizer.npz: does not belong to the "
                                            "checkpoint of step 2"):
        fit(_net(), (x, y), None, _cfg(tmp_path))


def test_a_planted_pickle_is_never_loaded(tmp_path):
    x, y = _data()
    fit(_net(), (x, y), None, _cfg(tmp_path, stop_after_steps=2))
    ck = tmp_path / "ck"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ck / "optimizer.npz").write_bytes(pickle.dumps(Evil()))
    (ck / "trainer.states").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(QuantOpsError, match="optimizer.npz"):
        fit(_net(), (x, y), None, _cfg(tmp_path))
    assert not marker.exists()


def test_a_save_killed_between_renames_resumes_from_the_previous(tmp_path):
    x, y = _data()
    fit(_net(), (x, y), None, _cfg(tmp_path, stop_after_steps=2))
    ck = tmp_path / "ck"
    os.rename(ck, tmp_path / ".ck.old")      # as if killed after the first rename
    progress = fit(_net(), (x, y), None, _cfg(tmp_path, stop_after_steps=1))
    assert progress["step"] == 3
    assert json.loads((ck / "progress.json").read_text())["step"] == 3


def test_a_broken_record_is_refused(tmp_path):
    x, y = _data()
    fit(_net(), (x, y), None, _cfg(tmp_path, stop_after_steps=2))
    (tmp_path / "ck" / "progress.json").write_text("{not json")
    with pytest.raises(QuantOpsError, match="progress.json: not a readable checkpoint"):
        fit(_net(), (x, y), None, _cfg(tmp_path))
    assert checkpoint.PARTS == ("net.params", "optimizer.npz")


def test_a_spliced_params_file_with_a_matching_record_is_refused_not_crashed(tmp_path):
    """The digests guard against mixed saves, not against a planted record: the params
    file itself is read by the bounds-checked reader before MXNet's loader sees it."""
    x, y = _data()
    fit(_net(), (x, y), None, _cfg(tmp_path, stop_after_steps=2))
    ck = tmp_path / "ck"
    data = bytearray((ck / "net.params").read_bytes())
    data[36:44] = (2 ** 40).to_bytes(8, "little")     # the first array's first dimension
    (ck / "net.params").write_bytes(bytes(data))
    record = json.loads((ck / "progress.json").read_text())
    record["parts"]["net.params"] = checkpoint._digest(ck / "net.params")
    (ck / "progress.json").write_text(json.dumps(record))
    with pytest.raises(QuantOpsError, match="net.params: not an MXNet params file"):
        fit(_net(), (x, y), None, _cfg(tmp_path))
