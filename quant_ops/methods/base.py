"""What a quantization method is, as every pipeline stage needs to know it.

A :class:`Method` describes one operator of the library: its inputs after ``data`` and their
roles (learned by SGD, or state the operator keeps), its bit range, whether it can keep one
scale per channel, the policy parameters it takes and how they become operator attributes,
how its inputs start (from the weights, from a calibrated range), the domain each learned
input is projected back into, its optimizer multipliers, and its ONNX QDQ form.  Policy
validation, graph insertion, the nd/sym front, calibration, training and export read these
fields; none of them names a method.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NoReturn

import numpy as np

from ..graph.ir import flag  # noqa: F401  (part of this module's API)

from ..errors import QuantOpsError

f32 = np.float32
ROLES = ("weight", "activation")
#: the state input ``[step, training]`` by which an operator knows its mode (MXNet's
#: external-operator API does not pass ``is_train``); every method that has one names it so
MODE_INPUT = "qstate"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite real number (an infinite or NaN policy value is a mistake, never a setting)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def attr_str(v: Any) -> str:
    """A value as an MXNet attribute string (booleans as ``True``/``False``)."""
    return ("True" if v else "False") if isinstance(v, bool) else str(v)


@dataclass(frozen=True)
class Param:
    """A policy parameter: its check, what it must be (for the error message), and whether
    it is an operator attribute (else it only sets an input's starting value)."""

    check: Callable[[Any], bool]
    what: str
    attr: bool = True
    roles: tuple[str, ...] = ("weight", "activation")   # the roles it may be set for


def boolean() -> Param:
    return Param(lambda v: isinstance(v, bool), "true or false")


def choice(*options: str) -> Param:
    return Param(lambda v: isinstance(v, str) and v in options,
                 " or ".join(repr(o) for o in options))


def positive(what: str, attr: bool = False) -> Param:
    return Param(lambda v: is_num(v) and v > 0, what, attr)


@dataclass(frozen=True)
class Input:
    """An operator input after ``data``.

    ``role``: ``learned`` (a trained parameter: gradient written by the operator) or
    ``state`` (kept by the operator, an auxiliary state, never differentiated).
    ``shape``: ``channels`` (one value per channel, 1 per tensor), a fixed size, or ``one``.
    ``rank``: the shape MXNet is told before inference (MXNet 1.9.1 overflows a buffer when
    an external operator's input has unknown rank); ``(0,)`` is one dimension of unknown size.
    ``domain``: (low, high) that a learned value is projected back into after each step.
    """

    name: str
    role: str
    shape: str | int = "one"
    rank: str = "(1,)"
    domain: tuple[float | None, float | None] | None = None

    def __post_init__(self) -> None:
        if self.role not in ("learned", "state"):
            raise ValueError(f"input {self.name}: role must be 'learned' or 'state'")

    @property
    def learned(self) -> bool:
        return self.role == "learned"

    def size(self, channels: int) -> int:
        if self.shape == "channels":
            return channels
        return 1 if self.shape == "one" else int(self.shape)


@dataclass(frozen=True)
class QDQ:
    """ONNX QuantizeLinear/DequantizeLinear form of a quantizer: scale (float32, per axis or
    a scalar), whether its codes are signed, whether it is per axis, and whether the codes
    stop at -qmax (narrow: QuantizeLinear saturates at -qmax - 1, so the export clips first)."""

    scale: np.ndarray
    signed: bool
    per_axis: bool
    narrow: bool = False


# -- import from the seed toolkit ----------------------------------------------------------
#
# The seed toolkit (XiaotaoChen/mx_quant_op) built its quantizers into a custom MXNet as
# ``_contrib_<Op>`` operators, and prototyped some as Python ``Custom`` operators.  Each
# method says which of them it takes (``Method.seed_ops``, keyed ``_contrib_X`` or
# ``Custom:<op_type>``) and how (``Method.from_seed``); quant_ops/graph/seed.py walks the
# graph, asks the registry, and rebuilds the nodes from what the hook returns.

_SEED_INT = re.compile(r"[+-]?\d+")
_SEED_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_SEED_BOOL = {"true": True, "1": True, "false": False, "0": False}  # dmlc: case-insensitive


@dataclass(frozen=True)
class SeedInput:
    """One input of a seed quantizer after ``data``, as the seed graph and checkpoint hold it.

    ``role``: the seed operator's name for it (``minmax``, ``gamma``, ``alpha``, ...);
    ``name``: the node feeding it; ``value``: its stored array (None when no params were
    given or they lack it); ``shape``: its declared ``__shape__``."""

    role: str
    name: str
    is_var: bool
    value: np.ndarray | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SeedState:
    """Where one input (after ``data``) of the converted operator comes from.

    ``seed``: the position in :attr:`SeedNode.inputs` whose variable it keeps (its name and
    stored array stay); None: a new variable ``<node>_<input>``.  ``shape``: the variable's
    ``__shape__`` (None: left as it is).  ``value``: an array written into the params under
    the variable's name (a new variable's starting value, or a stored one re-made)."""

    seed: int | None = None
    shape: tuple[int, ...] | None = None
    value: np.ndarray | None = None


@dataclass(frozen=True)
class SeedMapped:
    """What a seed node becomes: this method's operator with ``attrs`` (strings), each input
    after ``data`` (all of the method's, in any order) from ``inputs``."""

    attrs: dict
    inputs: dict


class SeedNode:
    """One node of a seed graph, as a method's :meth:`Method.from_seed` sees it: its
    attributes (MXNet's own ``__x__`` ones and a prototype's ``op_type`` left out), its inputs
    after ``data`` with their stored arrays, what feeds ``data``, and helpers that parse the
    seed's attribute values as its dmlc parameters did and fail or note naming the node."""

    def __init__(self, *, key: str, name: str, op: str, attrs: Mapping[str, str],
                 inputs: tuple, source: str, has_params: bool, data_name: str,
                 data_is_var: bool, data_value: np.ndarray | None,
                 data_shape: tuple[int, ...] | None, weight_axes: frozenset,
                 nonnegative: bool, log: logging.Logger):
        self.key = key                    # "_contrib_PACT" or "Custom:PACT_V2_PY"
        self.name = name
        self.op = op                      # the node's op as written ("Custom" for prototypes)
        self.attrs = dict(attrs)
        self.inputs: tuple[SeedInput, ...] = tuple(inputs)
        self.source = source
        self.has_params = has_params      # a checkpoint was given: its state must be in it
        self.data_name = data_name
        self.data_is_var = data_is_var    # data is a variable (a weight, or the input)
        self.data_value = data_value      # that variable's stored array, when there is one
        self.data_shape = data_shape      # and its shape (stored, else declared)
        self.weight_axes = weight_axes    # channel axes it needs as a layer's weight
        self.nonnegative = nonnegative    # data comes out of a ReLU (or a clip at >= 0)
        self._log = log

    @property
    def custom(self) -> bool:
        """A Python prototype (``Custom(op_type=...)``)."""
        return self.key.startswith("Custom:")

    @property
    def seed_op(self) -> str:
        """The seed operator's name as a message shows it."""
        return self.key.split(":", 1)[1] if self.custom else self.key

    # -- messages ----------------------------------------------------------------------
    def fail(self, msg: str) -> NoReturn:
        raise QuantOpsError(f"{self.source}: node '{self.name}' ({self.op}): {msg}")

    def note(self, msg: str) -> None:
        self._log.info("%s: node '%s': %s", self.source, self.name, msg)

    def warn(self, msg: str) -> None:
        self._log.warning("%s: node '%s': %s", self.source, self.name, msg)

    # -- attribute values, parsed as the seed's dmlc parameters parsed them ----------------
    def as_bool(self, key: str, value: str) -> bool:
        v = _SEED_BOOL.get(value.strip().lower())
        if v is None:
            self.fail(f"attribute '{key}' = {value!r} is not a boolean (True/False/1/0)")
        return v

    def as_int(self, key: str, value: str) -> int:
        if not _SEED_INT.fullmatch(value.strip()):
            self.fail(f"attribute '{key}' = {value!r} is not an integer")
        return int(value.strip())

    def as_float(self, key: str, value: str) -> float:
        if not _SEED_FLOAT.fullmatch(value.strip()):
            self.fail(f"attribute '{key}' = {value!r} is not a number")
        return float(value.strip())

    def known(self, defaults: Mapping[str, str]) -> dict:
        """The attributes with the seed operator's defaults filled in; an attribute it did
        not have is an error."""
        unknown = [k for k in self.attrs if k not in defaults]
        if unknown:
            self.fail(f"attribute '{unknown[0]}' is not one of the seed operator's "
                      f"({', '.join(defaults) or 'it has none'})")
        return {k: self.attrs.get(k, d) for k, d in defaults.items()}

    def bits(self, key: str, value: str, offset: int, ours: tuple[int, int]) -> int:
        """Our nbits for the seed's ``nbits`` = ``value`` (ours = seed + ``offset``), in
        ``ours`` (inclusive) or an error saying which seed values convert."""
        seed_bits = self.as_int(key, value)
        bits = seed_bits + offset
        if not ours[0] <= bits <= ours[1]:
            lo, hi = (b - offset for b in ours)
            self.fail(f"attribute '{key}' = {value!r} is out of range: seed nbits {lo}..{hi} "
                      f"convert (to quant_ops nbits {ours[0]}..{ours[1]})")
        return bits

    # -- stored state ----------------------------------------------------------------------
    def stored(self, pos: int, size: int | None = 1, what: str = "") -> np.ndarray | None:
        """The stored array of input ``pos`` as float32 of ``size`` values (None: any size),
        or None when no checkpoint was given; a checkpoint that lacks it, or holds it with
        another size or a value that is not finite, is an error naming the node."""
        inp = self.inputs[pos]
        what = what or f"'{inp.role}'"
        if not self.has_params or not inp.is_var:
            return None
        if inp.value is None:
            self.fail(f"its {what} ('{inp.name}') is not in the params: the checkpoint does "
                      "not go with this symbol file")
        v = np.asarray(inp.value)
        if size is not None and v.size != size:
            self.fail(f"its {what} ('{inp.name}') has shape {tuple(v.shape)}; the seed "
                      f"operator keeps {size} value{'s' if size != 1 else ''}")
        if v.dtype.kind not in "fiu":
            self.fail(f"its {what} ('{inp.name}') is of type {v.dtype}, not a number")
        v = v.astype(np.float32).reshape(-1)
        if not np.isfinite(v).all():
            self.fail(f"its {what} ('{inp.name}') holds {v[~np.isfinite(v)][0]}: not finite")
        return v


@dataclass(frozen=True)
class Method:
    """One quantization method (see the module docstring).  Subclass hooks have defaults
    that suit most methods; a method module overrides only what differs."""

    name: str
    op: str
    inputs: tuple[Input, ...]
    bits: tuple[int, int]
    roles: tuple[str, ...] = ROLES
    per_channel: bool = False
    params: Mapping[str, Param] = field(default_factory=dict)
    default_bits: int = 4                 # nbits when the attribute is absent
    channel_attr: str | None = None       # the operator's per-channel attribute
    weight_attr: bool = True              # the operator takes ``is_weight``
    lr_mult: float = 1.0                  # learned inputs' learning-rate multiplier
    wd_mult: float = 1.0                  # and weight-decay multiplier
    #: quantized weights stay on the float weight's scale, so BatchNorm can be folded into
    #: them for QAT (False: the method maps weights to [-1, 1] or reshapes them, and BN
    #: after the layer absorbs the new scale, as those papers train)
    keeps_weight_scale: bool = True
    #: policy params the graph rewrite uses for a role ("weight"/"activation") unless the
    #: policy sets them (the operator's own defaults serve seed graphs and direct calls)
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    qdq_reason: str | None = None         # why there is no ONNX QDQ form (None: there is)
    range_input: str | None = None        # the input holding the range export reads
    linear: bool = False                  # y = clamp(rint(x / s)) * s, s = range / qmax
    sign_aware: bool = False              # calibration tells it whether a tensor is signed
    scale_follows_weight: bool = False    # a weight's scale is recomputed from the weight
    doc: str = ""
    #: operators of the seed toolkit this method imports (``_contrib_X`` or
    #: ``Custom:<op_type>``) -> the seed operator's inputs, ``data`` first (see from_seed)
    seed_ops: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    # -- policy -> operator ---------------------------------------------------------
    def op_attrs(self, bits: int, per_channel: bool, params: Mapping[str, Any],
                 is_weight: bool, channel_axis: int = 0) -> dict[str, str]:
        """The operator's attributes (strings, as MXNet wants them)."""
        attrs = {"nbits": str(bits)}
        if self.weight_attr:
            attrs["is_weight"] = attr_str(is_weight)
        if self.channel_attr is not None:
            attrs[self.channel_attr] = attr_str(per_channel)
        if per_channel:
            attrs["channel_axis"] = str(channel_axis)
        role = self.defaults.get("weight" if is_weight else "activation", {})
        attrs.update((k, attr_str(v)) for k, v in {**role, **params}.items()
                     if self.params[k].attr)
        return attrs

    def training_params(self, bits: int, is_weight: bool) -> dict[str, Any]:
        """Policy params fine-tuning gives this role at ``bits`` unless the policy sets them
        (a training policy, ``QuantPolicy.for_training``; PTQ keeps the plain defaults)."""
        return {}

    # -- starting values --------------------------------------------------------------
    def initial(self, bits: int, per_channel: bool, params: Mapping[str, Any], is_weight: bool,
                channels: int, weight: np.ndarray | None, axis: int) -> dict[str, np.ndarray]:
        """Starting value of every input after ``data`` (zeros unless a method says more);
        ``weight`` is the weight the quantizer will see, when it quantizes one."""
        return {i.name: np.zeros(i.size(channels), f32) for i in self.inputs}

    # -- calibration -----------------------------------------------------------------
    def unsigned(self, attrs: Mapping[str, str]) -> bool:
        """The quantizer represents [0, a] only (negative inputs clip to 0)."""
        return False

    def signed_params(self, params: Mapping[str, Any]) -> dict | None:
        """Policy params of this method's signed form, for a tensor that can be negative
        (None: it has none, and the rewrite refuses such a placement)."""
        return None

    def from_range(self, attrs: Mapping[str, str], amax: float,
                   signed: bool) -> dict[str, np.ndarray]:
        """Inputs that make an activation quantizer start from a calibrated range
        [-amax, amax] (or [0, amax] when the tensor is non-negative, ``signed`` False)."""
        return {}

    # -- training ---------------------------------------------------------------------
    def project(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Learned inputs moved back into their domains: {name: new value} for those that
        changed (SGD knows nothing of domains)."""
        out = {}
        for i in self.inputs:
            if i.domain is not None and i.name in values:
                v = values[i.name]
                c = v.clip(*i.domain)
                if (c != v).any():
                    out[i.name] = c
        return out

    # -- export ----------------------------------------------------------------------
    def nbits(self, attrs: Mapping[str, str]) -> int:
        return int(attrs.get("nbits", self.default_bits))

    def is_weight(self, attrs: Mapping[str, str]) -> bool:
        return flag(attrs, "is_weight")

    def per_axis(self, attrs: Mapping[str, str]) -> bool:
        return self.is_weight(attrs) and self.channel_attr is not None \
            and flag(attrs, self.channel_attr)

    def qdq(self, attrs: Mapping[str, str], value: np.ndarray) -> QDQ:
        """The QDQ form from the range input's value; methods without one raise."""
        raise NotImplementedError(self.qdq_reason or f"{self.op} has no QDQ form")

    def follows_weight(self, attrs: Mapping[str, str]) -> bool:
        """This quantizer's weight scale is recomputed from the weight (``scale_follows_weight``
        unless its attributes pin a stored one)."""
        return self.scale_follows_weight

    def deploy_state(self, attrs: Mapping[str, str],
                     weight: np.ndarray) -> dict[str, np.ndarray]:
        """State a deployment engine derives from the final weight itself (int8 ranges)."""
        return {}

    def deploy_weight(self, attrs: Mapping[str, str], weight: np.ndarray,
                      state: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float weight an engine is given, so that its own quantization of it gives
        this operator's codes (the weight itself unless the method says more)."""
        return weight

    def fixed(self, x: np.ndarray, attrs: Mapping[str, str],
              state: Mapping[str, np.ndarray]) -> np.ndarray:
        """The operator applied to ``x`` with its given state, in inference mode and without
        recomputing anything from ``x`` (the alignment check's quantizer-alone run)."""
        import mxnet as mx

        args = [mx.nd.array(state[i.name]) for i in self.inputs]
        kw = {k: v for k, v in attrs.items() if not k.startswith("__")}
        return getattr(mx.nd, self.op)(mx.nd.array(x), *args, **kw).asnumpy()

    # -- import from the seed toolkit ----------------------------------------------------
    def from_seed(self, node: SeedNode) -> SeedMapped:
        """This method's operator for a seed node of one of ``seed_ops`` (its attributes and
        stored state mapped), or ``node.fail(why)`` where no exact mapping exists."""
        node.fail(f"seed operator '{node.seed_op}' has no conversion to {self.op}")

    # -- derived -----------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        return ("data",) + tuple(i.name for i in self.inputs)

    @property
    def exportable(self) -> bool:
        return self.qdq_reason is None

    def input(self, name: str) -> Input:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(f"{self.op} has no input {name!r}")
