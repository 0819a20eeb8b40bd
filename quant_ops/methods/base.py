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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

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


def flag(attrs: Mapping[str, str], key: str, default: bool = False) -> bool:
    """A boolean operator attribute as MXNet stores it (a string)."""
    v = attrs.get(key)
    return default if v is None else str(v) in ("True", "true", "1")


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
    a scalar), whether its codes are signed, and whether it is per axis."""

    scale: np.ndarray
    signed: bool
    per_axis: bool


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
    qdq_reason: str | None = None         # why there is no ONNX QDQ form (None: there is)
    range_input: str | None = None        # the input holding the range export reads
    linear: bool = False                  # y = clamp(rint(x / s)) * s, s = range / qmax
    sign_aware: bool = False              # calibration tells it whether a tensor is signed
    scale_follows_weight: bool = False    # a weight's scale is recomputed from the weight
    doc: str = ""

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
        attrs.update((k, attr_str(v)) for k, v in params.items() if self.params[k].attr)
        return attrs

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

    def deploy_state(self, attrs: Mapping[str, str],
                     weight: np.ndarray) -> dict[str, np.ndarray]:
        """State a deployment engine derives from the final weight itself (int8 ranges)."""
        return {}

    def fixed(self, x: np.ndarray, attrs: Mapping[str, str],
              state: Mapping[str, np.ndarray]) -> np.ndarray:
        """The operator applied to ``x`` with its given state, in inference mode and without
        recomputing anything from ``x`` (the alignment check's quantizer-alone run)."""
        import mxnet as mx

        args = [mx.nd.array(state[i.name]) for i in self.inputs]
        kw = {k: v for k, v in attrs.items() if not k.startswith("__")}
        return getattr(mx.nd, self.op)(mx.nd.array(x), *args, **kw).asnumpy()

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
