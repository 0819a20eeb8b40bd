"""The bounds-checked ``.params`` reader: the same arrays as ``mx.nd.load`` on good files,
a QuantOpsError naming the file (never a crash) on any damaged one."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from quant_ops.errors import QuantOpsError
from quant_ops.graph.params import load_params
from quant_ops.graph.params_file import read_params_file

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted((ROOT / "examples" / "models").glob("*.params"))


def _same(a, b) -> None:
    assert type(a) is type(b)
    items = a.items() if isinstance(a, dict) else enumerate(a)
    assert len(a) == len(b)
    for k, v in items:
        want = b[k].asnumpy()
        assert v.dtype == want.dtype and v.shape == want.shape and np.array_equal(v, want), k


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_params_read_as_mxnet_reads_them(path):
    _same(read_params_file(path), mx.nd.load(str(path)))


def test_every_dtype_rank_and_unnamed_lists(tmp_path):
    named = {f"a{i}": mx.nd.array(np.arange(np.prod(s)).reshape(s), dtype=dt)
             for i, (s, dt) in enumerate([((2, 3), "float32"), ((4,), "float16"),
                                          ((1, 2, 1, 2, 1), "float64"), ((3,), "int32"),
                                          ((2, 2), "int8"), ((5,), "uint8"), ((2,), "int64")])}
    mx.nd.save(str(tmp_path / "named.params"), named)
    _same(read_params_file(tmp_path / "named.params"), mx.nd.load(str(tmp_path / "named.params")))
    mx.nd.save(str(tmp_path / "list.params"), list(named.values()))
    _same(read_params_file(tmp_path / "list.params"), mx.nd.load(str(tmp_path / "list.params")))
    net = mx.gluon.nn.Dense(3, in_units=2)
    net.initialize()
    net.save_parameters(str(tmp_path / "gluon.params"))
    _same(read_params_file(tmp_path / "gluon.params"), mx.nd.load(str(tmp_path / "gluon.params")))


def _small(tmp_path) -> bytes:
    mx.nd.save(str(tmp_path / "s.params"), {"arg:w": mx.nd.array(np.ones((2, 3))),
                                              "aux:m": mx.nd.array([1.0, 2.0])})
    return (tmp_path / "s.params").read_bytes()


def test_every_truncation_is_an_error_naming_the_file(tmp_path):
    good = _small(tmp_path)
    bad = tmp_path / "cut.params"
    for n in range(len(good)):
        bad.write_bytes(good[:n])
        with pytest.raises(QuantOpsError, match=r"cut.params: not an MXNet params"):
            read_params_file(bad)


@pytest.mark.parametrize("offset, value, needle", [
    (16, 2 ** 60, "array count"),             # more arrays than bytes
    (32, 40, "rank 40"),                      # rank beyond any tensor
    (36, 2 ** 40, "data of shape"),           # a dimension that would read past the end
    (36, -3, "negative dimension"),
    (28, 1, "sparse storage"),                # storage type
])
def test_spliced_sizes_are_refused_before_any_read(tmp_path, offset, value, needle):
    data = bytearray(_small(tmp_path))
    fmt = "<q" if offset in (16, 36) else "<i"
    struct.pack_into(fmt, data, offset, value)
    f = tmp_path / "spliced.params"
    f.write_bytes(bytes(data))
    with pytest.raises(QuantOpsError, match=needle):
        read_params_file(f)
    with pytest.raises(QuantOpsError, match="spliced.params"):
        load_params(f)


def test_trailing_bytes_and_unknown_dtype_are_refused(tmp_path):
    good = _small(tmp_path)
    (tmp_path / "t.params").write_bytes(good + b"\0")
    with pytest.raises(QuantOpsError, match="1 bytes after the end"):
        read_params_file(tmp_path / "t.params")
    data = bytearray(good)
    struct.pack_into("<i", data, 60, 12)     # the first array's dtype flag: bfloat16
    (tmp_path / "b.params").write_bytes(bytes(data))
    with pytest.raises(QuantOpsError, match="dtype flag 12"):
        read_params_file(tmp_path / "b.params")


def test_random_damage_never_escapes_as_another_error(tmp_path):
    good = _small(tmp_path)
    rng = random.Random(0)
    f = tmp_path / "r.params"
    for _ in range(500):
        b = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        f.write_bytes(bytes(b))
        try:
            read_params_file(f)
        except QuantOpsError:
            pass


def test_a_parameter_saved_both_as_arg_and_aux_is_refused_by_name(tmp_path):
    """Module files prefix names with arg:/aux:; one name under both is ambiguous (one
    copy would silently win)."""
    path = tmp_path / "dup-0000.params"
    mx.nd.save(str(path), {"arg:c1_weight": mx.nd.ones((2, 2)),
                           "aux:c1_weight": mx.nd.zeros((2, 2))})
    with pytest.raises(QuantOpsError, match=r"parameter 'c1_weight' is in the file twice "
                                            r"\('arg:c1_weight' and 'aux:c1_weight'\)"):
        load_params(path)
