"""NumPy reference of ``GDRQ``: the executable spec of operator_cxx/kernels/gdrq.h.

GDRQ (Yu et al., "Low-bit Quantization Needs Good Distribution" / "GDRQ: Group-based
Distribution Reshaping for Quantization", arXiv:1908.01477) reshapes weights and activations
towards a uniform-like distribution by clipping them at a multiple of their own scale
(Scale-Clip, section 3.3), per group of filters (Group-based Quantization, section 3), then
quantizes the clipped values uniformly.  The operator follows the seed toolkit's
``_contrib_GDRQ`` (XiaotaoChen/mx_quant_op, ``operator_cxx/contrib/GDRQ-inl.h``), whose
attributes it keeps:

* ``nbits`` (4): ``L = 2^nbits - 1`` levels each side of 0, codes ``-L..L`` (the seed's
  ``QUANT_LEVEL``): an unsigned ``nbits``-bit grid for ReLU outputs, ``nbits + 1`` signed
  bits for weights (``nbits=1`` is ternary);
* ``group_size`` (-1): -1 is one clip value for the tensor; ``g`` groups ``g`` consecutive
  channels, a weight's output channels (axis 0) or an activation's channels (axis 1), each
  group with its own clip value (``alpha`` of shape ``(C / g,)``);
* ``ktimes`` (2): Scale-Clip threshold ``t = ktimes * mean(|x|)`` over the group;
* ``is_weight`` (False): a weight's clip value is ``t`` itself, recomputed in every forward;
  an activation's clip value moves towards ``t`` in training:
  ``alpha <- alpha - lamda * (alpha - t)`` (``lamda``, 0.001);
* ``fix_alpha`` (False): keep the stored clip value (weights too);
* ``do_quant`` (False): in training, False outputs the clipped float value (the reshaping
  stage of the paper's pipeline), True quantizes; inference always quantizes;
* ``grad_mode`` ("ste"): weights pass the gradient straight through with "ste" and through
  the clip's gradient (1 on ``[-alpha, alpha]``, else 0) with "clip"; activations always get
  the clip's gradient.

Numerics (float32, in this order; ``np.rint`` rounds half to even)::

    t     = f32(ktimes) * f32(sum|x| / count)     (sum in float64, fixed order; NaN counts 0)
    alpha = t                                     (weights)
    alpha = alpha - lamda * (alpha - t)           (activations, training; t if alpha !> 0)
    c     = x > a ? a : (x < -a ? -a : x)         (mshadow_op::clip, as the seed)
    s     = alpha / L
    q     = clip(rint(c / s), -L, L) + 0          # + 0: code 0 is +0
    y     = q * s                                 (+0 where s is not in (0, FLT_MAX]; NaN stays)

Where this departs from the seed (line numbers: GDRQ-inl.h at commit 7eae84f):

* the moving clip value uses ``alpha - lamda * (alpha - t)``; the seed wrote
  ``alpha + lamda * (alpha - t)`` (GDRQ-inl.h line 200), which moves alpha *away* from
  ``t`` by a factor ``1 + lamda`` per step (its fixed point is repelling);
* an activation's clip value is frozen in inference (the seed updated it in every forward,
  also in inference), and a clip value that is not > 0 is taken as uninitialized (-> ``t``);
* the clip gradient is two-sided, ``-alpha <= x <= alpha`` (the seed's Python prototype and
  the paper); the seed's C++ (lines 263-265) misplaces a parenthesis so that values below
  ``-alpha`` pass their gradient;
* rounding is half to even (seed: half away from zero), ``s = alpha / L`` divided (seed:
  ``alpha * f32(1/L)``), the mean is summed in float64 (seed: a float32 reduction);
* any rank is accepted (seed: 2-D and 4-D data) and ``group_size`` works (seed's C++:
  CHECK-failed at forward; the grouping follows its Python prototype ``GDRQ_PY``).

The sum of ``|x|`` is taken in a fixed order so that the C++ result equals this one bit for
bit: a group's elements form rows (the tensor viewed as (outer, groups, inner)); a row is cut
into chunks of ``SUM_CHUNK`` elements; within a chunk lane j of ``SUM_LANES`` sums elements
j, j+8, ... in order from 0; a chunk adds its lanes in order, a row its chunks, a group its
rows (each from 0.0); then ``mean = f32(total / count)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

f32 = np.float32
SUM_CHUNK = 4096
SUM_LANES = 8
NBITS_RANGE = (1, 16)
FLT_MAX = np.finfo(f32).max


@dataclass(frozen=True)
class GDRQAttrs:
    """Attributes of ``GDRQ`` (names and defaults of the seed toolkit)."""

    nbits: int = 4
    group_size: int = -1
    is_weight: bool = False
    lamda: float = 0.001
    do_quant: bool = False
    fix_alpha: bool = False
    ktimes: float = 2.0
    grad_mode: str = "ste"

    def __post_init__(self):
        if not NBITS_RANGE[0] <= self.nbits <= NBITS_RANGE[1]:
            raise ValueError(f"GDRQ: nbits={self.nbits} is out of range {list(NBITS_RANGE)}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"GDRQ: group_size={self.group_size} must be -1 or > 0")
        if not 0 <= self.lamda <= 1:
            raise ValueError(f"GDRQ: lamda={self.lamda} is out of range [0, 1]")
        if not (self.ktimes > 0 and np.isfinite(self.ktimes)):
            raise ValueError(f"GDRQ: ktimes={self.ktimes} must be a positive number")
        if self.grad_mode not in ("ste", "clip"):
            raise ValueError(f"GDRQ: grad_mode={self.grad_mode!r} must be 'ste' or 'clip'")

    @property
    def axis(self) -> int | None:
        """The grouped channel axis, or None for one group."""
        if self.group_size == -1:
            return None
        return 0 if self.is_weight else 1

    @property
    def pass_all(self) -> bool:
        """Whether the gradient passes everywhere (weights with grad_mode 'ste')."""
        return self.is_weight and self.grad_mode == "ste"

    def as_kwargs(self) -> dict:
        return dict(nbits=self.nbits, group_size=self.group_size, is_weight=self.is_weight,
                    lamda=self.lamda, do_quant=self.do_quant, fix_alpha=self.fix_alpha,
                    ktimes=self.ktimes, grad_mode=self.grad_mode)


def levels(nbits: int) -> np.float32:
    """L = 2^nbits - 1: codes run from -L to L."""
    return f32(2 ** nbits - 1)


def view(shape, attrs: GDRQAttrs) -> tuple[int, int, int]:
    """(outer, groups, inner): the tensor as rows, one clip value per group."""
    n = int(np.prod(shape, dtype=np.int64))
    if attrs.axis is None:
        return 1, 1, n
    ax = attrs.axis
    if ax >= len(shape) or shape[ax] % attrs.group_size:
        raise ValueError(f"GDRQ: group_size={attrs.group_size} does not fit data of shape "
                         f"{tuple(shape)}")
    outer = int(np.prod(shape[:ax], dtype=np.int64))
    inner = int(np.prod(shape[ax + 1:], dtype=np.int64))
    return outer, shape[ax] // attrs.group_size, inner * attrs.group_size


def num_groups(shape, attrs: GDRQAttrs) -> int:
    return view(shape, attrs)[1]


def _rows(a: np.ndarray, attrs: GDRQAttrs) -> np.ndarray:
    """(outer, groups, inner) view of a tensor (memory order)."""
    return a.reshape(view(a.shape, attrs))


def _alpha(alpha, shape, attrs: GDRQAttrs) -> np.ndarray:
    a = np.array(alpha, dtype=f32).reshape(-1)
    g = num_groups(shape, attrs)
    if a.size != g:
        raise ValueError(f"GDRQ: alpha must have shape ({g},), got {np.shape(alpha)}")
    return a


def abs_sums(x, attrs: GDRQAttrs = GDRQAttrs()) -> np.ndarray:
    """float64 sum of |x| per group (NaN counts as 0) in the kernel's fixed order."""
    x = np.asarray(x, dtype=f32)
    rows = _rows(x, attrs)
    outer, groups, inner = rows.shape
    a = np.abs(rows.astype(np.float64))
    a = np.where(np.isnan(a), 0.0, a)
    chunks = max(1, -(-inner // SUM_CHUNK))
    pad = np.zeros((outer, groups, chunks * SUM_CHUNK))
    pad[:, :, :inner] = a
    lanes = np.cumsum(pad.reshape(outer, groups, chunks, SUM_CHUNK // SUM_LANES, SUM_LANES),
                      axis=3)[:, :, :, -1, :]                      # (outer, groups, chunks, 8)
    zeros = np.zeros(lanes.shape[:-1] + (1,))
    chunk_sums = np.cumsum(np.concatenate([zeros, lanes], axis=-1), axis=-1)[..., -1]
    zeros = np.zeros(chunk_sums.shape[:-1] + (1,))
    row_sums = np.cumsum(np.concatenate([zeros, chunk_sums], axis=-1), axis=-1)[..., -1]
    zeros = np.zeros((1, groups))
    return np.cumsum(np.concatenate([zeros, row_sums], axis=0), axis=0)[-1]   # (groups,)


def threshold(x, attrs: GDRQAttrs = GDRQAttrs()) -> np.ndarray:
    """Scale-Clip threshold per group: t = f32(ktimes) * f32(sum|x| / count), shape (G,)."""
    x = np.asarray(x, dtype=f32)
    outer, _, inner = view(x.shape, attrs)
    mean = (abs_sums(x, attrs) / np.float64(outer * inner)).astype(f32)
    return (f32(attrs.ktimes) * mean).astype(f32)


def moving_alpha(alpha, t, lamda) -> np.ndarray:
    """alpha - lamda * (alpha - t) in float32; an alpha not > 0 takes t."""
    alpha, t = np.asarray(alpha, dtype=f32), np.asarray(t, dtype=f32)
    with np.errstate(invalid="ignore", over="ignore"):
        moved = (alpha - (f32(lamda) * (alpha - t)).astype(f32)).astype(f32)
    return np.where(alpha > 0, moved, t).astype(f32)


def update_alpha(x, alpha, training: bool, attrs: GDRQAttrs = GDRQAttrs()) -> np.ndarray:
    """The clip values after the forward: weights t (every forward), activations the moving
    value (training only); unchanged with fix_alpha, for activations in inference, and for
    empty data."""
    x = np.asarray(x, dtype=f32)
    alpha = _alpha(alpha, x.shape, attrs)
    if attrs.fix_alpha or not (attrs.is_weight or training) or x.size == 0:
        return alpha
    t = threshold(x, attrs)
    return t if attrs.is_weight else moving_alpha(alpha, t, attrs.lamda)


def clip(x, alpha, attrs: GDRQAttrs = GDRQAttrs()) -> np.ndarray:
    """c = x > a ? a : (x < -a ? -a : x), per group (mshadow_op::clip)."""
    x = np.asarray(x, dtype=f32)
    a = _alpha(alpha, x.shape, attrs).reshape(1, -1, 1)  # against the (outer, G, inner) view
    r = _rows(x, attrs)
    with np.errstate(invalid="ignore"):
        c = np.where(r > a, a, np.where(r < -a, -a, r)).astype(f32)
    return c.reshape(x.shape)


def quantize(x, alpha, attrs: GDRQAttrs = GDRQAttrs()) -> np.ndarray:
    """The clipped value on the grid of step alpha / L: clip(rint(c / s), -L, L) * s."""
    x = np.asarray(x, dtype=f32)
    alpha = _alpha(alpha, x.shape, attrs)
    lv = levels(attrs.nbits)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        s = (alpha / lv).astype(f32).reshape(1, -1, 1)
        ok = (s > 0) & (s <= FLT_MAX)
        safe = np.where(ok, s, f32(1))
        c = _rows(clip(x, alpha, attrs), attrs)
        q = np.clip(np.rint(c / safe), -lv, lv).astype(f32) + f32(0)
        r = _rows(x, attrs)
        y = np.where(ok, q * safe, np.where(np.isnan(r), r, f32(0))).astype(f32)
    return y.reshape(x.shape)


def gdrq_forward(x, alpha, qstate, attrs: GDRQAttrs = GDRQAttrs()):
    """Forward of ``GDRQ``; returns ``(y, new_alpha, new_qstate)``.

    ``qstate = [step, training]``: training forwards count a step.  The clip values are
    updated first and the output uses the updated ones."""
    x = np.asarray(x, dtype=f32)
    qstate = np.array(qstate, dtype=f32).reshape(-1)
    training = bool(qstate[1] > 0.5)
    alpha = update_alpha(x, alpha, training, attrs)
    if training and not attrs.do_quant:
        y = clip(x, alpha, attrs)
    else:
        y = quantize(x, alpha, attrs)
    if training:
        qstate[0] = qstate[0] + f32(1)
    return y, alpha, qstate


def gdrq_backward(grad, x, alpha, attrs: GDRQAttrs = GDRQAttrs()) -> np.ndarray:
    """Gradient w.r.t. data given the clip values the forward used (the state after it):
    straight through where -alpha <= x <= alpha, 0 elsewhere (NaN x: 0); weights with
    grad_mode 'ste' pass it everywhere."""
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    if attrs.pass_all:
        return grad.copy()
    a = _alpha(alpha, x.shape, attrs).reshape(1, -1, 1)  # against the (outer, G, inner) view
    r = _rows(x, attrs)
    with np.errstate(invalid="ignore"):
        inside = (r >= -a) & (r <= a)
    return np.where(inside, _rows(grad, attrs), f32(0)).astype(f32).reshape(x.shape)


# -- functions for derivative checks ------------------------------------------------------

def clip_f64(x, alpha, attrs: GDRQAttrs = GDRQAttrs()) -> np.ndarray:
    """The Scale-Clip reshaping in float64: the function whose exact derivative in x the
    clip-mode gradient is (away from x = +-alpha)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64).reshape(1, -1, 1)
    r = x.reshape(view(x.shape, attrs))
    return np.clip(r, -a, a).reshape(x.shape)


def threshold_penalty(alpha, t) -> float:
    """P(alpha) = 1/2 * sum_g (alpha_g - t_g)^2 in float64: the activation update is one
    gradient-descent step of size lamda on it, alpha - lamda * dP/dalpha, so t is the
    attracting fixed point (the seed's + sign was a step of gradient ascent)."""
    d = np.asarray(alpha, dtype=np.float64) - np.asarray(t, dtype=np.float64)
    return float(0.5 * np.sum(d * d))
