"""Bad input, table-driven, through the three doors of the toolkit, each row asserting the
exact outcome the README promises:

* operators: ``OperatorError`` (a ``QuantOpsError``) naming the input or attribute, raised
  before memory is touched (wrong size, rank, dtype, attribute);
* Python API: ``QuantOpsError`` whose message names the culprit (file, node, key, input), and
  nothing written by the failed call;
* command lines (called in-process): exit code 2, one ``error:`` line on stderr naming the
  culprit, nothing under ``--out``, every input byte for byte unchanged (argparse's own usage
  errors: ``SystemExit(2)`` with its ``error:`` line).

A row marked ``xfail(strict=True, reason="BUG: ...")`` asserts the correct behaviour that the
code does not have yet.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import quant_ops
from quant_ops import QuantizedModel, methods
from quant_ops.cli import (dfq, easyquant, export_onnx, graph_optimize, launch, qat_train,
                           sensitivity)
from quant_ops.datasets import fashion_mnist, load_data
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import load_graph
from quant_ops.graph.params import load_params
from quant_ops.methods.base import MODE_INPUT
from quant_ops.ops import OperatorError
from quant_ops.policy import QuantPolicy
from quant_ops.prepare import quantize_block
from quant_ops.train import FitConfig, fit

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "models"
SHAPE = (1, 1, 8, 8)
f32 = np.float32


def bug(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"BUG: {reason}")


# == the inputs: one tiny model (conv-BN-relu-pool-FC on 1x8x8) and files derived from it ===

def _float_net():
    data = mx.sym.var("data")
    c1 = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c1")
    b1 = mx.sym.BatchNorm(c1, fix_gamma=False, name="bn1")
    r1 = mx.sym.Activation(b1, act_type="relu", name="r1")
    p = mx.sym.Pooling(r1, kernel=(2, 2), stride=(2, 2), pool_type="max", name="p")
    fc = mx.sym.FullyConnected(p, num_hidden=3, name="fc")
    rng = np.random.default_rng(0)
    shapes, _, aux_shapes = fc.infer_shape(data=(2, 1, 8, 8))
    params = {n: rng.normal(0, 0.3, s).astype(f32)
              for n, s in zip(fc.list_arguments(), shapes) if n != "data"}
    params.update({n: (np.abs(rng.normal(1, 0.2, s)) if "var" in n else rng.normal(0, 0.1, s))
                   .astype(f32) for n, s in zip(fc.list_auxiliary_states(), aux_shapes)})
    return fc, params


def _save_params(path: Path, params: dict, aux=("bn1_moving_mean", "bn1_moving_var")) -> None:
    mx.nd.save(str(path), {f"{'aux' if k in aux else 'arg'}:{k}": mx.nd.array(v, dtype=v.dtype)
                           for k, v in params.items()})


def _symbol_variants(sym: dict) -> dict:
    """name -> a broken copy of the symbol JSON (a dict, or raw text)."""
    n = len(sym["nodes"])
    idx = {x["name"]: i for i, x in enumerate(sym["nodes"])}

    def edit(fn):
        d = json.loads(json.dumps(sym))
        fn(d, d["nodes"])
        return d

    def attrs(name, **kw):
        return lambda d, nodes: nodes[idx[name]].setdefault("attrs", {}).update(kw)

    return {
        "malformed": '{"nodes": [',
        "notdict": json.dumps([sym]),
        "head3": edit(lambda d, _: d.__setitem__("heads", [[n - 1, 3, 0]])),
        "headneg": edit(lambda d, _: d.__setitem__("heads", [[n - 1, -5]])),
        "headpast": edit(lambda d, _: d.__setitem__("heads", [[n + 5, 0, 0]])),
        "noheads": edit(lambda d, _: d.__setitem__("heads", [])),
        "input3": edit(lambda d, nodes: nodes[idx["fc"]]["inputs"][0].__setitem__(1, 3)),
        "inputneg": edit(lambda d, nodes: nodes[idx["fc"]]["inputs"].__setitem__(0, [0, -5])),
        "inputfwd": edit(lambda d, nodes: nodes[idx["c1_weight"]]["inputs"].append([n - 1, 0])),
        "bnout5": edit(lambda d, nodes: nodes[idx["r1"]]["inputs"][0].__setitem__(1, 5)),
        "noop": edit(lambda d, nodes: nodes[idx["c1"]].pop("op")),
        "attrslist": edit(lambda d, nodes: nodes[idx["c1"]].__setitem__("attrs", [1])),
        "graphattrs": edit(lambda d, _: d.__setitem__("attrs", [1])),
        "unknownop": edit(lambda d, nodes: nodes[idx["r1"]].__setitem__("op", "NoSuchOp")),
        "badkernel": edit(attrs("c1", kernel="(abc)")),
    }


def _seed_symbol() -> dict:
    """A graph for the seed toolkit's MXNet build: its INT8 quantizer with nbits='eight'."""
    var = lambda name: {"op": "null", "name": name, "inputs": []}  # noqa: E731
    nodes = [var("data"), var("q_minmax"),
             {"op": "_contrib_Quantization_int8", "name": "q", "inputs": [[0, 0, 0], [1, 0, 0]],
              "attrs": {"nbits": "eight", "is_weight": "False"}},
             var("fc_weight"), var("fc_bias"),
             {"op": "FullyConnected", "name": "fc", "attrs": {"num_hidden": "3"},
              "inputs": [[2, 0, 0], [3, 0, 0], [4, 0, 0]]}]
    return {"nodes": nodes, "arg_nodes": [0, 1, 3, 4], "heads": [[5, 0, 0]],
            "attrs": {"mxnet_version": ["int", 10901]}}


class Evil:
    """A pickle that, when loaded, creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _ckpt_net():
    mx.random.seed(0)
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Conv2D(4, 3, activation="relu"), gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 8, 8)))
    return quantize_block(net, "trt_int8")


def _ckpt_data():
    rng = np.random.default_rng(0)
    return rng.uniform(size=(32, 1, 8, 8)).astype(f32), rng.integers(0, 3, 32)


def _ckpt_cfg(ckdir: Path) -> FitConfig:
    return FitConfig(epochs=1, lr=0.05, batch_size=16, progress=False,
                     checkpoint_dir=str(ckdir), checkpoint_every=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input file the rows read, written once; rows never write here (checked)."""
    d = tmp_path_factory.mktemp("inputs")
    sym, params = _float_net()
    sym.save(str(d / "net-symbol.json"))
    _save_params(d / "net-0000.params", params)
    sym_json = json.loads((d / "net-symbol.json").read_text())
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (16,) + SHAPE[1:]).astype(f32)
    np.save(d / "calib.npy", x)
    np.save(d / "calib3.npy", np.zeros((4, 3, 8, 8), f32))
    np.save(d / "calib9.npy", np.zeros((4, 1, 9, 9), f32))
    np.save(d / "nan.npy", np.full((4, 1, 8, 8), np.nan, f32))
    np.save(d / "empty.npy", np.zeros((0, 1, 8, 8), f32))
    np.save(d / "rank1.npy", np.zeros(5, f32))
    np.save(d / "u8.npy", np.zeros((2, 1, 8, 8), np.uint8))
    np.save(d / "str.npy", np.array([["a"]]))
    np.save(d / "evil.npy", np.array([Evil(d / "PWNED_npy")], dtype=object), allow_pickle=True)
    (d / "fake.npy").write_text("not numpy")
    (d / "data.csv").write_text("1,2\n")
    (d / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(d / "test.npz", x=x, y=rng.integers(0, 3, 16))
    np.savez(d / "nokeys.npz", a=x)
    np.savez(d / "lblshort.npz", x=x, y=np.zeros(3, np.int64))
    np.savez(d / "lblneg.npz", x=x[:4], y=np.array([0, 1, -1, 2]))
    np.savez(d / "lblfrac.npz", x=x[:4], y=np.array([0, 1, 0.5, 2]))
    np.savez(d / "lbl7.npz", x=x[:4], y=np.array([0, 1, 7, 2]))     # the net has 3 classes
    np.save(d / "nan1.npy", np.where(np.arange(64).reshape(1, 1, 8, 8) == 5, np.nan,
                                     0.5).astype(f32))
    mx.nd.save(str(d / "dupkey-0000.params"),
               {**{f"arg:{k}": mx.nd.array(v) for k, v in params.items()},
                "aux:c1_weight": mx.nd.array(params["c1_weight"] + 1)})
    (d / "imgs_empty").mkdir()
    (d / "imgs_bad").mkdir()
    (d / "imgs_bad" / "broken.png").write_bytes(b"not a png")
    # broken symbols, with the good params beside each
    for name, v in _symbol_variants(sym_json).items():
        (d / f"{name}-symbol.json").write_text(v if isinstance(v, str) else json.dumps(v))
    (d / "binary-symbol.json").write_bytes(b"\x00\xff\xfe")
    (d / "deep-symbol.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "seed-symbol.json").write_text(json.dumps(_seed_symbol()))
    _save_params(d / "seed-0000.params", {"fc_weight": params["fc_weight"],
                                          "fc_bias": params["fc_bias"],
                                          "q_minmax": np.ones(1, f32)}, aux=("q_minmax",))
    # broken params
    variants = {"missing": lambda p: p.pop("fc_bias"),
                "f64": lambda p: p.update(c1_weight=p["c1_weight"].astype(np.float64)),
                "f16": lambda p: p.update(c1_bias=p["c1_bias"].astype(np.float16)),
                "i32": lambda p: p.update(fc_bias=p["fc_bias"].astype(np.int32)),
                "nan": lambda p: p["c1_weight"].__setitem__((0, 0, 0, 0), np.nan),
                "inf": lambda p: p["fc_bias"].__setitem__(0, np.inf),
                "negvar": lambda p: p["bn1_moving_var"].__setitem__(0, -1.0)}
    for name, change in variants.items():
        p = {k: v.copy() for k, v in params.items()}
        change(p)
        _save_params(d / f"{name}-0000.params", p)
    (d / "text.params").write_text("hello")
    raw = (d / "net-0000.params").read_bytes()
    (d / "trunc.params").write_bytes(raw[:len(raw) // 2])
    mx.nd.save(str(d / "list.params"), [mx.nd.zeros(3)])
    # quantized models: not calibrated, calibrated, DoReFa weights (no ONNX form)
    m = QuantizedModel.load(d / "net").quantize("trt_int8")
    m.save(d / "netq")
    m.calibrate(x, "minmax", progress=False)
    m.save(d / "netc")
    QuantizedModel.load(d / "net").quantize({"weight": {"method": "dorefa", "bits": 4}}) \
        .calibrate(x, "minmax", progress=False).save(d / "netd")
    QuantizedModel.load(d / "net").quantize({"weight": {"bits": 3}, "activation": {"bits": 3}}) \
        .calibrate(x, "minmax", progress=False).save(d / "net3")
    shutil.copy(d / "netc-symbol.json", d / "netc_norange-symbol.json")
    nr = {k: mx.nd.array(v[:0] if k == m.quantizers[-1].range_var else v)
          for k, v in m.params.items()}
    aux = set(m.graph.to_symbol().list_auxiliary_states())
    mx.nd.save(str(d / "netc_norange-0000.params"),
               {f"{'aux' if k in aux else 'arg'}:{k}": v for k, v in nr.items()})
    # policy files
    policies = {
        "unknown_key.yaml": "preset: trt_int8\nweights: {bits: 4}\n",
        "unknown_method.yaml": "weight: {method: int9}\n",
        "bits.yaml": "weight: {bits: 17}\n",
        "alpha_inf.yaml": "activation: {method: pact, bits: 4, params: {alpha: .inf}}\n",
        "alpha_nan.yaml": "activation: {method: pact, bits: 4, params: {alpha: .nan}}\n",
        "nomatch.yaml": "overrides:\n  - match: 'resnetv10_*'\n    weight: {bits: 4}\n",
        "skipnomatch.yaml": "skip: {names: ['no_such_layer']}\n",
        "perchan_act.yaml": "activation: {per_channel: true}\n",
        "list.yaml": "- preset: trt_int8\n",
        "malformed.yaml": "weight: [unclosed\n",
        "empty.yaml": "",
        "dupkey.yaml": "weight: {bits: 4}\nweight: {bits: 6}\n",
        "python_tag.yaml": f"!!python/object/apply:os.system ['touch {d / 'PWNED_yaml'}']\n",
        "malformed.json": "{\"weight\": ",
        "policy.txt": "preset: trt_int8\n",
        "bits4.yaml": "weight: {bits: 4}\nactivation: {bits: 4}\n",
    }
    for name, text in policies.items():
        (d / name).write_text(text)
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    # a checkpoint of two steps (fit, then stopped as if killed)
    xc, yc = _ckpt_data()
    cfg = _ckpt_cfg(d / "ckpt")
    cfg.stop_after_steps = 1
    fit(_ckpt_net(), (xc, yc), None, cfg)
    return d


# == the runner's context: paths of the inputs, a case's own folder, snapshots =============

@dataclass
class Ctx:
    d: Path                   #: the shared inputs (never written)
    tmp: Path                 #: this case's folder
    prep: Any = None          #: what the row's ``prep`` returned

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def f(self, name: str) -> str:
        return str(self.d / name)

    def model(self, name: str = "net", params: str | None = None) -> list[str]:
        """``--symbol``/``--params`` of a model among the inputs."""
        return ["--symbol", self.f(f"{name}-symbol.json"),
                "--params", self.f(f"{params or name}-0000.params")]

    def copy_in(self, *names: str) -> Path:
        """Copies of input files in this case's folder ``in/`` (for rows that aim an output
        at an input's own folder, so a bug cannot damage the shared inputs)."""
        dst = self.tmp / "in"
        dst.mkdir(exist_ok=True)
        for n in names:
            src, _, new = n.partition("=")
            shutil.copy(self.d / src, dst / (new or src))
        return dst

    def write_in(self, name: str, text: str) -> Path:
        dst = self.copy_in()
        (dst / name).write_text(text)
        return dst


def _snapshot(*roots: Path) -> dict:
    """Every file (with its SHA-256) and folder under ``roots``."""
    snap = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            snap[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def _watched(ctx: Ctx) -> tuple:
    return ctx.d, ctx.tmp, BUNDLED


def _assert_nothing_written(before: dict, ctx: Ctx) -> None:
    after = _snapshot(*_watched(ctx))
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not added and not changed, f"written: {added}; changed or removed: {changed}"


# == operators ================================================================================

@dataclass
class Op:
    method: methods.Method
    attrs: dict = field(default_factory=dict)
    data: tuple = ("float32", (6,))          # dtype, shape
    change: tuple | None = None              # (input name, array -> array)
    channels: int = 1
    symbolic: bool = False
    #: a Symbol entry given a graph whose data has no shape: "partial" (infer_shape_partial
    #: without it), "simple_bind" (without it), "bind" (with a 0-d array)
    unknown_data: str | None = None
    drop_last: bool = False
    needles: tuple = ()


def _call_op(c: Op):
    m = c.method
    dtype, shape = c.data
    x = np.linspace(-1, 1, int(np.prod(shape))).reshape(shape).astype(dtype)
    vals = {i.name: np.zeros(2, f32) if i.name == MODE_INPUT else np.full(i.size(c.channels),
                                                                          0.5, f32)
            for i in m.inputs}
    if c.change:
        name, fn = c.change
        vals[name] = fn(vals[name])
    if c.symbolic or c.unknown_data:
        y = getattr(mx.sym, m.op)(mx.sym.var("data"), *[mx.sym.var(k) for k in vals],
                                  **c.attrs)
        if c.unknown_data == "partial":
            y.infer_shape_partial()
        elif c.unknown_data == "simple_bind":
            y.simple_bind(mx.cpu(), **{k: v.shape for k, v in vals.items()})
        elif c.unknown_data == "bind":
            aux = set(y.list_auxiliary_states())
            arrays = {"data": mx.nd.array(np.float32(0.5))}
            arrays.update({k: mx.nd.array(v) for k, v in vals.items()})
            y.bind(mx.cpu(), {k: v for k, v in arrays.items() if k not in aux},
                   aux_states={k: v for k, v in arrays.items() if k in aux})
        else:
            y.infer_shape(data=shape)
        return
    args = [mx.nd.array(x, dtype=x.dtype)] + [mx.nd.array(v, dtype=v.dtype)
                                              for v in vals.values()]
    if c.drop_last:
        args = args[:-1]
    getattr(mx.nd, m.op)(*args, **c.attrs).wait_to_read()


def _op_rows() -> list:
    rows = []

    def row(id_, c: Op, marks=()):
        rows.append(pytest.param(c, id=f"op-{c.method.name}-{id_}", marks=marks))

    for m in methods.REGISTRY.values():
        op, (lo, hi) = m.op, m.bits
        for dt in ("float64", "int32"):
            row(f"data-{dt}", Op(m, data=(dt, (6,)),
                                 needles=(f"{op}: input 'data' must be float32, got {dt}",)))
        for nb in (lo - 1, hi + 1):
            row(f"nbits-{nb}", Op(m, {"nbits": nb}, needles=(
                f"{op}: attribute 'nbits' = {nb} is out of range [{lo}, {hi}]",)))
        row("nbits-text", Op(m, {"nbits": "four"},
                             needles=(f"{op}: attribute 'nbits' must be an integer, got 'four'",)))
        row("unknown-attr", Op(m, {"bogus_attr": 1},
                               needles=(f"{op}: unknown attribute 'bogus_attr'",)))
        row("symbol-nbits", Op(m, {"nbits": hi + 5}, symbolic=True, needles=(
            f"{op}: attribute 'nbits' = {hi + 5} is out of range [{lo}, {hi}]",)))
        # MXNet 1.9 overflows a buffer on an external operator's input of unknown rank
        row("data-0d", Op(m, data=("float32", ()),
                          needles=(f"{op}: input 'data' has no dimensions",)))
        for how in ("partial", "simple_bind", "bind"):
            row(f"data-unknown-{how}", Op(m, unknown_data=how, needles=(
                f"{op} '", "the shape of its data is not known")))
        for i in m.inputs:
            n, size = i.name, i.size(1)
            row(f"{n}-0d", Op(m, change=(n, lambda v: v[0]),
                              needles=(f"{op}: input '{n}' has no dimensions",)))
            row(f"{n}-empty", Op(m, change=(n, lambda v: v[:0]),
                                 needles=(f"{op}: input '{n}' is empty",)))
            row(f"{n}-rank2", Op(m, change=(n, lambda v: v.reshape(1, -1)),
                                 needles=(f"{op}: '{n}'", f"got (1,{size})")))
            for dt in ("float64", "int32"):
                row(f"{n}-{dt}", Op(m, change=(n, lambda v, dt=dt: v.astype(dt)),
                                    needles=(f"{op}: input '{n}' must be float32, got {dt}",)))
        if m.per_channel:      # 5 ranges for a weight of 3 channels
            first = m.inputs[0].name
            row("per-channel-length", Op(
                m, {"is_weight": True, m.channel_attr: True}, data=("float32", (3, 2)),
                channels=5, needles=(f"{op}: '{first}' must have shape (3,)", "got (5,)")))
    int8 = methods.REGISTRY["int8"]
    row("missing-input", Op(int8, drop_last=True,
                            needles=("Quantization_int8: input 'qstate' missing",)))
    return rows


@pytest.mark.parametrize("case", _op_rows())
def test_operator_refuses(case: Op):
    with pytest.raises(OperatorError) as e:
        _call_op(case)
    assert isinstance(e.value, QuantOpsError)
    msg = str(e.value)
    for needle in case.needles:
        assert needle in msg, msg


# == Python API ==============================================================================

@dataclass
class Api:
    call: Callable[[Ctx], Any]
    needles: tuple
    exc: type = QuantOpsError
    prep: Callable[[Ctx], Any] | None = None
    after: Callable[[Ctx], None] | None = None     # a further check after the call


def api(id_, call, *needles, exc=QuantOpsError, prep=None, after=None, marks=()):
    return pytest.param(Api(call, needles, exc, prep, after), id=f"api-{id_}", marks=marks)


def _load(c: Ctx, name: str = "net") -> QuantizedModel:
    return QuantizedModel.load(c.d / name)


def _x(c: Ctx) -> np.ndarray:
    return np.load(c.d / "calib.npy")


def _params(c: Ctx) -> dict:
    return {k: v.copy() for k, v in _float_net()[1].items()}


def _with(c: Ctx, **change) -> dict:
    p = _params(c)
    for k, fn in change.items():
        p[k] = fn(p[k])
    return p


def _sym(c: Ctx, name: str) -> Path:
    return c.d / f"{name}-symbol.json"


def _fit(c: Ctx, y=None, **cfg):
    x = _x(c)
    y = np.zeros(len(x), np.int64) if y is None else y
    return _load(c, "netc").fit((x, y), None, FitConfig(**{"epochs": 1, "batch_size": 8,
                                                           "progress": False, **cfg}))


def _gluon_deferred_net():
    net = gluon.nn.Dense(3)
    net.initialize()
    return net


def _gluon_uninitialized(c: Ctx):
    return QuantizedModel.from_gluon(gluon.nn.Dense(3))


def _gluon_deferred(c: Ctx):
    net = gluon.nn.Dense(3)
    net.initialize()
    return QuantizedModel.from_gluon(net)


# -- checkpoints: a copy of the two-step checkpoint, tampered, then a resume ----------------

def _ck_copy(c: Ctx) -> Path:
    ck = c.tmp / "ck"
    shutil.copytree(c.d / "ckpt", ck)
    return ck


def _ck_flip_byte(c: Ctx) -> None:
    p = _ck_copy(c) / "net.params"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def _ck_plant(c: Ctx, consistent: bool) -> None:
    """trainer.states and optimizer.npz replaced by pickles that would create a marker;
    with ``consistent`` the record's digest is updated to match (a deliberate forgery)."""
    ck = _ck_copy(c)
    evil = pickle.dumps(Evil(c.tmp / "PWNED"))
    (ck / "trainer.states").write_bytes(evil)
    (ck / "optimizer.npz").write_bytes(evil)
    if consistent:
        rec = json.loads((ck / "progress.json").read_text())
        rec["parts"]["optimizer.npz"] = hashlib.sha256(evil).hexdigest()
        (ck / "progress.json").write_text(json.dumps(rec))


def _ck_record(c: Ctx, text: str) -> None:
    (_ck_copy(c) / "progress.json").write_text(text)


def _ck_edit(c: Ctx, **fields) -> None:
    """The record with ``fields`` changed (its digests still match the parts)."""
    p = _ck_copy(c) / "progress.json"
    rec = json.loads(p.read_text())
    rec.update(fields)
    p.write_text(json.dumps(rec))


def _ck_nan_weights(c: Ctx) -> None:
    """A weight set to NaN and the record's digest updated to match (a forgery)."""
    ck = _ck_copy(c)
    arrays = mx.nd.load(str(ck / "net.params"))
    first = sorted(k for k in arrays if k.endswith("weight"))[0]
    arrays[first][:] = np.nan
    mx.nd.save(str(ck / "net.params"), arrays)
    rec = json.loads((ck / "progress.json").read_text())
    rec["parts"]["net.params"] = hashlib.sha256((ck / "net.params").read_bytes()).hexdigest()
    (ck / "progress.json").write_text(json.dumps(rec))


def _ck_drop(c: Ctx) -> None:
    (_ck_copy(c) / "optimizer.npz").unlink()


def _resume(c: Ctx):
    x, y = _ckpt_data()
    return fit(_ckpt_net(), (x, y), None, _ckpt_cfg(c.tmp / "ck"))


def _not_run(marker: str):
    def check(c: Ctx) -> None:
        assert not (c.d / marker).exists() and not (c.tmp / marker).exists(), "code ran"
    return check


P = QuantPolicy.from_dict

API_ROWS = [
    # -- symbol files ----------------------------------------------------------------------
    api("graph-malformed-json", lambda c: load_graph(_sym(c, "malformed")),
        "malformed-symbol.json: not valid JSON"),
    api("graph-not-a-dict", lambda c: load_graph(_sym(c, "notdict")),
        "notdict-symbol.json: not an MXNet symbol file"),
    api("graph-head-reads-output-3", lambda c: load_graph(_sym(c, "head3")),
        "head3-symbol.json: graph output reads output 3 of 'fc' (FullyConnected), which has 1"),
    api("graph-head-negative", lambda c: load_graph(_sym(c, "headneg")),
        "headneg-symbol.json: bad head [", "-5]"),
    api("graph-head-past-nodes", lambda c: load_graph(_sym(c, "headpast")),
        "headpast-symbol.json: bad head"),
    api("graph-no-heads", lambda c: load_graph(_sym(c, "noheads")),
        "noheads-symbol.json: the graph has no output"),
    api("graph-input-reads-output-3", lambda c: load_graph(_sym(c, "input3")),
        "input of node 'fc' reads output 3 of 'p' (Pooling), which has 1"),
    api("graph-input-negative", lambda c: load_graph(_sym(c, "inputneg")),
        "node 'fc' has a bad input [0, -5]"),
    api("graph-input-forward-reference", lambda c: load_graph(_sym(c, "inputfwd")),
        "node 'c1_weight' has a bad input"),
    api("graph-batchnorm-output-5", lambda c: load_graph(_sym(c, "bnout5")),
        "input of node 'r1' reads output 5 of 'bn1' (BatchNorm)"),
    api("graph-node-without-op", lambda c: load_graph(_sym(c, "noop")),
        "noop-symbol.json: node #", "lacks a string 'op'"),
    api("graph-attrs-not-mapping", lambda c: load_graph(_sym(c, "attrslist")),
        "node 'c1' has attributes that are not a mapping"),
    api("graph-graph-attrs-not-mapping", lambda c: load_graph(_sym(c, "graphattrs")),
        "graph 'attrs' is not a mapping"),
    api("graph-not-utf8", lambda c: load_graph(_sym(c, "binary")),
        "binary-symbol.json: not a symbol JSON (not UTF-8"),
    api("graph-missing-file", lambda c: load_graph(_sym(c, "nosuch")),
        "nosuch-symbol.json: cannot read"),
    api("model-unknown-op", lambda c: QuantizedModel.from_symbol(
        _sym(c, "unknownop"), c.d / "net-0000.params"),
        "unknownop-symbol.json: MXNet cannot load it", "NoSuchOp"),
    api("model-bad-attribute", lambda c: QuantizedModel.from_symbol(
        _sym(c, "badkernel"), c.d / "net-0000.params"),
        "badkernel-symbol.json: MXNet cannot load it", "kernel"),
    api("model-seed-graph-bad-nbits", lambda c: QuantizedModel.from_symbol(
        _sym(c, "seed"), c.d / "seed-0000.params"),
        "seed-symbol.json: node 'q' (_contrib_Quantization_int8)", "'nbits'"),
    # -- params ------------------------------------------------------------------------------
    api("params-missing-array", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), c.d / "missing-0000.params"), "the params do not match", "fc_bias"),
    api("params-float64-file", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), c.d / "f64-0000.params"),
        "f64-0000.params: parameter 'c1_weight' is float64, not float32"),
    api("params-float16-dict", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), _with(c, c1_bias=lambda v: v.astype(np.float16))),
        "parameter 'c1_bias' is float16"),
    api("params-int32-cast", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), c.d / "i32-0000.params", cast=True),
        "parameter 'fc_bias' is int32, not float32"),
    api("params-nan", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), c.d / "nan-0000.params"), "parameter 'c1_weight' has NaN"),
    api("params-inf", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), _with(c, fc_bias=lambda v: v + np.inf)),
        "parameter 'fc_bias' has NaN or infinite"),
    api("params-not-a-dict", lambda c: QuantizedModel.from_symbol(_sym(c, "net"), 123),
        "params must be a file name or a dict of arrays, not int"),
    api("params-key-not-a-name", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), {1: np.zeros(3, f32)}), "params: key 1 is not a name"),
    api("params-text-file", lambda c: load_params(c.d / "text.params"),
        "text.params: not an MXNet params file"),
    api("params-truncated", lambda c: load_params(c.d / "trunc.params"),
        "trunc.params: not an MXNet params file"),
    api("params-unnamed-arrays", lambda c: load_params(c.d / "list.params"),
        "list.params: holds unnamed arrays"),
    api("params-a-folder", lambda c: load_params(c.d), "params file not found"),
    api("load-missing-prefix", lambda c: QuantizedModel.load(c.tmp / "nosuch"),
        "nosuch-symbol.json: cannot read"),
    api("load-missing-epoch", lambda c: QuantizedModel.load(c.d / "net", epoch=3),
        "net-0003.params: params file not found"),
    api("load-unknown-data-name", lambda c: QuantizedModel.load(c.d / "net",
                                                                data_names=("input",)),
        "the params do not match the symbol: missing data"),
    api("gluon-uninitialized", _gluon_uninitialized, "is not initialized: call "
        "block.initialize() first"),
    api("gluon-deferred-no-sample", _gluon_deferred, "not initialized yet: pass `sample`"),
    # -- policies -----------------------------------------------------------------------------
    api("policy-not-a-mapping", lambda c: P([1]), "the top level must be a mapping, got list"),
    api("policy-none", lambda c: P(None), "the top level must be a mapping, got nothing"),
    api("policy-unknown-key", lambda c: P({"weights": {}}), "unknown key 'weights'"),
    api("policy-unknown-method", lambda c: P({"weight": {"method": "int9"}}),
        "weight.method = 'int9' is unknown"),
    api("policy-bits-above", lambda c: P({"weight": {"bits": 17}}),
        "weight.bits = 17 is out of range [2, 16]"),
    api("policy-bits-huge", lambda c: P({"activation": {"bits": 10 ** 400}}),
        "activation.bits = 1000"),
    api("policy-bits-bool", lambda c: P({"weight": {"bits": True}}),
        "weight.bits must be an integer, got True"),
    api("policy-alpha-inf", lambda c: P({"activation": {"method": "pact", "bits": 4,
                                                         "params": {"alpha": math.inf}}}),
        "activation.params.alpha = inf must be a number > 0"),
    api("policy-ema-decay-1.5", lambda c: P({"weight": {"params": {"ema_decay": 1.5}}}),
        "weight.params.ema_decay = 1.5"),
    api("policy-unknown-param", lambda c: P({"weight": {"params": {"alpah": 1}}}),
        "unknown key 'weight.params.alpah'"),
    api("policy-per-channel-activation", lambda c: P({"activation": {"per_channel": True}}),
        "activation.per_channel = true"),
    api("policy-activation-method-on-weight", lambda c: P({"weight": {"method": "pact"}}),
        "weight.method: 'pact' quantizes activations only"),
    api("policy-override-per-channel-activation", lambda c: P(
        {"overrides": [{"match": "c*", "activation": {"per_channel": True}}]}),
        "overrides[0].activation.per_channel = true"),
    api("policy-overrides-not-list", lambda c: P({"overrides": {"match": "c1"}}),
        "overrides must be a list"),
    api("policy-override-without-match", lambda c: P({"overrides": [{"weight": {}}]}),
        "overrides[0].match is required"),
    api("policy-skip-unknown-key", lambda c: P({"skip": {"first": True}}),
        "unknown key 'skip.first'"),
    api("policy-skip-flag-not-bool", lambda c: P({"skip": {"first_layer": "yes"}}),
        "skip.first_layer must be true or false"),
    api("policy-quantize-op-unknown", lambda c: P({"quantize_ops": ["Pooling"]}),
        "quantize_ops: unknown op 'Pooling'"),
    api("policy-shared-input-bad", lambda c: P({"shared_inputs": ["Convolution"]}),
        "shared_inputs: 'Convolution' cannot share"),
    api("policy-unknown-preset", lambda c: P({"preset": "trt_int4"}),
        "unknown preset 'trt_int4'"),
    api("policy-file-list", lambda c: QuantPolicy.load(c.d / "list.yaml"),
        "list.yaml: the top level must be a mapping, got list"),
    api("policy-file-empty", lambda c: QuantPolicy.load(c.d / "empty.yaml"),
        "empty.yaml: the top level must be a mapping, got nothing"),
    api("policy-file-malformed-yaml", lambda c: QuantPolicy.load(c.d / "malformed.yaml"),
        "malformed.yaml: malformed YAML"),
    api("policy-file-malformed-json", lambda c: QuantPolicy.load(c.d / "malformed.json"),
        "malformed.json: malformed JSON"),
    api("policy-file-python-tag", lambda c: QuantPolicy.load(c.d / "python_tag.yaml"),
        "python_tag.yaml: malformed YAML", after=_not_run("PWNED_yaml")),
    api("policy-file-alpha-nan", lambda c: QuantPolicy.load(c.d / "alpha_nan.yaml"),
        "alpha_nan.yaml: activation.params.alpha = nan"),
    api("policy-file-txt", lambda c: QuantPolicy.load(c.d / "policy.txt"),
        "policy.txt: unsupported file type '.txt'"),
    api("policy-file-not-utf8", lambda c: QuantPolicy.load(c.d / "binary.yaml"),
        "binary.yaml: cannot read the file"),
    api("policy-file-missing", lambda c: QuantPolicy.load(c.d / "nosuch.yaml"),
        "nosuch.yaml: cannot read the file"),
    api("policy-file-duplicate-key", lambda c: QuantPolicy.load(c.d / "dupkey.yaml"),
        "dupkey.yaml", "key 'weight' appears twice"),
    # -- quantize / calibrate / evaluate ------------------------------------------------------
    api("quantize-skip-pattern-no-match", lambda c: _load(c).quantize(
        c.d / "skipnomatch.yaml"),
        "skipnomatch.yaml: pattern 'no_such_layer' in skip.names[0] matches no node"),
    api("quantize-override-no-match", lambda c: _load(c).quantize(
        {"overrides": [{"match": "resnet*", "weight": {"bits": 4}}]}),
        "pattern 'resnet*' in overrides[0].match matches no node"),
    api("quantize-policy-int", lambda c: _load(c).quantize(5),
        "a policy is a QuantPolicy, a preset name or a dict, not int"),
    api("quantize-unknown-preset", lambda c: _load(c).quantize("trt_int4"),
        "unknown preset 'trt_int4'"),
    api("quantize-fold-bn-mode", lambda c: _load(c).quantize("trt_int8", fold_bn="both"),
        "unknown BN folding mode 'both'"),
    api("quantize-negative-bn-variance", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), c.d / "negvar-0000.params").quantize("trt_int8", fold_bn="deploy"),
        "BatchNorm 'bn1': running variance 'bn1_moving_var' is negative"),
    api("calibrate-before-quantize", lambda c: _load(c).calibrate(_x(c), progress=False),
        "net: nothing to calibrate: quantize() first"),
    api("calibrate-empty", lambda c: _load(c, "netq").calibrate(_x(c)[:0], progress=False),
        "the calibration set is empty"),
    api("calibrate-wrong-channels", lambda c: _load(c, "netq").calibrate(
        np.zeros((4, 3, 8, 8), f32), "minmax", progress=False),
        "shape (4, 3, 8, 8) do not fit the model"),
    api("calibrate-nan", lambda c: _load(c, "netq").calibrate(
        np.full((4, 1, 8, 8), np.nan, f32), "minmax", progress=False),
        "tensor 'data'", "calibration needs finite data"),
    api("calibrate-unknown-method", lambda c: _load(c, "netq").calibrate(
        _x(c), "kl", progress=False), "unknown calibration method 'kl'"),
    api("calibrate-percentile-200", lambda c: _load(c, "netq").calibrate(
        _x(c), "percentile", progress=False, percentile=200),
        "percentile must be in (0, 100], got 200"),
    api("calibrate-unknown-observer-param", lambda c: _load(c, "netq").calibrate(
        _x(c), "entropy", progress=False, bins_=3), "takes no parameter(s) bins_"),
    api("evaluate-label-count", lambda c: _load(c, "netc").evaluate(_x(c), np.zeros(3)),
        "evaluation set: 16 inputs but 3 labels"),
    api("evaluate-empty", lambda c: _load(c, "netc").evaluate([]),
        "the evaluation set is empty"),
    api("evaluate-wrong-shape", lambda c: _load(c, "netc").evaluate(
        np.zeros((2, 3, 8, 8), f32), np.zeros(2)), "netc-symbol.json: input shape",
        "(2, 3, 8, 8)"),
    api("set-input-shape-wrong", lambda c: _load(c).set_input_shape((1, 3, 8, 8)),
        "input shape (1, 3, 8, 8) does not fit", "c1"),
    api("dfq-after-quantize", lambda c: _load(c, "netc").dfq(),
        "netc: DFQ rewrites the float network"),
    api("easyquant-float-model", lambda c: _load(c).easyquant(_x(c), progress=False),
        "net-symbol.json: no Convolution/FullyConnected/Deconvolution"),
    # -- export / save ------------------------------------------------------------------------
    api("export-uncalibrated", lambda c: _load(c, "netq").export(c.out, input_shape=SHAPE),
        "activation quantizer(s) data_int8, p_int8 have no range"),
    api("export-no-input-shape", lambda c: _load(c, "netq").export(c.out),
        "netq: give input_shape"),
    api("export-dorefa", lambda c: _load(c, "netd").export(c.out, input_shape=SHAPE),
        "quantizer 'c1_weight_dorefa' (DoReFa) has no ONNX format"),
    api("export-3-bit", lambda c: _load(c, "net3").export(c.out, input_shape=SHAPE),
        "quantizer 'data_int8' is 3-bit"),
    api("export-opset-5", lambda c: _load(c, "netc").export(c.out, input_shape=SHAPE, opset=5),
        "opset 5 is not supported"),
    api("export-opset-text", lambda c: _load(c, "netc").export(c.out, input_shape=SHAPE,
                                                               opset="13"),
        "opset '13' is not supported (use one of the integers 13..21)"),
    api("export-trt-version-0", lambda c: _load(c, "netc").export(c.out, input_shape=SHAPE,
                                                                  trt_version=0),
        "trt_version must be a positive integer", "got 0"),
    api("export-name-too-long", lambda c: _load(c, "netc").export(c.out, "n" * 300,
                                                                  input_shape=SHAPE),
        "export name 'nnnn", "is 300 bytes long"),
    api("export-check-input-nan", lambda c: _load(c, "netc").export(
        c.out, input_shape=SHAPE, check_input=np.full(SHAPE, np.nan, f32)),
        "the check input for 'data' has NaN or infinite values"),
    api("export-input-shape-does-not-fit", lambda c: _load(c, "netc").export(
        c.out, input_shape=(1, 3, 8, 8)), "input shape (1, 3, 8, 8) does not fit", "c1"),
    api("export-name-with-parent", lambda c: _load(c, "netc").export(
        c.out, name="../escaped", input_shape=SHAPE),
        "export name '../escaped': give a plain file name"),
    api("save-under-a-file", lambda c: _load(c, "netc").save(c.d / "calib.npy" / "m"),
        "calib.npy: cannot write there"),
    # -- fine-tuning ------------------------------------------------------------------------------
    api("fit-labels-count", lambda c: _fit(c, y=np.zeros(3)),
        "the training set has 16 inputs but 3 labels"),
    api("fit-data-not-arrays", lambda c: _load(c, "netc").fit(5, None, FitConfig(
        progress=False)), "the training data must be (x, y) arrays"),
    api("fit-freeze-bn-after-negative", lambda c: _fit(c, freeze_bn_after=-1),
        "freeze_bn_after must be >= 0 steps, got -1"),
    api("fit-epochs-0", lambda c: _fit(c, epochs=0), "FitConfig.epochs must be an integer "
        ">= 1, got 0"),
    api("fit-batch-size-0", lambda c: _fit(c, batch_size=0),
        "FitConfig.batch_size must be an integer >= 1, got 0"),
    api("fit-lr-negative", lambda c: _fit(c, lr=-1.0),
        "FitConfig.lr must be a finite number > 0, got -1.0"),
    api("fit-lr-nan", lambda c: _fit(c, lr=float("nan")),
        "FitConfig.lr must be a finite number > 0, got nan"),
    api("fit-wd-inf", lambda c: _fit(c, wd=float("inf")),
        "FitConfig.wd must be a finite number >= 0, got inf"),
    api("fit-unknown-schedule", lambda c: _fit(c, schedule="cosine"),
        "FitConfig.schedule must be 'sine' or 'constant', got 'cosine'"),
    api("fit-unknown-optimizer", lambda c: _fit(c, optimizer="sgdd"),
        "FitConfig.optimizer must be an MXNet optimizer name"),
    api("fit-unknown-kvstore", lambda c: _fit(c, kvstore="devcie"),
        "FitConfig.kvstore must be one of local, device", "got 'devcie'"),
    api("fit-label-beyond-the-classes", lambda c: _fit(c, y=np.full(16, 7)),
        "the training set has label 7; the net has 3 classes"),
    api("fit-nan-inputs", lambda c: _load(c, "netc").fit(
        (np.full((16, 1, 8, 8), np.nan, f32), np.zeros(16, np.int64)), None,
        FitConfig(epochs=1, batch_size=8, progress=False)),
        "the training set has NaN or infinite inputs"),
    api("fit-seed-negative", lambda c: _fit(c, seed=-1),
        "FitConfig.seed must be an integer in 0..4294967295, got -1"),
    api("fit-diverges", lambda c: _fit(c, y=np.arange(16) % 3, lr=1e30, epochs=3),
        "training diverged at step", "lower the learning rate"),
    api("evaluate-label-beyond-the-classes", lambda c: _load(c, "netc").evaluate(
        _x(c), np.full(16, 7)), "evaluation set: label 7 is out of range: the model has 3 "
                                "classes"),
    api("evaluate-negative-label", lambda c: _load(c, "netc").evaluate(_x(c), np.full(16, -1)),
        "evaluation set: negative label -1"),
    api("evaluate-fractional-labels", lambda c: _load(c, "netc").evaluate(
        _x(c), np.full(16, 0.5)), "evaluation set: the labels are float64, not class indices"),
    api("evaluate-nan-inputs", lambda c: _load(c, "netc").evaluate(
        np.full((4, 1, 8, 8), np.nan, f32), np.zeros(4, np.int64)),
        "evaluation set: the inputs have NaN or infinite values"),
    api("calibrate-batch-size-0", lambda c: _load(c, "netq").calibrate(
        _x(c), "minmax", batch_size=0, progress=False),
        "batch_size must be an integer >= 1, got 0"),
    api("save-over-the-files-it-was-read-from", lambda c: QuantizedModel.load(
        c.prep / "net").quantize("trt_int8").save(c.prep / "net"),
        "net-symbol.json: this model was read from it",
        prep=lambda c: c.copy_in("net-symbol.json", "net-0000.params")),
    api("export-int8-over-the-files-it-was-read-from", lambda c: QuantizedModel.load(
        c.prep / "m-int8").export(c.prep, "m", input_shape=SHAPE, mxnet_int8=True,
                                  data=_x(c)),
        "m-int8-symbol.json: this model was read from it",
        prep=lambda c: c.copy_in("netc-symbol.json=m-int8-symbol.json",
                                 "netc-0000.params=m-int8-0000.params")),
    api("symbol-of-a-wrong-type", lambda c: QuantizedModel.from_symbol(5, c.d / "net-0000.params"),
        "symbol must be a symbol file, an mx.sym.Symbol or a Graph, not int"),
    api("quantize-a-string", lambda c: quant_ops.quantize("resnet", "trt_int8"),
        "quantize() takes a QuantizedModel or a Gluon HybridBlock, not str"),
    api("quantize-with-a-missing-policy-file", lambda c: _load(c).quantize(
        str(c.tmp / "nosuch.yaml")), "nosuch.yaml: cannot read the file"),
    api("policy-load-of-a-number", lambda c: QuantPolicy.load(5),
        "a policy file is a path, not int"),
    api("zoo-model-of-an-empty-shape", lambda c: QuantizedModel.from_zoo(
        "resnet18_v1", (1, 3, 0, 32)), "resnet18_v1: input_shape must be positive integers"),
    api("zoo-model-of-a-shape-it-cannot-take", lambda c: QuantizedModel.from_zoo(
        "resnet18_v1", (1, 3)), "resnet18_v1", "cannot run on a sample of shape 1x3",
        "Input data should be 4D"),
    api("gluon-sample-of-text", lambda c: QuantizedModel.from_gluon(
        _gluon_deferred_net(), "abc"), "a sample is an input batch"),
    api("fit-negative-labels", lambda c: _fit(c, y=np.full(16, -1)),
        "the training set: negative label -1"),
    api("fit-float-labels", lambda c: _fit(c, y=np.full(16, 0.5)),
        "the training set: the labels are float64, not class indices"),
    # -- data ---------------------------------------------------------------------------------
    api("data-missing", lambda c: load_data(c.d / "nosuch.npy", SHAPE),
        "nosuch.npy: no such file or folder"),
    api("data-csv", lambda c: load_data(c.d / "data.csv", SHAPE),
        "data.csv: not a .npy or .npz file"),
    api("data-not-numpy", lambda c: load_data(c.d / "fake.npy", SHAPE),
        "fake.npy: not a .npy file"),
    api("data-pickled-objects", lambda c: load_data(c.d / "evil.npy", SHAPE),
        "evil.npy: holds pickled Python objects", after=_not_run("PWNED_npy")),
    api("data-bad-zip", lambda c: load_data(c.d / "bad.npz", SHAPE),
        "bad.npz: cannot read it"),
    api("data-npz-without-images", lambda c: load_data(c.d / "nokeys.npz", SHAPE),
        "nokeys.npz: no images: it holds 'a'"),
    api("data-empty", lambda c: load_data(c.d / "empty.npy", SHAPE),
        "empty.npy: no images (the array is empty)"),
    api("data-rank1", lambda c: load_data(c.d / "rank1.npy", SHAPE),
        "rank1.npy: the images have rank 1"),
    api("data-wrong-size", lambda c: load_data(c.d / "calib9.npy", SHAPE),
        "calib9.npy: images of shape 1x9x9, the model takes 1x8x8"),
    api("data-wrong-channels", lambda c: load_data(c.d / "calib3.npy", SHAPE),
        "calib3.npy: the images have 3 channel(s), the model takes 1"),
    api("data-nan", lambda c: load_data(c.d / "nan.npy", SHAPE),
        "nan.npy: the images hold NaN"),
    api("data-strings", lambda c: load_data(c.d / "str.npy", SHAPE),
        "str.npy: the images are <U1, not numbers"),
    api("data-label-count", lambda c: load_data(c.d / "lblshort.npz", SHAPE),
        "lblshort.npz: 16 images but 3 labels"),
    api("data-negative-label", lambda c: load_data(c.d / "lblneg.npz", SHAPE),
        "lblneg.npz: negative label -1"),
    api("data-fractional-label", lambda c: load_data(c.d / "lblfrac.npz", SHAPE),
        "lblfrac.npz: the labels are float64, not class indices"),
    api("data-limit-0", lambda c: load_data(c.d / "calib.npy", SHAPE, limit=0),
        "the image limit must be >= 1, got 0"),
    api("data-std-0", lambda c: load_data(c.d / "u8.npy", SHAPE, normalize=(0.5, 0.0)),
        "u8.npy: the normalization std must be > 0"),
    api("data-mean-per-channel-count", lambda c: load_data(
        c.d / "u8.npy", SHAPE, normalize=([0.5, 0.2], [0.3, 0.3])),
        "u8.npy: 2 mean values for 1 channels"),
    api("data-image-folder-empty", lambda c: load_data(c.d / "imgs_empty", SHAPE),
        "imgs_empty: no images"),
    api("data-image-folder-no-shape", lambda c: load_data(c.d / "imgs_empty", None),
        "imgs_empty: an image folder needs the input shape"),
    api("data-image-broken", lambda c: load_data(c.d / "imgs_bad", SHAPE),
        "broken.png: cannot read the image"),
    api("data-shape-without-batch", lambda c: load_data(c.d / "calib.npy", (8,)),
        "input shape (8,): give the batch dimension too"),
    api("data-fmnist-split", lambda c: fashion_mnist("val"),
        "unknown Fashion-MNIST split 'val'"),
    # -- checkpoints --------------------------------------------------------------------------
    api("checkpoint-params-byte-changed", _resume,
        "net.params: does not belong to the checkpoint of step 1", prep=_ck_flip_byte),
    api("checkpoint-planted-pickles", _resume,
        "optimizer.npz: does not belong to the checkpoint", prep=lambda c: _ck_plant(c, False),
        after=_not_run("PWNED")),
    api("checkpoint-forged-pickle-with-digest", _resume,
        "optimizer.npz: not readable", prep=lambda c: _ck_plant(c, True),
        after=_not_run("PWNED")),
    api("checkpoint-record-broken", _resume,
        "progress.json: not a readable checkpoint record", prep=lambda c: _ck_record(c, "{")),
    api("checkpoint-record-without-parts", _resume,
        "progress.json: not a checkpoint record of this toolkit",
        prep=lambda c: _ck_record(c, '{"step": 1}')),
    api("checkpoint-part-missing", _resume, "optimizer.npz: missing from the checkpoint",
        prep=_ck_drop),
    api("checkpoint-step-past-the-run", _resume, "progress.json: 'step' is 1000",
        prep=lambda c: _ck_edit(c, step=1000)),
    api("checkpoint-step-negative", _resume, "progress.json: 'step' is -3",
        prep=lambda c: _ck_edit(c, step=-3)),
    api("checkpoint-step-not-epoch-and-batch", _resume,
        "progress.json: step 0 is not epoch 0, batch 1",
        prep=lambda c: _ck_edit(c, step=0)),
    api("checkpoint-epoch-past-the-run", _resume, "progress.json: 'epoch' is 5",
        prep=lambda c: _ck_edit(c, epoch=5)),
    api("checkpoint-epoch-text", _resume, "progress.json: 'epoch' is '0'",
        prep=lambda c: _ck_edit(c, epoch="0")),
    api("checkpoint-batch-past-the-epoch", _resume, "progress.json: 'batch' is 999",
        prep=lambda c: _ck_edit(c, batch=999)),
    api("checkpoint-batch-negative", _resume, "progress.json: 'batch' is -1",
        prep=lambda c: _ck_edit(c, batch=-1)),
    api("checkpoint-running-loss-nan", _resume, "progress.json: 'run_loss' is nan",
        prep=lambda c: _ck_edit(c, run_loss=float("nan"))),
    api("checkpoint-nan-weights-with-digest", _resume, "net.params: 'net_", "holds NaN",
        prep=_ck_nan_weights),
    api("model-quantizer-range-empty", lambda c: _load(c, "netc_norange"),
        "has shape (0,); it holds one value per tensor or per channel"),
    api("model-negative-bn-variance-unfolded", lambda c: QuantizedModel.from_symbol(
        _sym(c, "net"), c.d / "negvar-0000.params"),
        "BatchNorm 'bn1': running variance 'bn1_moving_var' is negative"),
]


@pytest.mark.parametrize("case", API_ROWS)
def test_api_refuses(case: Api, world, tmp_path):
    ctx = Ctx(world, tmp_path)
    if case.prep is not None:
        ctx.prep = case.prep(ctx)
    before = _snapshot(*_watched(ctx))
    with pytest.raises(case.exc) as e:
        case.call(ctx)
    msg = str(e.value)
    for needle in case.needles:
        assert needle in msg, msg
    assert ".staged-" not in msg, msg
    if case.after is not None:
        case.after(ctx)
    _assert_nothing_written(before, ctx)


# == command lines ===========================================================================

@dataclass
class Cli:
    module: Any
    argv: Callable[[Ctx], list]
    needles: tuple
    usage: bool = False            # argparse's own error: SystemExit(2) and its usage text
    prep: Callable[[Ctx], Any] | None = None


def cli(id_, module, argv, *needles, usage=False, prep=None, marks=()):
    name = module.__name__.rsplit(".", 1)[-1]
    return pytest.param(Cli(module, argv, needles, usage, prep), id=f"cli-{name}-{id_}",
                        marks=marks)


GO, EX, QT, SE, DF, EQ = graph_optimize, export_onnx, qat_train, sensitivity, dfq, easyquant


def go(c: Ctx, *extra, model="net", params=None, shape="1,1,8,8") -> list:
    return [*c.model(model, params), "--input-shape", shape, "--no-progress", "--no-draw",
            *extra, "--out", str(c.out)]


def go_policy(c: Ctx, name: str) -> list:
    return go(c, "--policy", c.f(name))


def ex(c: Ctx, *extra, model="netc") -> list:
    return [*c.model(model), "--input-shape", "1,1,8,8", *extra, "--out", str(c.out)]


def qt(c: Ctx, *extra) -> list:       # the bundled model: these rows fail before any data
    return ["--model", "fmnist_resnet20", "--no-progress", *extra, "--out", str(c.out)]


def qt_tiny(c: Ctx, *extra) -> list:
    return [*c.model(), "--no-progress", "--calib-images", "0", "--epochs", "1",
            "--batch-size", "8", *extra, "--out", str(c.out)]


def ptq(c: Ctx, *extra, model="net") -> list:     # sensitivity, dfq, easyquant
    return [*c.model(model), "--input-shape", "1,1,8,8", "--no-progress", *extra,
            "--out", str(c.out)]


def calib(c: Ctx, *extra, model="net") -> list:
    return ptq(c, "--calib", c.f("calib.npy"), *extra, model=model)


def in_place(c: Ctx, *extra) -> list:
    """A model whose files are ``re-quant-*`` in the case's ``in/`` folder, and ``--out``
    that folder with ``--name re``: the outputs ``re-quant-*`` would replace the inputs."""
    d = c.prep
    return ["--symbol", str(d / "re-quant-symbol.json"), "--params",
            str(d / "re-quant-0000.params"), "--input-shape", "1,1,8,8", "--no-progress",
            *extra, "--name", "re", "--out", str(d)]


def re_quant(c: Ctx) -> Path:
    return c.copy_in("net-symbol.json=re-quant-symbol.json",
                     "net-0000.params=re-quant-0000.params", "calib.npy")


CLI_ROWS = [
    # -- graph_optimize: files ------------------------------------------------------------
    cli("malformed-json", GO, lambda c: go(c, model="malformed", params="net"),
        "malformed-symbol.json: not valid JSON"),
    cli("symbol-not-a-dict", GO, lambda c: go(c, model="notdict", params="net"),
        "notdict-symbol.json: not an MXNet symbol file"),
    cli("head-reads-output-3", GO, lambda c: go(c, model="head3", params="net"),
        "head3-symbol.json: graph output reads output 3 of 'fc'"),
    cli("head-negative", GO, lambda c: go(c, model="headneg", params="net"),
        "headneg-symbol.json: bad head"),
    cli("input-reads-output-3", GO, lambda c: go(c, model="input3", params="net"),
        "input of node 'fc' reads output 3 of 'p'"),
    cli("input-negative", GO, lambda c: go(c, model="inputneg", params="net"),
        "node 'fc' has a bad input [0, -5]"),
    cli("unknown-op", GO, lambda c: go(c, model="unknownop", params="net"),
        "unknownop-symbol.json: MXNet cannot load it", "NoSuchOp"),
    cli("symbol-missing", GO, lambda c: go(c, model="nosuch", params="net"),
        "nosuch-symbol.json: cannot read"),
    cli("params-missing-array", GO, lambda c: go(c, params="missing"),
        "the params do not match the symbol: missing fc_bias"),
    cli("params-not-params", GO, lambda c: [*go(c)[:3], c.f("text.params"), *go(c)[4:]],
        "text.params: not an MXNet params file"),
    cli("params-float64", GO, lambda c: go(c, params="f64"),
        "f64-0000.params: parameter 'c1_weight' is float64"),
    cli("params-int32", GO, lambda c: go(c, params="i32"),
        "i32-0000.params: parameter 'fc_bias' is int32"),
    cli("params-nan", GO, lambda c: go(c, params="nan"),
        "nan-0000.params: parameter 'c1_weight' has NaN"),
    cli("negative-bn-variance", GO, lambda c: go(c, params="negvar"),
        "BatchNorm 'bn1': running variance 'bn1_moving_var' is negative"),
    cli("quantizer-range-empty", GO, lambda c: go(c, model="netc_norange"),
        "has shape (0,); it holds one value per tensor or per channel"),
    cli("negative-bn-variance-folded", GO, lambda c: go(c, "--fold-bn", "deploy",
                                                         params="negvar"),
        "BatchNorm 'bn1': running variance 'bn1_moving_var' is negative"),
    cli("seed-graph-bad-nbits", GO, lambda c: go(c, model="seed"),
        "node 'q' (_contrib_Quantization_int8)", "'nbits'"),
    cli("symbol-without-params", GO, lambda c: [*go(c)[:2], *go(c)[4:]],
        "--symbol needs --params"),
    cli("params-without-symbol", GO, lambda c: [*go(c)[2:]], "--params needs --symbol"),
    cli("unknown-zoo-model", GO, lambda c: ["--model", "resnet19_v1", "--out", str(c.out)],
        "unknown gluoncv model 'resnet19_v1'"),
    # -- graph_optimize: arguments ----------------------------------------------------------
    cli("input-shape-does-not-fit", GO, lambda c: go(c, shape="1,3,8,8"),
        "input shape (1, 3, 8, 8) does not fit the model", "c1"),
    cli("input-shape-not-numbers", GO, lambda c: go(c, shape="1,a,8,8"),
        "not a shape: '1,a,8,8'", usage=True),
    cli("input-shape-zero", GO, lambda c: go(c, shape="1,0,8,8"),
        "not a shape: '1,0,8,8'", usage=True),
    cli("name-with-slash", GO, lambda c: go(c, "--name", "sub/net"),
        "--name 'sub/net': give a plain file name"),
    cli("name-dotdot", GO, lambda c: go(c, "--name", ".."), "--name '..'"),
    cli("zoo-model-input-of-wrong-rank", GO, lambda c: ["--model", "resnet18_v1",
                                                        "--input-shape", "1,3", "--out",
                                                        str(c.out)],
        "resnet18_v1: cannot run on a sample of shape 1x3", "Input data should be 4D"),
    cli("name-empty", GO, lambda c: go(c, "--name", ""), "--name '': give a plain file name"),
    cli("name-too-long", GO, lambda c: go(c, "--name", "n" * 300),
        "--name 'nnnn", "is 300 bytes long: at most 200"),
    cli("an-output-is-a-folder", GO, lambda c: go(c), "summary.md: is a folder",
        prep=lambda c: (c.out / "summary.md").mkdir(parents=True)),
    cli("params-with-a-name-twice", GO, lambda c: go(c, params="dupkey"),
        "dupkey-0000.params: parameter 'c1_weight' is in the file twice"),
    cli("json-nested-too-deep", GO, lambda c: go(c, model="deep", params="net"),
        "deep-symbol.json: not an MXNet symbol file"),
    cli("out-is-input-folder", GO, lambda c: in_place(c, "--no-draw"),
        "re-quant-symbol.json: this output would overwrite an input", prep=re_quant),
    cli("out-holds-policy-as-summary", GO, lambda c: [
        *c.model(), "--input-shape", "1,1,8,8", "--no-draw", "--policy",
        str(c.prep / "summary.json"), "--out", str(c.prep)],
        "summary.json: this output would overwrite an input",
        prep=lambda c: c.write_in("summary.json", '{"preset": "trt_int8"}')),
    cli("out-is-a-file", GO, lambda c: [*go(c)[:-1], c.f("calib.npy")],
        "calib.npy: cannot write there"),
    cli("fold-bn-mode", GO, lambda c: go(c, "--fold-bn", "both"), "invalid choice: 'both'",
        usage=True),
    # -- graph_optimize: policies ------------------------------------------------------------
    cli("policy-unknown-key", GO, lambda c: go_policy(c, "unknown_key.yaml"),
        "unknown_key.yaml: unknown key 'weights'"),
    cli("policy-unknown-method", GO, lambda c: go_policy(c, "unknown_method.yaml"),
        "unknown_method.yaml: weight.method = 'int9' is unknown"),
    cli("policy-bits-out-of-range", GO, lambda c: go_policy(c, "bits.yaml"),
        "bits.yaml: weight.bits = 17 is out of range"),
    cli("policy-alpha-inf", GO, lambda c: go_policy(c, "alpha_inf.yaml"),
        "alpha_inf.yaml: activation.params.alpha = inf"),
    cli("policy-pattern-matches-nothing", GO, lambda c: go_policy(c, "nomatch.yaml"),
        "nomatch.yaml: pattern 'resnetv10_*' in overrides[0].match matches no node"),
    cli("policy-skip-matches-nothing", GO, lambda c: go_policy(c, "skipnomatch.yaml"),
        "skipnomatch.yaml: pattern 'no_such_layer' in skip.names[0]"),
    cli("policy-per-channel-activation", GO, lambda c: go_policy(c, "perchan_act.yaml"),
        "perchan_act.yaml: activation.per_channel = true"),
    cli("policy-yaml-not-mapping", GO, lambda c: go_policy(c, "list.yaml"),
        "list.yaml: the top level must be a mapping"),
    cli("policy-malformed-yaml", GO, lambda c: go_policy(c, "malformed.yaml"),
        "malformed.yaml: malformed YAML"),
    cli("policy-txt", GO, lambda c: go_policy(c, "policy.txt"),
        "policy.txt: unsupported file type"),
    cli("policy-missing", GO, lambda c: go_policy(c, "nosuch.yaml"),
        "nosuch.yaml: cannot read the file"),
    cli("unknown-preset", GO, lambda c: go(c, "--preset", "trt_int4"),
        "unknown preset 'trt_int4'"),
    # -- graph_optimize: calibration ----------------------------------------------------------
    cli("calib-missing", GO, lambda c: go(c, "--calib", c.f("nosuch.npy")),
        "nosuch.npy: no such file or folder"),
    cli("calib-wrong-size", GO, lambda c: go(c, "--calib", c.f("calib9.npy")),
        "calib9.npy: images of shape 1x9x9, the model takes 1x8x8"),
    cli("calib-pickled", GO, lambda c: go(c, "--calib", c.f("evil.npy")),
        "evil.npy: holds pickled Python objects"),
    cli("calib-nan", GO, lambda c: go(c, "--calib", c.f("nan.npy")),
        "nan.npy: the images hold NaN"),
    cli("mean-without-std", GO, lambda c: go(c, "--calib", c.f("calib.npy"), "--mean", "0.5"),
        "--mean and --std go together"),
    cli("std-zero", GO, lambda c: go(c, "--calib", c.f("u8.npy"), "--mean", "0.5",
                                     "--std", "0"), "u8.npy: the normalization std must be > 0"),
    cli("calib-images-0", GO, lambda c: go(c, "--calib", c.f("calib.npy"),
                                           "--calib-images", "0"),
        "--calib-images must be >= 1, got 0"),
    cli("mean-not-finite", GO, lambda c: go(c, "--calib", c.f("calib.npy"), "--mean", "nan",
                                            "--std", "1"), "not finite: 'nan'", usage=True),
    # -- export_onnx --------------------------------------------------------------------------
    cli("uncalibrated", EX, lambda c: ex(c, model="netq"),
        "netq-symbol.json: activation quantizer(s) data_int8, p_int8 have no range"),
    cli("dorefa", EX, lambda c: ex(c, model="netd"),
        "quantizer 'c1_weight_dorefa' (DoReFa) has no ONNX format"),
    cli("opset-5", EX, lambda c: ex(c, "--opset", "5"), "opset 5 is not supported"),
    cli("trt-version-negative", EX, lambda c: ex(c, "--trt-version", "-1"),
        "--trt-version must be TensorRT"),
    cli("trt-version-huge", EX, lambda c: ex(c, "--trt-version", str(10 ** 30)),
        "--trt-version must be TensorRT's number for itself", "got 1000000000000000000000"),
    cli("mean-without-calib", EX, lambda c: ex(c, "--mean", "0.5", "--std", "0.2"),
        "--mean, --std: only for --calib images"),
    cli("calib-images-without-calib", EX, lambda c: ex(c, "--calib-images", "8"),
        "--calib-images: only for --calib images"),
    cli("check-input-missing", EX, lambda c: ex(c, "--check-input", c.f("nosuch.npy")),
        "nosuch.npy: cannot read"),
    cli("check-input-pickled", EX, lambda c: ex(c, "--check-input", c.f("evil.npy")),
        "evil.npy: cannot read"),
    cli("check-input-wrong-channels", EX, lambda c: ex(c, "--check-input", c.f("calib3.npy")),
        "Shape inconsistent"),
    cli("name-with-slash", EX, lambda c: ex(c, "--name", "a/b"), "--name 'a/b'"),
    cli("name-hidden", EX, lambda c: ex(c, "--name", ".net"), "--name '.net'"),
    cli("out-holds-check-input", EX, lambda c: [
        "--symbol", str(c.prep / "netc-symbol.json"), "--params",
        str(c.prep / "netc-0000.params"), "--check-input", str(c.prep / "netc.ranges.json"),
        "--out", str(c.prep)], "netc.ranges.json: this output would overwrite an input",
        prep=lambda c: c.copy_in("netc-symbol.json", "netc-0000.params",
                                 "calib.npy=netc.ranges.json")),
    cli("no-out", EX, lambda c: ex(c)[:-2], "the following arguments are required: --out",
        usage=True),
    cli("check-input-npz", EX, lambda c: ex(c, "--check-input", c.f("test.npz")),
        "test.npz: --check-input takes a .npy array"),
    cli("check-input-nan", EX, lambda c: ex(c, "--check-input", c.f("nan1.npy")),
        "nan1.npy: has NaN or infinite values"),
    cli("an-output-is-a-folder", EX, lambda c: ex(c), "netc.ranges.json: is a folder",
        prep=lambda c: (c.out / "netc.ranges.json").mkdir(parents=True)),
    # -- qat_train ----------------------------------------------------------------------------
    cli("lr-nan", QT, lambda c: qt(c, "--lr", "nan"), "--lr must be a number > 0, got nan"),
    cli("lr-negative", QT, lambda c: qt(c, "--lr", "-1"), "--lr must be a number > 0, got -1"),
    cli("float-lr-inf", QT, lambda c: qt(c, "--float-lr", "inf"),
        "--float-lr must be a number > 0, got inf"),
    cli("epochs-0", QT, lambda c: qt(c, "--epochs", "0"), "--epochs must be >= 1, got 0"),
    cli("epochs-text", QT, lambda c: qt(c, "--epochs", "abc"), "invalid int value: 'abc'",
        usage=True),
    cli("batch-size-0", QT, lambda c: qt(c, "--batch-size", "0"),
        "--batch-size must be >= 1, got 0"),
    cli("checkpoint-every-0", QT, lambda c: qt(c, "--checkpoint-every", "0"),
        "--checkpoint-every must be >= 1, got 0"),
    cli("train-limit-negative", QT, lambda c: qt(c, "--train-limit", "-5"),
        "--train-limit must be >= 0, got -5"),
    cli("freeze-bn-after-negative", QT, lambda c: qt(c, "--freeze-bn-after", "-1"),
        "--freeze-bn-after must be >= 0, got -1"),
    cli("unknown-preset", QT, lambda c: qt(c, "--policy", "no_such_preset"),
        "unknown preset 'no_such_preset'"),
    cli("policy-per-channel-activation", QT, lambda c: qt(c, "--policy", c.f("perchan_act.yaml")),
        "perchan_act.yaml: activation.per_channel = true"),
    cli("data-missing-folder", QT, lambda c: qt(c, "--data", str(c.tmp / "nosuch")),
        "nosuch: no such file or folder"),
    cli("unknown-model", QT, lambda c: ["--model", "nosuchmodel", "--out", str(c.out)],
        "unknown model 'nosuchmodel'"),
    cli("model-and-symbol", QT, lambda c: ["--model", "fmnist_resnet20", *c.model(),
                                           "--out", str(c.out)],
        "give --model or --symbol/--params, not both"),
    cli("symbol-without-params", QT, lambda c: [*c.model()[:2], "--out", str(c.out)],
        "--symbol needs --params"),
    cli("mean-without-std", QT, lambda c: qt(c, "--mean", "0.3"),
        "--mean and --std go together"),
    cli("epoch-negative", QT, lambda c: qt(c, "--epoch", "-1"),
        "--epoch must be >= 0, got -1"),
    cli("own-model-without-data", QT, lambda c: qt_tiny(c),
        "the model's training data is unknown: pass --data"),
    cli("data-without-test", QT, lambda c: qt_tiny(c, "--data", c.f("test.npz")),
        "no evaluation data: pass --test"),
    cli("data-without-labels", QT, lambda c: qt_tiny(c, "--data", c.f("calib.npy"),
                                                     "--test", c.f("test.npz")),
        "calib.npy: no labels"),
    cli("data-negative-label", QT, lambda c: qt_tiny(c, "--data", c.f("lblneg.npz"),
                                                     "--test", c.f("test.npz")),
        "lblneg.npz: negative label -1"),
    cli("unknown-calib-method", QT, lambda c: qt_tiny(
        c, "--data", c.f("test.npz"), "--test", c.f("test.npz"), "--calib-images", "8",
        "--calib-method", "kl"), "unknown calibration method 'kl'"),
    # (not "dist_synk": MXNet then wants DMLC_* variables, and after one such failure a
    # second kvstore of a dist type in the same process hangs in ps-lite)
    cli("unknown-kvstore", QT, lambda c: qt_tiny(c, "--data", c.f("test.npz"), "--test",
                                                 c.f("test.npz"), "--kvstore", "devcie"),
        "--kvstore", "devcie"),
    cli("seed-negative", QT, lambda c: qt(c, "--seed", "-1"), "--seed must be in 0..",
        "got -1"),
    cli("train-label-beyond-the-classes", QT, lambda c: qt_tiny(
        c, "--data", c.f("lbl7.npz"), "--test", c.f("test.npz")),
        "lbl7.npz: label 7 is out of range: the model has 3 classes"),
    cli("test-label-beyond-the-classes", QT, lambda c: qt_tiny(
        c, "--data", c.f("test.npz"), "--test", c.f("lbl7.npz")),
        "lbl7.npz: label 7 is out of range"),
    cli("policy-quantizes-nothing", QT, lambda c: qt_tiny(
        c, "--data", c.f("test.npz"), "--test", c.f("test.npz"), "--policy", "lsq_w4a4"),
        "lsq_w4a4: the policy quantizes no layer of net"),
    cli("out-holds-the-model", QT, lambda c: [
        "--model", str(c.out / "rank0" / "final"), "--data", c.f("test.npz"), "--test",
        c.f("test.npz"), "--no-progress", "--calib-images", "0", "--out", str(c.out)],
        "final-symbol.json: this output would overwrite an input",
        prep=lambda c: [c.out.joinpath("rank0").mkdir(parents=True),
                        shutil.copy(c.d / "net-symbol.json", c.out / "rank0" / "final-symbol.json"),
                        shutil.copy(c.d / "net-0000.params", c.out / "rank0" / "final-0000.params")]),
    cli("out-holds-the-policy-as-run-record", QT, lambda c: qt_tiny(
        c, "--data", c.f("test.npz"), "--test", c.f("test.npz"), "--policy",
        str(c.out / "checkpoint.json")),
        "checkpoint.json: this output would overwrite an input",
        prep=lambda c: [c.out.mkdir(parents=True),
                        c.out.joinpath("checkpoint.json").write_text('{"preset": "trt_int8"}')]),
    cli("out-checkpoints-hold-the-data", QT, lambda c: qt_tiny(
        c, "--data", str(c.out / "checkpoint" / "test.npz"), "--test", c.f("test.npz")),
        "checkpoint: this output would overwrite an input",
        prep=lambda c: [c.out.joinpath("checkpoint").mkdir(parents=True),
                        shutil.copy(c.d / "test.npz", c.out / "checkpoint" / "test.npz")]),
    # -- sensitivity --------------------------------------------------------------------------
    cli("test-label-beyond-the-classes", SE, lambda c: calib(c, "--test", c.f("lbl7.npz"),
                                                             "--eval-images", "4"),
        "lbl7.npz: label 7 is out of range"),
    cli("max-layers-negative", SE, lambda c: calib(c, "--max-layers", "-1"),
        "--max-layers must be >= 0, got -1"),
    cli("calib-images-0", SE, lambda c: calib(c, "--calib-images", "0"),
        "--calib-images must be >= 1, got 0"),
    cli("calib-batch-0", SE, lambda c: calib(c, "--calib-batch", "0"),
        "--calib-batch must be >= 1, got 0"),
    cli("eval-images-negative", SE, lambda c: calib(c, "--eval-images", "-1"),
        "--eval-images must be >= 0, got -1"),
    cli("min-gain-inf", SE, lambda c: calib(c, "--min-gain", "inf"),
        "--min-gain must be a finite number, got inf"),
    cli("unknown-preset", SE, lambda c: calib(c, "--policy", "trt_int4"),
        "unknown preset 'trt_int4'"),
    cli("own-model-without-data", SE, lambda c: ptq(c),
        "net-symbol.json: not a bundled model, so its data is unknown"),
    cli("calib-missing", SE, lambda c: ptq(c, "--calib", c.f("nosuch.npy")),
        "nosuch.npy: no such file or folder"),
    cli("calib-wrong-channels", SE, lambda c: ptq(c, "--calib", c.f("calib3.npy")),
        "calib3.npy: the images have 3 channel(s), the model takes 1"),
    cli("unknown-calib-method", SE, lambda c: calib(c, "--method", "kl", "--eval-images", "0"),
        "unknown calibration method 'kl'"),
    cli("out-holds-policy", SE, lambda c: [
        *c.model(), "--input-shape", "1,1,8,8", "--no-progress", "--calib", c.f("calib.npy"),
        "--eval-images", "0", "--policy", str(c.prep / "policy_skip.yaml"),
        "--out", str(c.prep)], "policy_skip.yaml", "overwrite",
        prep=lambda c: c.write_in("policy_skip.yaml", "preset: trt_int8\n")),
    # -- dfq ----------------------------------------------------------------------------------
    cli("no-data", DF, lambda c: ptq(c), "the activation ranges need data: give --calib"),
    cli("calib-and-distill", DF, lambda c: calib(c, "--distill-range"),
        "--distill-range calibrates without real data: give it or --calib, not both"),
    cli("empirical-without-calib", DF, lambda c: ptq(c, "--distill-range", "--correction",
                                                     "empirical"),
        "--correction empirical measures the layers' inputs: it needs --calib"),
    cli("no-absorb-without-equalize", DF, lambda c: calib(c, "--no-absorb"),
        "--no-absorb goes with --equalize"),
    cli("clip-weight-0", DF, lambda c: calib(c, "--clip-weight", "0"),
        "--clip-weight must be > 0, got 0"),
    cli("clip-weight-nan", DF, lambda c: calib(c, "--clip-weight", "nan"),
        "--clip-weight must be > 0, got nan"),
    cli("input-range-reversed", DF, lambda c: ptq(c, "--distill-range", "--input-range", "1,0"),
        "--input-range must be LO,HI with LO < HI, got 1.0,0.0"),
    cli("input-range-three", DF, lambda c: ptq(c, "--distill-range", "--input-range", "0,1,2"),
        "--input-range must be LO,HI"),
    cli("distill-steps-negative", DF, lambda c: ptq(c, "--distill-range", "--distill-steps",
                                                    "-1"),
        "--distill-steps must be >= 0, got -1"),
    cli("distill-batches-0", DF, lambda c: ptq(c, "--distill-range", "--distill-batches", "0"),
        "--distill-batches must be >= 1, got 0"),
    cli("batch-size-0", DF, lambda c: calib(c, "--batch-size", "0"),
        "--batch-size must be >= 1, got 0"),
    cli("already-quantized", DF, lambda c: calib(c, model="netq"),
        "already quantized: give the float model"),
    cli("model-prefix-missing", DF, lambda c: ["--model", str(c.tmp / "nosuch"), "--calib",
                                               c.f("calib.npy"), "--out", str(c.out)],
        "nosuch-symbol.json: cannot read"),
    cli("correction-unknown", DF, lambda c: calib(c, "--correction", "magic"),
        "invalid choice: 'magic'", usage=True),
    cli("policy-missing", DF, lambda c: calib(c, "--policy", c.f("nosuch.yaml")),
        "nosuch.yaml: cannot read the file"),
    cli("name-with-parent", DF, lambda c: calib(c, "--name", "../escaped"), "--name '../escaped'"),
    cli("out-is-input-folder", DF, lambda c: in_place(c, "--calib", str(c.prep / "calib.npy")),
        "re-quant-symbol.json: this output would overwrite an input", prep=re_quant),
    # -- easyquant ----------------------------------------------------------------------------
    cli("no-calib", EQ, lambda c: ptq(c), "EasyQuant searches scales on data: give --calib"),
    cli("rounds-0", EQ, lambda c: calib(c, "--rounds", "0"), "--rounds must be >= 1, got 0"),
    cli("points-0", EQ, lambda c: calib(c, "--points", "0"), "--points must be >= 1, got 0"),
    cli("calib-images-0", EQ, lambda c: calib(c, "--calib-images", "0"),
        "--calib-images must be >= 1, got 0"),
    cli("bits-6", EQ, lambda c: calib(c, "--bits", "6"), "invalid choice: 6", usage=True),
    cli("search-reversed", EQ, lambda c: calib(c, "--search", "1.2", "0.5", "--points", "5"),
        "search must be (low, high) with 0 < low < high, got (1.2, 0.5)"),
    cli("policy-of-other-bits", EQ, lambda c: calib(c, "--policy", c.f("bits4.yaml")),
        "easyquant(nbits=8) but the graph's quantizers have [4] bits"),
    cli("calib-wrong-size", EQ, lambda c: ptq(c, "--calib", c.f("calib9.npy")),
        "calib9.npy: images of shape 1x9x9, the model takes 1x8x8"),
    cli("name-with-parent", EQ, lambda c: calib(c, "--name", "../escaped", "--points", "5",
                                                "--rounds", "1"), "--name '../escaped'"),
    # -- launch -------------------------------------------------------------------------------
    cli("no-command", launch, lambda c: ["-n", "1"], "give the worker command after --"),
    cli("zero-workers", launch, lambda c: ["-n", "0", "--", "true"],
        "--num-workers must be >= 1, got 0"),
]


@pytest.mark.parametrize("case", CLI_ROWS)
def test_cli_refuses(case: Cli, world, tmp_path, capfd):
    ctx = Ctx(world, tmp_path)
    if case.prep is not None:
        ctx.prep = case.prep(ctx)
    argv = case.argv(ctx)
    before = _snapshot(*_watched(ctx))
    capfd.readouterr()
    if case.usage:
        with pytest.raises(SystemExit) as e:
            case.module.main(argv)
        rc = e.value.code
    else:
        rc = case.module.main(argv)
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    if case.usage:        # argparse: its usage text, then "prog: error: ..."
        assert lines and ": error: " in lines[-1], err
        text = lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        text = lines[0]
    for needle in case.needles:
        assert needle in text, err
    assert ".staged-" not in text, err     # never a hidden temporary path
    assert case.prep is not None or not ctx.out.exists()  # (a prep may make --out itself)
    _assert_nothing_written(before, ctx)


def test_the_table_is_large_enough():
    n = len(_op_rows()) + len(API_ROWS) + len(CLI_ROWS)
    assert n >= 120 and len(CLI_ROWS) >= 40 and len(API_ROWS) >= 40, n
