#!/usr/bin/env python
"""Benchmark of ``Quantization_int8`` (CPU) against its floors and alternatives.

For each case the same tensors are timed with:

* ``quant_ops``: the fused operator (the raw MXNet op, without the Python leaf wrapper), which
  allocates its output as in real use; ``qo prealloc`` is the same call with ``out=`` a
  preallocated array (kernel + dispatch, no allocation);
* ``copy floor``: the fastest plain copy of the same bytes (``NDArray.copyto`` into a
  preallocated array, or ``np.copyto``); forward+backward cases copy twice (x -> y, dy -> dx),
  since the fused op reads and writes two tensors there too; ``alloc copy`` (informational)
  is ``NDArray.copy()``, which allocates its output like the operator does;
* ``composed nd``: the same math from stock MXNet nd operators (range, scale, divide,
  round half to even, clip, multiply; the backward is the straight-through copy of dy);
* ``torch``: ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` with the
  range computed by ``torch.aminmax`` where the case computes one (when torch imports).

MXNet 1.9's CPU storage has no pool: a large output is a fresh glibc ``mmap`` whose pages fault
in on first write, which for a 51 MB tensor costs several times the copy itself.
By default the bench sets glibc's mmap and trim thresholds to 1 GiB and one arena (as
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_ARENA_MAX`` would) so freed
blocks are reused by every column alike (``--no-malloc-tuning`` leaves the defaults).

MXNet engines (``--engine``, default ``both``): numpy and torch run each call in the calling
thread; MXNet's default threaded engine hands each operator to a worker thread, and a call
timed with ``waitall()`` then also holds two thread wake-ups (tens of microseconds on a
virtual machine, the same for every MXNet operator: ``qo/mx_copy`` is the operator against
MXNet's own copy under that engine).  So the bench times everything under MXNet's synchronous
``NaiveEngine`` (same execution model as the numpy and torch columns: kernel plus MXNet's
dispatch), then reruns itself in a child process under the threaded engine, and prints a
summary of both.

Each timing is the median of ``--repeats`` calls, each timed with ``time.perf_counter`` around
the call plus ``mx.nd.waitall()``, after ``--warmup`` untimed calls; the columns of a case are
timed round-robin in five chunks, so a slow spell of a shared machine hits them alike.

    PYTHONPATH=. python bench/bench_ops.py [--quick] [--engine both|sync|threaded] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


ENGINES = {"sync": "NaiveEngine", "threaded": "ThreadedEnginePerDevice"}


def _pre_args(argv: list[str]) -> argparse.Namespace:
    """The options that must act before mxnet loads (--threads, --engine)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=None)
    pre.add_argument("--engine", choices=("both", *ENGINES), default="both")
    return pre.parse_known_args(argv)[0]


def _requested_threads(argv: list[str]) -> int:
    """--threads, else $OMP_NUM_THREADS, else every CPU."""
    ns = _pre_args(argv)
    if ns.threads is not None:
        return max(1, ns.threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)


# MXNet 1.9 reads OMP_NUM_THREADS once, when it loads; without it, it uses half the CPUs on
# x86 (it assumes hyper-threading), i.e. one thread on a 2-CPU machine.  Set it first so that
# MXNet (and the operator, which runs on MXNet's worker thread) uses the thread count asked for.
# The engine is read at load time too: --engine both (the default) times this process under
# the synchronous engine and a child process under the threaded one.
if __name__ == "__main__" and "mxnet" not in sys.modules:
    os.environ["OMP_NUM_THREADS"] = str(_requested_threads(sys.argv[1:]))
    _engine = _pre_args(sys.argv[1:]).engine
    os.environ["MXNET_ENGINE_TYPE"] = ENGINES["threaded" if _engine == "threaded" else "sync"]

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import quant_ops  # noqa: E402
from quant_ops import reference as ref  # noqa: E402

f32 = np.float32
OP = "Quantization_int8"
RAW = quant_ops.ops.raw_op(mx.nd, OP)

ACT_SHAPE = (64, 256, 28, 28)
WEIGHT_SHAPE = (256, 256, 3, 3)
QUICK_ACT_SHAPE = (16, 64, 28, 28)
QUICK_WEIGHT_SHAPE = (64, 64, 3, 3)
EMA_DECAY = 0.99
# (v + 1.5 * 2^23) - 1.5 * 2^23 rounds v to an integer half to even in float32 arithmetic for
# |v| < 2^22; larger |v| are clipped to [qmin, qmax] right after, so the result is exact.
# (mx.nd.rint rounds halves down and mx.nd.round away from zero: neither is the spec's rint.)
MAGIC = 12582912.0

COLUMNS = ("quant_ops", "quant_ops_prealloc", "copy_floor", "alloc_copy", "composed_nd",
           "torch")


# -- cases ------------------------------------------------------------------------------------

CASES: list[dict[str, Any]] = [
    dict(name="act_infer_fwd", tensor="act", bwd=False, training=False,
         attrs=dict(is_weight=False),
         desc="activation, per-tensor, inference (calibrated range), forward"),
    dict(name="act_train_fwd", tensor="act", bwd=False, training=True,
         attrs=dict(is_weight=False, ema_decay=EMA_DECAY),
         desc="activation, per-tensor, training (EMA range update), forward"),
    dict(name="act_train_fwdbwd", tensor="act", bwd=True, training=True,
         attrs=dict(is_weight=False, ema_decay=EMA_DECAY),
         desc="activation, per-tensor, training, forward+backward"),
    dict(name="w_pt_fwd", tensor="weight", bwd=False, training=True,
         attrs=dict(is_weight=True, is_weight_perchannel=False),
         desc="weight, per-tensor (range = max|w|), forward"),
    dict(name="w_pc_fwd", tensor="weight", bwd=False, training=True,
         attrs=dict(is_weight=True, is_weight_perchannel=True),
         desc="weight, per-channel axis 0 (range = max|w| per channel), forward"),
    dict(name="w_pt_fwdbwd", tensor="weight", bwd=True, training=True,
         attrs=dict(is_weight=True, is_weight_perchannel=False),
         desc="weight, per-tensor, forward+backward"),
    dict(name="w_pc_fwdbwd", tensor="weight", bwd=True, training=True,
         attrs=dict(is_weight=True, is_weight_perchannel=True),
         desc="weight, per-channel, forward+backward"),
]


def _ref_attrs(case) -> ref.Int8Attrs:
    a = case["attrs"]
    return ref.Int8Attrs(is_weight=a.get("is_weight", False),
                         is_weight_perchannel=a.get("is_weight_perchannel", False),
                         ema_decay=a.get("ema_decay", 0.99))


def _per_channel(case) -> bool:
    return bool(case["attrs"].get("is_weight_perchannel", False))


def _qmin(case) -> float:
    return -127.0 if case["attrs"].get("is_weight", False) else -128.0


# -- timing -----------------------------------------------------------------------------------

def measure(fn: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    """Median over `repeats` calls of fn() + mx.nd.waitall(), after `warmup` untimed calls."""
    for _ in range(warmup):
        r = fn()
        mx.nd.waitall()
        del r
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = fn()
        mx.nd.waitall()
        samples.append((time.perf_counter() - t0) * 1e3)
        del r
    return _summary(samples)


def _summary(samples: list[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "samples_ms": [round(s, 5) for s in samples]}


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                        rounds: int = 5) -> dict[str, dict[str, Any]]:
    """Like `measure` for several functions, timed round-robin in `rounds` chunks so that a
    slow spell of the machine hits every column alike rather than one of them."""
    for fn in fns.values():
        for _ in range(warmup):
            r = fn()
            mx.nd.waitall()
            del r
    rounds = max(1, min(rounds, repeats))
    chunks = [repeats // rounds + (1 if i < repeats % rounds else 0) for i in range(rounds)]
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for chunk in chunks:
        for name, fn in fns.items():
            fn()  # untimed: wake this path's threads after the previous column's
            mx.nd.waitall()
            for _ in range(chunk):
                t0 = time.perf_counter()
                r = fn()
                mx.nd.waitall()
                samples[name].append((time.perf_counter() - t0) * 1e3)
                del r
    return {k: _summary(v) for k, v in samples.items()}


# -- implementations --------------------------------------------------------------------------

def initial_state(case, x_np: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(minmax, qstate) before the first call: a calibrated range for activations."""
    channels = x_np.shape[0] if _per_channel(case) else 1
    if case["tensor"] == "act":
        mm = ref.abs_max(x_np)  # calibrated range (PTQ max calibration)
    else:
        mm = np.zeros(channels, dtype=f32)
    return mm.astype(f32), np.array([0.0, 1.0 if case["training"] else 0.0], dtype=f32)


class QuantOps:
    """The fused operator on nd arrays; state arrays are updated in place by the op."""

    def __init__(self, case, x_np, g_np):
        mm, st = initial_state(case, x_np)
        self.case = case
        self.mm, self.st = mx.nd.array(mm), mx.nd.array(st)
        self.x = mx.nd.array(x_np)
        self.g = mx.nd.array(g_np)
        self.attrs = case["attrs"]
        if case["bwd"]:
            self.x.attach_grad(grad_req="write")  # raw op writes dx straight into x.grad
        self.out = None

    def fwd(self):
        return RAW(self.x, self.mm, self.st, **self.attrs, **self._out())

    def fwdbwd(self):
        with autograd.record():
            y = RAW(self.x, self.mm, self.st, **self.attrs, **self._out())
        y.backward(self.g)
        return self.x.grad

    def _out(self):
        return {} if self.out is None else {"out": self.out}

    def fn(self, prealloc: bool = False):
        self.out = mx.nd.zeros(self.x.shape) if prealloc else None
        return self.fwdbwd if self.case["bwd"] else self.fwd


class ComposedND:
    """The same math from stock MXNet nd operators (float32 throughout)."""

    def __init__(self, case, x_np, g_np):
        mm, st = initial_state(case, x_np)
        self.case = case
        self.x = mx.nd.array(x_np)
        self.g = mx.nd.array(g_np)
        self.dx = mx.nd.zeros(x_np.shape)
        self.mm, self.st = mx.nd.array(mm), mx.nd.array(st)
        self.decay = mx.nd.array([EMA_DECAY])
        self.one_minus_decay = mx.nd.array([f32(1) - f32(EMA_DECAY)])
        self.step_inc = mx.nd.array([1.0, 0.0])
        self.qmin = _qmin(case)
        self.bshape = (-1,) + (1,) * (x_np.ndim - 1)

    def _range(self):
        c, x = self.case, self.x
        if c["tensor"] == "weight":
            if _per_channel(c):
                amax = mx.nd.max(mx.nd.abs(x).reshape((x.shape[0], -1)), axis=1)
            else:
                amax = mx.nd.max(mx.nd.abs(x))
            self.mm[:] = amax
        elif c["training"]:
            batch = mx.nd.max(mx.nd.abs(x)).reshape((1,))
            ema = self.mm * self.decay + self.one_minus_decay * batch
            self.mm[:] = mx.nd.where(self.mm > 0, ema, batch)
        if c["training"]:
            self.st += self.step_inc
        return self.mm

    def fwd(self):
        amax = self._range()
        s = (amax / 127.0).reshape(self.bshape if _per_channel(self.case) else (1,) * self.x.ndim)
        v = mx.nd.broadcast_div(self.x, s)
        q = mx.nd.clip((v + MAGIC) - MAGIC, self.qmin, 127.0)
        return mx.nd.broadcast_mul(q, s)

    def fwdbwd(self):
        y = self.fwd()
        self.g.copyto(self.dx)  # straight-through gradient: dx = dy
        return y, self.dx

    def fn(self):
        return self.fwdbwd if self.case["bwd"] else self.fwd


class Torch:
    """torch.fake_quantize_* with the range from torch.aminmax where the case computes one."""

    def __init__(self, torch, case, x_np, g_np):
        mm, st = initial_state(case, x_np)
        self.t, self.case = torch, case
        self.x = torch.from_numpy(x_np.copy())
        self.g = torch.from_numpy(g_np.copy())
        if case["bwd"]:
            self.x.requires_grad_()
        self.mm = torch.from_numpy(mm.copy())
        self.st = torch.from_numpy(st.copy())
        self.qmin = int(_qmin(case))
        self.decay = torch.tensor(EMA_DECAY, dtype=torch.float32)
        self.zp1 = torch.zeros(1, dtype=torch.int32)
        self.zpc = torch.zeros(x_np.shape[0], dtype=torch.int32)

    def fwd(self):
        t, c = self.t, self.case
        with t.no_grad():  # range bookkeeping, as torch's observers do it
            xd = self.x.detach()
            if c["tensor"] == "weight":
                if _per_channel(c):
                    lo, hi = t.aminmax(xd.reshape(xd.shape[0], -1), dim=1)
                else:
                    lo, hi = t.aminmax(xd)
                self.mm.copy_(t.maximum(-lo, hi).reshape(self.mm.shape))
            elif c["training"]:
                lo, hi = t.aminmax(xd)
                batch = t.maximum(-lo, hi)
                ema = self.decay * self.mm + (1 - self.decay) * batch
                self.mm.copy_(t.where(self.mm > 0, ema, batch))
            if c["training"]:
                self.st[0] += 1
            scale = self.mm / 127.0
        if _per_channel(c):
            return t.fake_quantize_per_channel_affine(self.x, scale, self.zpc, 0, self.qmin, 127)
        return t.fake_quantize_per_tensor_affine(self.x, scale, self.zp1, self.qmin, 127)

    def fwdbwd(self):
        self.x.grad = None
        y = self.fwd()
        y.backward(self.g)
        return self.x.grad

    def fn(self):
        return self.fwdbwd if self.case["bwd"] else self.fwd


def copy_fns(x_np, g_np, bwd: bool) -> dict[str, Callable[[], Any]]:
    """Plain copies of the same bytes (one tensor forward, two for forward+backward):
    ``mx_copyto`` / ``np_copyto`` into preallocated arrays (the floor is the faster), and
    ``alloc_copy``, whose forward copy allocates its output as the operator does (the
    backward copy goes into a preallocated array, as the operator's gradient goes into
    x.grad)."""
    x, g = mx.nd.array(x_np), mx.nd.array(g_np)
    ox, og = mx.nd.zeros(x.shape), mx.nd.zeros(g.shape)
    dx, dg = np.empty_like(x_np), np.empty_like(g_np)

    def mx_copy():
        x.copyto(ox)
        if bwd:
            g.copyto(og)

    def np_copy():
        np.copyto(dx, x_np)
        if bwd:
            np.copyto(dg, g_np)

    def alloc_copy():
        y = x.copy()
        if bwd:
            g.copyto(og)
        return y

    return {"copy_mx_copyto": mx_copy, "copy_np_copyto": np_copy, "alloc_copy": alloc_copy}


def dispatch_overhead(repeats: int, warmup: int) -> dict[str, Any]:
    """Per-call fixed cost: each path on a one-element tensor."""
    x = mx.nd.array([0.5])
    mm, st, out = mx.nd.array([1.0]), mx.nd.array([0.0, 0.0]), mx.nd.zeros((1,))
    xn, on = x.asnumpy(), np.empty(1, dtype=f32)
    xl, g = mx.nd.array([0.5]), mx.nd.array([1.0])
    xl.attach_grad()

    def fwdbwd(f):
        def run():
            with autograd.record():
                y = f()
            y.backward(g)
            return xl.grad
        return run

    return {
        "quant_ops_fwdbwd": measure(fwdbwd(lambda: RAW(xl, mm, st)), repeats,
                                    warmup)["median_ms"],
        "mx_identity_fwdbwd": measure(fwdbwd(lambda: mx.nd.identity(xl)), repeats,
                                      warmup)["median_ms"],
        "quant_ops_fwd": measure(lambda: RAW(x, mm, st), repeats, warmup)["median_ms"],
        "quant_ops_fwd_prealloc": measure(lambda: RAW(x, mm, st, out=out), repeats,
                                          warmup)["median_ms"],
        "mx_copyto": measure(lambda: x.copyto(out), repeats, warmup)["median_ms"],
        "mx_abs": measure(lambda: mx.nd.abs(x), repeats, warmup)["median_ms"],
        "np_copyto": measure(lambda: np.copyto(on, xn), repeats, warmup)["median_ms"],
    }


class _Chain(gluon.HybridBlock):
    """``k`` operators in a row inside one hybridized graph."""

    def __init__(self, k: int, kind: str, channels: int, attrs: dict):
        super().__init__()
        self._k, self._kind, self._attrs = k, kind, attrs
        with self.name_scope():
            self.mm = self.params.get("mm", shape=(channels,), init="zeros", grad_req="null")
            self.st = self.params.get("st", shape=(2,), init="zeros", grad_req="null")

    def hybrid_forward(self, F, x, mm, st):  # noqa: N803
        for _ in range(self._k):
            if self._kind == "quant_ops":
                x = F.Quantization_int8(x, mm, st, **self._attrs)
            else:  # MXNet's own cheapest elementwise op of the same size, for comparison
                x = F.abs(x)
        return x


def in_graph_marginal(x_np: np.ndarray, attrs: dict, k: int, repeats: int,
                      warmup: int) -> dict[str, float]:
    """Cost of one more operator inside a hybridized ``static_alloc`` graph: (T(k) - T(1)) /
    (k - 1).  In a network the operator runs this way, so MXNet's per-call Python and engine
    overhead (about 0.1 ms, see dispatch_overhead) is paid once per graph, not per operator."""
    x = mx.nd.array(x_np)
    channels = x_np.shape[0] if attrs.get("is_weight_perchannel") else 1
    res = {}
    for kind in ("quant_ops", "mx_abs"):
        times = []
        for n in (1, k):
            blk = _Chain(n, kind, channels, attrs)
            blk.initialize()
            blk.mm.set_data(mx.nd.full((channels,), float(np.abs(x_np).max())))
            blk.hybridize(static_alloc=True, static_shape=True)
            times.append(measure(lambda: blk(x), repeats, warmup)["median_ms"])
        res[kind] = (times[1] - times[0]) / (k - 1)
    return res


def kernel_alone(x_np: np.ndarray, attrs: dict, repeats: int, warmup: int) -> float:
    """The operator's kernel called directly (ctypes) on numpy arrays: its own work without
    MXNet's per-call cost."""
    import ctypes

    lib = ctypes.CDLL(str(quant_ops.LIBRARY_PATH))
    x = np.ascontiguousarray(x_np, dtype=f32)
    y = np.empty_like(x)
    fp = ctypes.POINTER(ctypes.c_float)
    px, py = x.ctypes.data_as(fp), y.ctypes.data_as(fp)
    if attrs.get("is_weight_perchannel"):
        amax = np.empty(x.shape[0], f32)
        pa = amax.ctypes.data_as(fp)
        inner = ctypes.c_int64(x.size // x.shape[0])
        fn = lambda: lib.qo_kernel_weight_per_channel(px, py, ctypes.c_int64(x.shape[0]),  # noqa: E731
                                                      inner, pa, 8)
    else:
        a = ctypes.c_float(float(np.abs(x).max()))
        fn = lambda: lib.qo_kernel_activation(px, py, ctypes.c_int64(x.size), a, 8)  # noqa: E731
    return measure(fn, repeats, warmup)["median_ms"]


def malloc_keep_freed_memory() -> str:
    """glibc: serve large blocks from the heap and never trim it, so a freed output's pages
    are reused instead of being unmapped and faulted in again."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    # One arena: a thread arena's heaps are at most 64 MiB, so a large block from a worker
    # thread would be mmap'ed whatever the threshold.
    for opt, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30),
                       (m_arena_max, 1)):
        if libc.mallopt(opt, value) != 1:
            raise RuntimeError(f"glibc mallopt({opt}, {value}) failed")
    return "glibc mallopt(M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = 1 GiB, M_ARENA_MAX = 1)"


# -- verification -----------------------------------------------------------------------------

def _with_ties(x: np.ndarray, amax: np.ndarray, axis: int | None, rng) -> np.ndarray:
    """Put exact .5 quotients (x / s = k + 0.5) into a fifth of the elements."""
    x = x.copy()
    s = ref.scale_of(amax, 8)
    s = s.reshape(()) if axis is None else s.reshape((-1,) + (1,) * (x.ndim - 1))
    k = rng.integers(-100, 100, size=x.shape).astype(f32) + f32(0.5)
    tie = (k * np.broadcast_to(s, x.shape)).astype(f32)
    tie_ok = (tie / np.broadcast_to(s, x.shape)) == k  # exact .5 quotient in float32
    pick = (rng.random(x.shape) < 0.2) & tie_ok
    x[pick] = tie[pick]
    return x


def _compare(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    a, b = np.asarray(a, f32), np.asarray(b, f32)
    eq = (a == b) | (np.isnan(a) & np.isnan(b))
    bit = a.view(np.uint32) == b.view(np.uint32)
    return {"equal_fraction": float(eq.mean()), "bitwise_fraction": float(bit.mean()),
            "max_abs_diff": float(np.max(np.abs(a - b))) if a.size else 0.0}


def verify(torch, rng) -> dict[str, Any]:
    """Each forward case on a small sample with exact ties: quant_ops, composed nd and torch
    against quant_ops.reference; also the straight-through gradient of quant_ops."""
    out: dict[str, Any] = {}
    shapes = {"act": (4, 8, 6, 6), "weight": (16, 8, 3, 3)}
    for case in CASES:
        if case["bwd"]:
            continue
        shape = shapes[case["tensor"]]
        x = rng.standard_normal(shape).astype(f32)
        axis = 0 if _per_channel(case) else None
        x = _with_ties(x, ref.abs_max(x, axis), axis, rng)
        mm0, st0 = initial_state(case, x)
        want, want_mm, _ = ref.quantization_int8_forward(x, mm0, st0, _ref_attrs(case))
        g = rng.standard_normal(shape).astype(f32)
        res: dict[str, Any] = {"shape": list(shape)}

        q = QuantOps(case, x, g)
        res["quant_ops"] = _compare(q.fwd().asnumpy(), want)
        res["quant_ops_minmax_equal"] = bool(np.array_equal(q.mm.asnumpy(), want_mm))
        qb = QuantOps(dict(case, bwd=True), x, g)
        qb.fwdbwd()
        res["quant_ops_grad_is_dy"] = bool(np.array_equal(qb.x.grad.asnumpy(), g))

        c = ComposedND(case, x, g)
        res["composed_nd"] = _compare(c.fwd().asnumpy(), want)
        res["composed_nd_minmax_equal"] = bool(np.array_equal(c.mm.asnumpy(), want_mm))
        if torch is not None:
            t = Torch(torch, case, x, g)
            with torch.no_grad():
                res["torch"] = _compare(t.fwd().numpy(), want)
        out[case["name"]] = res
    return out


# -- main -------------------------------------------------------------------------------------

def openmp_threads() -> int | None:
    """omp_get_max_threads() of the OpenMP runtime loaded in this process (MXNet sets it on
    the main thread to the count its workers use), or None when none can be found."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f
                    if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    for lib in sorted(libs):
        name = os.path.basename(lib)
        if name.startswith(("libgomp", "libiomp", "libomp")):
            try:
                return int(ctypes.CDLL(lib).omp_get_max_threads())
            except (OSError, AttributeError):
                continue
    return None


def import_torch(threads: int):
    try:
        import torch
    except Exception as e:  # noqa: BLE001  (any import failure skips the column)
        return None, f"torch column skipped: import torch failed ({type(e).__name__}: {e})"
    torch.set_num_threads(threads)
    return torch, None


def ratio(a, b):
    return (a / b) if (a is not None and b is not None and b > 0) else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, file=sys.stdout):
    head = ["case", "quant_ops", "qo prealloc", "copy floor", "alloc copy", "composed nd",
            "torch", "qo/copy", "qo_pre/copy", "qo/mx_copy", "nd/qo", "torch/qo"]
    lines = []
    for r in rows:
        ms, rt = r["ms"], r["ratios"]
        lines.append([r["case"], *(fmt(ms[k], ".3f") for k in COLUMNS),
                      fmt(rt["quant_ops/copy"], ".2f"), fmt(rt["quant_ops_prealloc/copy"], ".2f"),
                      fmt(rt["quant_ops/mx_copyto"], ".2f"),
                      fmt(rt["composed/quant_ops"], ".1f"), fmt(rt["torch/quant_ops"], ".1f")])
    print_columns(head, lines, left=1, file=file)


def print_columns(head: list[str], lines: list[list[str]], left: int, file=sys.stdout) -> None:
    """A text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    for cells in [head, ["-" * w for w in widths], *lines]:
        print("  ".join(c.ljust(w) if i < left else c.rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths))), file=file)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


ENGINE_NOTES = {
    "NaiveEngine": "synchronous: each MXNet operator runs in the calling thread, as numpy and "
                   "torch do, so a timing is the operator's kernel plus MXNet's dispatch",
    "ThreadedEnginePerDevice": "MXNet's default: a worker thread runs each operator and every "
                               "timed call waits for it, so a timing also holds the hand-over "
                               "between threads (MXNet's own copyto pays it too)",
}
# Issue 2's speed targets, for the summary: forward within 2x of the copy floor, >= 10x faster
# than the composed nd ops, >= 5x faster than torch's fake-quant kernels.
TARGET_CASES = ("act_infer_fwd", "w_pc_fwd")


def engine_type() -> str:
    return os.environ.get("MXNET_ENGINE_TYPE") or "ThreadedEnginePerDevice"


def run_threaded_child(args) -> dict[str, Any] | None:
    """The same bench under MXNet's threaded engine, in a child process (the engine is chosen
    when mxnet loads); its table prints as it runs and its JSON is returned."""
    import subprocess

    fd, tmp = tempfile.mkstemp(prefix=".bench_ops_threaded.", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", "threaded",
           "--out", tmp, "--seed", str(args.seed)]
    for flag, on in (("--quick", args.quick), ("--no-torch", args.no_torch),
                     ("--no-malloc-tuning", not args.malloc_tuned)):
        if on:
            cmd.append(flag)
    for flag, value in (("--repeats", args.repeats), ("--weight-repeats", args.weight_repeats),
                        ("--warmup", args.warmup), ("--threads", args.threads),
                        ("--cases", args.cases)):
        if value is not None:
            cmd += [flag, str(value)]
    print("\n===== the same cases under MXNet's threaded engine (child process) =====",
          flush=True)
    try:
        proc = subprocess.run(cmd, env=dict(os.environ, MXNET_ENGINE_TYPE=ENGINES["threaded"]))
        if proc.returncode != 0:
            print(f"note: the threaded-engine run failed (exit {proc.returncode})")
            return None
        with open(tmp) as f:
            return json.load(f)
    finally:
        Path(tmp).unlink(missing_ok=True)


def print_summary(result: dict[str, Any], file=sys.stdout) -> None:
    """Both engines' ratios side by side, the issue's target cases first."""
    runs = [(result["machine"]["mxnet_engine"], result)]
    if "threaded_engine" in result:
        runs.append((result["threaded_engine"]["machine"]["mxnet_engine"],
                     result["threaded_engine"]))
    print("\n===== summary: ratios under each engine (targets for act_infer_fwd and w_pc_fwd: "
          "qo/copy <= 2, nd/qo >= 10, torch/qo >= 5) =====", file=file)
    head = ["case", "engine", "qo/copy", "qo/mx_copy", "nd/qo", "torch/qo", "in-graph qo/copy"]
    lines = []
    names = [r["case"] for r in result["rows"]]
    names = [n for n in TARGET_CASES if n in names] + [n for n in names if n not in TARGET_CASES]
    for name in names:
        for engine, run in runs:
            row = next((r for r in run["rows"] if r["case"] == name), None)
            if row is None:
                continue
            rt = row["ratios"]
            graph = next((g for g in run.get("in_graph_marginal", []) if g["case"] == name),
                         None)
            lines.append([name, engine, fmt(rt["quant_ops/copy"], ".2f"),
                          fmt(rt["quant_ops/mx_copyto"], ".2f"),
                          fmt(rt["composed/quant_ops"], ".1f"),
                          fmt(rt["torch/quant_ops"], ".1f"),
                          fmt(graph and graph["quant_ops/copy"], ".2f")])
    print_columns(head, lines, left=2, file=file)
    for engine, run in runs:
        print(f"  {engine}: {ENGINE_NOTES.get(engine, '')}", file=file)
        handover = run.get("dispatch_overhead_ms", {}).get("mx_copyto")
        floor = next((r["ms"]["copy_floor"] for r in run["rows"] if r["case"] == "w_pc_fwd"),
                     None)
        if handover is not None and floor:
            print(f"    MXNet's own per-call cost here (copyto of a one-element array): "
                  f"{handover:.4f} ms = {handover / floor:.2f}x the weight's copy floor",
                  file=file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"small tensors {QUICK_ACT_SHAPE} / {QUICK_WEIGHT_SHAPE} and few repeats "
                        "(smoke test)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement on the activation tensor (default 20; "
                        "5 with --quick)")
    p.add_argument("--weight-repeats", type=int, default=None,
                   help="timed calls on the (small) weight tensor (default 10 x --repeats)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls first (default 3; 1 with --quick)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch column")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuned", action="store_false",
                   help="leave glibc's defaults: every large output (of every column) is "
                        "then fresh pages that fault in on first write, which swamps the "
                        "kernels being compared (default: keep freed memory in the heap)")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads for MXNet (via OMP_NUM_THREADS, set before mxnet "
                        "loads) and torch.set_num_threads (default: $OMP_NUM_THREADS, else all "
                        "CPUs)")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of: " + ", ".join(c["name"] for c in CASES))
    p.add_argument("--engine", choices=("both", *ENGINES), default="both",
                   help="MXNet engine to time under: 'sync' (NaiveEngine: each operator runs "
                        "in the calling thread, as numpy and torch do), 'threaded' (MXNet's "
                        "default: a worker thread runs it and each timed call waits for it), "
                        "or 'both' (default: sync here, threaded in a child process, and a "
                        "summary of the two)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bench_ops.json",
                   help="JSON output path (default bench/results/bench_ops.json)")
    args = p.parse_args(argv)

    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 20)
    w_repeats = args.weight_repeats if args.weight_repeats is not None else 10 * repeats
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if repeats < 1 or w_repeats < 1 or warmup < 0:
        p.error("--repeats and --weight-repeats must be >= 1, --warmup >= 0")
    cases = CASES
    if args.cases:
        want = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(want) - {c["name"] for c in CASES})
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}")
        cases = [c for c in CASES if c["name"] in want]
    act_shape = QUICK_ACT_SHAPE if args.quick else ACT_SHAPE
    w_shape = QUICK_WEIGHT_SHAPE if args.quick else WEIGHT_SHAPE

    cpus = os.cpu_count() or 1
    mx_threads = openmp_threads()  # before torch.set_num_threads touches the shared runtime
    threads = mx_threads or args.threads or cpus
    notes = []
    if args.malloc_tuned:
        notes.append("malloc tuned: " + malloc_keep_freed_memory())
    torch = None
    if args.no_torch:
        notes.append("torch column skipped: --no-torch")
    else:
        torch, why = import_torch(threads)
        if why:
            notes.append(why)

    rng = np.random.default_rng(args.seed)
    tensors = {
        "act": (rng.standard_normal(act_shape).astype(f32),
                rng.standard_normal(act_shape).astype(f32)),
        "weight": ((rng.standard_normal(w_shape) * 0.05).astype(f32),
                   rng.standard_normal(w_shape).astype(f32)),
    }

    machine = {
        "cpu_count": cpus,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mxnet": mx.__version__,
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "quant_ops": quant_ops.__version__,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "mxnet_omp_threads": mx_threads,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "malloc_tuned": args.malloc_tuned,
        "mxnet_engine": engine_type(),
    }
    print(f"machine: {cpus} CPUs ({machine['processor']}), python {machine['python']}, "
          f"mxnet {mx.__version__}, numpy {np.__version__}, torch {machine['torch']}")
    print(f"threads: MXNet/quant_ops OpenMP {mx_threads} (OMP_NUM_THREADS="
          f"{machine['omp_num_threads_env']}), torch set_num_threads({threads}) -> "
          f"{machine['torch_threads']}; numpy copies are single-threaded")
    print(f"tensors: activation {act_shape}, weight {w_shape}; median of {repeats} "
          f"(activation) / {w_repeats} (weight) calls after {warmup} warm-up calls")
    print(f"engine: {machine['mxnet_engine']} ({ENGINE_NOTES.get(machine['mxnet_engine'], '')})")
    for n in notes:
        print("note:", n)

    sys.stdout.flush()
    verification = verify(torch, np.random.default_rng(args.seed + 1))
    print("\nverification against quant_ops.reference (small sample with exact .5 ties), "
          "fraction of equal elements:")
    for name, v in verification.items():
        parts = [f"quant_ops {v['quant_ops']['equal_fraction']:.4f}",
                 f"composed nd {v['composed_nd']['equal_fraction']:.4f}"]
        if "torch" in v:
            parts.append(f"torch {v['torch']['equal_fraction']:.4f}")
        parts.append(f"range equal: qo {v['quant_ops_minmax_equal']}, "
                     f"nd {v['composed_nd_minmax_equal']}; qo grad == dy: "
                     f"{v['quant_ops_grad_is_dy']}")
        print(f"  {name:14s} " + ", ".join(parts))

    rows = []
    for case in cases:
        x_np, g_np = tensors[case["tensor"]]
        n = repeats if case["tensor"] == "act" else w_repeats
        fns = {"quant_ops": QuantOps(case, x_np, g_np).fn(),
               "quant_ops_prealloc": QuantOps(case, x_np, g_np).fn(prealloc=True),
               **copy_fns(x_np, g_np, case["bwd"]),
               "composed_nd": ComposedND(case, x_np, g_np).fn()}
        if torch is not None:
            fns["torch"] = Torch(torch, case, x_np, g_np).fn()
        t: dict[str, Any] = measure_interleaved(fns, n, warmup)
        best = min(("copy_mx_copyto", "copy_np_copyto"), key=lambda k: t[k]["median_ms"])
        t["copy_floor"] = dict(t[best], method=best)
        ms = {k: (t[k]["median_ms"] if k in t else None) for k in COLUMNS}
        rows.append({
            "case": case["name"], "desc": case["desc"], "shape": list(x_np.shape),
            "bytes": int(x_np.nbytes), "backward": case["bwd"], "repeats": n,
            "attrs": case["attrs"], "ms": ms,
            "ratios": {"quant_ops/copy": ratio(ms["quant_ops"], ms["copy_floor"]),
                       "quant_ops_prealloc/copy": ratio(ms["quant_ops_prealloc"],
                                                        ms["copy_floor"]),
                       "quant_ops/mx_copyto": ratio(ms["quant_ops"],
                                                    t["copy_mx_copyto"]["median_ms"]),
                       "composed/quant_ops": ratio(ms["composed_nd"], ms["quant_ops"]),
                       "torch/quant_ops": ratio(ms["torch"], ms["quant_ops"])},
            "timings": t,
        })
        print(f"  measured {case['name']}", file=sys.stderr, flush=True)
        sys.stdout.flush()

    overhead = dispatch_overhead(max(50, w_repeats), warmup)
    in_graph = []
    for case in (c for c in cases if c["name"] in ("act_infer_fwd", "w_pc_fwd")):
        x_np = tensors[case["tensor"]][0]
        k = 4 if case["tensor"] == "act" else 21
        n = repeats if case["tensor"] == "act" else w_repeats
        m = in_graph_marginal(x_np, case["attrs"], k, n, warmup)
        m["kernel_alone"] = kernel_alone(x_np, case["attrs"], n, warmup)
        floor = next(r for r in rows if r["case"] == case["name"])["ms"]["copy_floor"]
        in_graph.append({"case": case["name"], "chain": k, "ms": m, "copy_floor": floor,
                         "quant_ops/copy": ratio(m["quant_ops"], floor),
                         "kernel_alone/copy": ratio(m["kernel_alone"], floor),
                         "mx_abs/quant_ops": ratio(m["mx_abs"], m["quant_ops"])})
    sys.stderr.flush()
    print("\nmedian milliseconds (copy floor: fastest of mx copyto / np.copyto into "
          "preallocated arrays; fwd+bwd rows copy two tensors):")
    print_table(rows)
    if in_graph:
        print("\nforward cost inside a hybridized static_alloc graph (marginal ms per operator) "
              "and of the kernel alone (ctypes, no MXNet):")
        for r in in_graph:
            print(f"  {r['case']:<14} quant_ops {r['ms']['quant_ops']:.4f}  copy floor "
                  f"{r['copy_floor']:.4f}  qo/copy {fmt(r['quant_ops/copy'], '.2f')}  "
                  f"kernel {r['ms']['kernel_alone']:.4f} (kernel/copy "
                  f"{fmt(r['kernel_alone/copy'], '.2f')})  "
                  f"mx.abs {r['ms']['mx_abs']:.4f} (mx.abs/qo "
                  f"{fmt(r['mx_abs/quant_ops'], '.2f')})")
    print("\nper-call fixed cost, one-element tensor (ms): " +
          ", ".join(f"{k} {v:.4f}" for k, v in overhead.items()))
    result = {
        "schema": 1, "machine": machine,
        "config": {"quick": args.quick, "repeats_act": repeats, "repeats_weight": w_repeats,
                   "warmup": warmup, "seed": args.seed, "act_shape": list(act_shape),
                   "weight_shape": list(w_shape), "columns": list(COLUMNS)},
        "notes": notes + [
            "quant_ops: raw operator (no leaf-copy wrapper); fwd+bwd records with "
            "mx.autograd on a leaf with grad_req='write'",
            "composed_nd: divide, (v + 1.5*2^23) - 1.5*2^23 (round half to even), clip, "
            "multiply, plus the range ops; backward = copy of dy (straight-through)",
            "torch: range by torch.aminmax (no_grad) + torch.fake_quantize_*; its backward "
            "masks dy outside the clip range",
            "quant_ops_prealloc: the operator with out= a preallocated array; alloc_copy: "
            "NDArray.copy(), which allocates like the operator: MXNet 1.9's CPU storage is "
            "not pooled, so an output above glibc's mmap threshold (32 MiB at most) is fresh "
            "pages that fault in on first write (see --no-malloc-tuning)",
            "threads: MXNet 1.9 uses OMP_NUM_THREADS when set, else half the CPUs on x86; "
            "this script sets OMP_NUM_THREADS from --threads before mxnet loads",
        ],
        "verification": verification,
        "dispatch_overhead_ms": overhead,
        "in_graph_marginal": in_graph,
        "rows": rows,
    }
    if args.engine == "both":
        child = run_threaded_child(args)
        if child is not None:
            result["threaded_engine"] = child
        print_summary(result)
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
